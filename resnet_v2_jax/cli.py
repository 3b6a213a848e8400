"""What the commands (`main`, `evaluate`, `analyze`, `plot`, `export`, `summary`,
`device_input`) share: absl start-up, config files that load from any directory, quiet
libraries, one line instead of a traceback for user errors, and the process-wide settings a
config needs (`prepare_process`). Everything that changes the process happens here, in the
commands, never when a library module is imported.

A user error, one of the package's own `errors.Error` (bad config value, missing or bad data,
unusable checkpoint, weights or workdir, a run that cannot start, diverged training), ends the
command with `error: <what is wrong and what to do>` on stderr and exit code 1; bad flags or
config files with exit code 2; Ctrl-C with exit code 130, SIGTERM with 143. Set
RESNET_V2_JAX_TRACEBACK=1 to see the traceback of a user error as well. Any other exception is a
bug (of this package or a library): its traceback is printed, then one `error:` line saying so
and where to report it (`BUG_REPORTS`), with exit code 1.

Library lines that carry no information for a user and read like errors are dropped, by the
libraries' own logger levels where they have them (`quiet_libraries`); warnings that do carry
information are kept.
"""

import contextlib
import importlib.util
import logging as std_logging
import os
import signal
import sys
import traceback
import types
from typing import Callable, Sequence, Tuple

import jax
import ml_collections
from absl import app, flags, logging

from resnet_v2_jax import configuration, errors, inputs

TRACEBACK_VARIABLE = "RESNET_V2_JAX_TRACEBACK"
# What `pip install 'resnet_v2_jax[train]'` adds to the core install (setup.py's TRAIN).
TRAIN_EXTRA = ("tensorflow", "tensorflow_datasets", "tensorboardX", "tensorboard", "matplotlib")

# Where a bug is reported: the line printed after an unexpected exception's traceback.
BUG_REPORTS = "the issues of the resnet_v2_jax repository"

# Loggers of libraries that log at INFO what a user of the commands need not read: JAX probing
# for a TPU on every machine without one, TensorBoard's event reader moving through a run's
# files (plot), fsspec's read-ahead cache opening a gs:// file. Their warnings stay; a level the
# user set (JAX_LOGGING_LEVEL) is kept.
_LIBRARY_LEVELS = {"jax": std_logging.WARNING, "tensorboard": std_logging.WARNING,
                   "fsspec": std_logging.WARNING}

# Libraries whose errors come with tracebacks of their own threads; the command reports what
# went wrong in its `error:` line, so their records are cut to their first line.
_TRACEBACK_LIBRARIES = ("orbax", "tensorstore", "etils")


class _AbslLibraryLines(std_logging.Filter):
    """What a logger level cannot select: Orbax and tfds log through absl's one logger, whose
    level (--verbosity) is also this package's, so their lines are told apart here, by the
    file that logs them. Drops Orbax's INFO lines (every save and restore in detail; its
    warnings stay) and two warnings of situations a command handles itself, for which neither
    library has a setting: Orbax opening a checkpoint folder read-only (eval-only and export
    ask for that; the warning is unconditional) and tfds passing over a dataset folder an
    earlier failed preparation left behind. Cuts library errors to their first line, without
    the traceback of their thread (all of it stays with RESNET_V2_JAX_TRACEBACK=1)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        library = next((name for name in _TRACEBACK_LIBRARIES
                        if f"{os.sep}{name}{os.sep}" in record.pathname), None)
        if record.levelno < std_logging.WARNING and library == "orbax":
            return False
        message = record.getMessage()
        if library == "orbax" and message.startswith("Given directory is read only"):
            return False
        if (f"{os.sep}tensorflow_datasets{os.sep}" in record.pathname
                and message.startswith("Variant folder ") and " has no " in message):
            return False
        if library and not os.environ.get(TRACEBACK_VARIABLE):
            record.msg, record.args = message.splitlines()[0][:300], None
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def _unraisable(unraisable) -> None:
    """Exceptions nobody can catch, raised in library code after the fact, as consequences of
    an error the command reports itself: tensorstore's callbacks into an asyncio loop Orbax has
    closed ("Event loop is closed"), and Orbax's other array reads of a damaged checkpoint,
    abandoned once the first failed (their coroutines are finalised with the error; the
    command has set the checkpoint aside with a warning naming it). Neither library has a
    setting for them and Python offers only this hook, so it hides these two cases (unless
    RESNET_V2_JAX_TRACEBACK=1) and shows every other unraisable exception as Python does."""
    error, source = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    abandoned_read = source is not None and f"{os.sep}orbax{os.sep}" in source.co_filename
    if (closed_loop or abandoned_read) and not os.environ.get(TRACEBACK_VARIABLE):
        return
    sys.__unraisablehook__(unraisable)


@contextlib.contextmanager
def native_stderr_quiet():
    """Quiets TensorFlow's C++ log, for its import inside the block. What native code writes to
    stderr there ("oneDNN custom operations are on", CPU features, "All log messages before
    absl::InitializeLog()"), which TF_CPP_MIN_LOG_LEVEL no longer reaches, is dropped; and
    TF_CPP_MIN_LOG_LEVEL=2, which TensorFlow reads at import, drops its INFO and WARNING lines
    later on, such as "The calling iterator did not fully read the dataset being cached" from
    every run stopped in its first epoch. The variable is restored after the block: JAX reads it
    at its own import, so XLA's warnings stay. A user's TF_CPP_MIN_LOG_LEVEL=0 is kept (1 is
    JAX's default, which it sets when unset). Exceptions still propagate with their messages."""
    sys.stderr.flush()
    saved = os.dup(2)
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
    if level in (None, "1"):
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if level is None:
            del os.environ["TF_CPP_MIN_LOG_LEVEL"]
        else:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = level


def quiet_libraries() -> None:
    """Sets the library loggers' levels (`_LIBRARY_LEVELS`), then drops what no setting reaches
    (`_AbslLibraryLines`, `_unraisable`). (TensorFlow's C++ log goes with
    `import_tensorflow_quietly`.)"""
    for name, level in _LIBRARY_LEVELS.items():
        logger = std_logging.getLogger(name)
        if logger.level == std_logging.NOTSET:
            logger.setLevel(level)
    if not os.environ.get(TRACEBACK_VARIABLE):
        # asyncio's errors ("Task exception was never retrieved") come from Orbax's threads,
        # consequences of an error the command reports itself.
        std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    logging.get_absl_handler().addFilter(_AbslLibraryLines())
    sys.unraisablehook = _unraisable


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and tfds (when installed) with their C++ start-up lines dropped
    (`native_stderr_quiet`), and turns tfds' progress bars off: a batch job's log is read as
    text, without escape codes."""
    with native_stderr_quiet():
        try:
            importlib.import_module("tensorflow")
            tensorflow_datasets = importlib.import_module("tensorflow_datasets")
        except ImportError:  # the pipelines that need them say so in one line
            return
    tensorflow_datasets.disable_progress_bar()


def _not_installed(module: str) -> str:
    return (f"{module} is not installed: training's input, logs and figures come with the "
            "[train] extra: pip install 'resnet_v2_jax[train]'")


def check_train_extra(config: ml_collections.ConfigDict) -> None:
    """Ends a training command in one line, before it writes anything, when a module of the
    [train] extra that `config` needs is not installed (TensorBoard's writer always, TensorFlow
    and tfds for configs that read tfds)."""
    for module in inputs.train_modules(config):
        if importlib.util.find_spec(module) is None:
            fail(inputs.not_installed(module, config), 1)


def prepare_process(config: ml_collections.ConfigDict, reads_data: bool = True) -> None:
    """What a command's process needs for `config`: 64-bit JAX for `float64` configs (JAX's
    precision is process-wide), and TensorFlow imported quietly for configs that read tfds
    (unless the command reads no data)."""
    if config.get("float64"):
        jax.config.update("jax_enable_x64", True)
    if reads_data and inputs.reads_tfds(config):
        import_tensorflow_quietly()


def fail(message: str, code: int = 1, error: BaseException = None) -> None:
    """Ends the command with `error: <message>` on stderr (and the traceback of `error` when
    RESNET_V2_JAX_TRACEBACK is set). An interrupted command (exit code 130 or 143) ends on the
    spot, without the interpreter's teardown, which can crash while native threads (XLA's
    compiler, a prefetching thread) are still running."""
    if error is not None and os.environ.get(TRACEBACK_VARIABLE):
        logging.exception("%s", message)
    print(f"error: {message}", file=sys.stderr)
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def shipped_configs() -> str:
    """The folder of the configs that come with resnet_v2_jax: the copy an installed package
    ships (resnet_v2_jax/shipped/configs), or the repository's configs/ beside the package in a
    checkout."""
    package = os.path.dirname(os.path.abspath(__file__))
    shipped = os.path.join(package, "shipped", "configs")
    return shipped if os.path.isdir(shipped) else os.path.join(os.path.dirname(package), "configs")


def _resolve_config(path: str) -> str:
    """`path` itself where it exists; otherwise, for configs/<name>.py, the shipped config of
    that name; otherwise a one-line error that lists the shipped configs."""
    if os.path.isfile(path):
        return path
    given_folder, name = os.path.split(os.path.normpath(path))
    shipped = shipped_configs()
    if os.path.basename(given_folder) == "configs" and os.path.isfile(os.path.join(shipped, name)):
        return os.path.join(shipped, name)
    files = os.listdir(shipped) if os.path.isdir(shipped) else []
    names = sorted(n[:-3] for n in files if n.endswith(".py") and n not in ("__init__.py",
                                                                             "default.py"))
    fail(f"config file {path} not found (working directory {os.getcwd()}); the configs that "
         f"come with resnet_v2_jax are configs/<name>.py for <name> in: {', '.join(names)}", 2)


def _resolve_config_flags(argv: Sequence[str]) -> Tuple[list, list]:
    """(argv with each --config file resolved by `_resolve_config`, the resolved .py files),
    `:args` suffixes and --config.key=value overrides kept as they are."""
    argv, paths = list(argv), []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            index, prefix, value = i, "--config=", arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(argv):
            index, prefix, value = i + 1, "", argv[i + 1]
        else:
            continue
        path, colon, rest = value.partition(":")
        if path:
            paths.append(_resolve_config(path))
            argv[index] = prefix + paths[-1] + colon + rest
    return argv, paths


def import_config_file(path: str) -> types.ModuleType:
    """A config file imported as a module (for commands that take several configs)."""
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _root_cause(error: BaseException) -> BaseException:
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        nested = error.__cause__ or error.__context__
        if nested is None:
            break
        error = nested
    return error


def _describe_config_error(error: BaseException, argv: Sequence[str],
                           paths: Sequence[str]) -> str:
    where = ", ".join(paths) or "--config"
    cause = _root_cause(error)
    if isinstance(cause, SyntaxError):
        return f"{cause.filename} line {cause.lineno}: {cause.msg} (syntax error in the config)"
    if isinstance(cause, AttributeError) and "get_config" in str(cause):
        return f"{where} has no get_config() function: a config file defines get_config()"
    if isinstance(cause, (AttributeError, KeyError)):
        name = str(cause).strip("\"'")
        overrides = [a[len("--config."):].split("=")[0] for a in argv
                     if a.startswith("--config.")]
        key = next((k for k in overrides if k.split(".")[-1] == name), name)
        return (f"unknown config key {key!r} in a --config.<key>=... override; the keys are "
                f"those of {where} (--print_config lists them)")
    return f"cannot load the config {where}: {type(cause).__name__}: {cause}"


def parse_flags(argv: Sequence[str]):
    """absl's flag parsing, with config files made loadable from any working directory and
    every failure reported in one line (exit code 2).

    Config files import their base from the package (`resnet_v2_jax.base_config`), so a config
    file loads from any folder, a copy of a shipped one too. `--config=configs/<name>.py` where
    no such file exists takes the config of that name that comes with the package
    (`shipped_configs`).
    """
    argv = ["--help" if arg == "-h" else arg for arg in argv]  # absl knows only --help
    argv, paths = _resolve_config_flags(argv)
    try:
        rest = flags.FLAGS(list(argv))
        if "config" in flags.FLAGS and isinstance(flags.FLAGS.config, ml_collections.ConfigDict):
            flags.FLAGS.config.get("dataset")  # loads the file and applies the overrides now
    except flags.Error as e:
        fail(f"{e} (--help lists the flags)", 2, e)
    except Exception as e:  # config files run arbitrary code; any failure is the file's
        fail(_describe_config_error(e, argv, paths), 2, e)
    return rest


def print_config(config: ml_collections.ConfigDict) -> None:
    """Every key of `config` (the model section's as `model.<key>`) with its value and meaning,
    one per line: `--print_config`."""
    meanings = configuration.key_help()
    values = configuration.flatten(config)
    keys = [k for k in meanings if k in values] + sorted(k for k in values if k not in meanings)
    width = max(len(f"{k} = {values[k]!r}") for k in keys)
    for key in keys:
        setting = f"{key} = {values[key]!r}"
        print(f"{setting:<{width}}  # {meanings[key]}" if meanings.get(key) else setting)


class _Terminated(BaseException):
    """SIGTERM where no run handles it (start-up, commands that do not train)."""


def _terminate(signum, frame):
    raise _Terminated()


def report_bug(error: BaseException) -> None:
    """Ends the command after an exception no check of this package foresaw: its traceback,
    then one line saying it is a bug and where to report it; exit code 1."""
    traceback.print_exception(error)
    print(f"error: unexpected {type(error).__name__}: this is a bug in resnet_v2_jax or a "
          f"library it uses, not in your input; please report it, with the command and the "
          f"traceback above, in {BUG_REPORTS}", file=sys.stderr)
    sys.exit(1)


def guard(main: Callable) -> Callable:
    """`main` where the package's own errors (`errors.Error`), Ctrl-C and SIGTERM end the
    command in one line (exit code 1, 130 or 143) instead of a traceback or a silent death,
    where a missing module of the [train] extra names the extra, and where any other exception
    is a bug: its traceback and a line saying so (`report_bug`)."""
    def guarded(argv):
        try:
            main(argv)
        except KeyboardInterrupt as e:
            fail("interrupted (Ctrl-C): stopped at once; rerun the same command to resume "
                 "from the last checkpoint", 130, e)
        except _Terminated as e:
            fail("terminated (SIGTERM): stopped at once; rerun the same command to resume "
                 "from the last checkpoint", 143, e)
        except errors.Interrupted as e:
            fail(str(e), 130 if e.signal_name == "SIGINT" else 143, e)
        except errors.Error as e:
            fail(str(e), 1, e)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in TRAIN_EXTRA:
                report_bug(e)
            fail(_not_installed(e.name), 1, e)
        except Exception as e:  # noqa: BLE001 (whatever it is, it is reported as a bug)
            report_bug(e)
    return guarded


def run(main: Callable) -> None:
    """`app.run(guard(main))`, the libraries quiet (`quiet_libraries`). A training run replaces
    the signal handlers set here with its own for as long as it runs (`train`), which stop it
    at a step boundary."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # `startup`'s, until now
    quiet_libraries()
    app.run(guard(main), flags_parser=parse_flags)


def print_results(results: dict, dataset: str, split: str) -> None:
    """One line per eval crop, as `main` and `evaluate` print them, labelled with the step
    whose weights were evaluated; for several runs in the paper's form, median (mean±std)."""
    step = results.get("eval_step") or results["step"]
    for crop, r in results["eval"].items():
        where = f"on {r['num_examples']} {dataset} {split} images at crop {crop}"
        stats = r["stats"]
        if len(r["runs"]["top1_error"]) == 1 and stats["top1_error"]["runs"]:
            print(f"step {step}: test accuracy {100 * (1 - r['top1_error']):.2f}% "
                  f"(top-1 error {100 * r['top1_error']:.2f}%, top-5 error "
                  f"{100 * r['top5_error']:.2f}%) {where}")
            continue
        top1, top5 = stats["top1_error"], stats["top5_error"]
        if not top1["runs"]:
            print(f"step {step}: every one of the runs diverged {where}")
            continue
        diverged = f", {len(r['diverged'])} diverged" if r.get("diverged") else ""
        print(f"step {step}: test error {100 * top1['median']:.2f} ({100 * top1['mean']:.2f}"
              f"±{100 * top1['std']:.2f}), median of {top1['runs']} runs{diverged}; top-5 error "
              f"{100 * top5['median']:.2f} ({100 * top5['mean']:.2f}±{100 * top5['std']:.2f}) "
              f"{where}")
