"""What the commands (`main`, `evaluate`, `analyze`, `plot`, `device_input`) share: absl
start-up, config files that load from any directory, and one line instead of a traceback for
user errors.

A user error (bad config value, missing data, unusable checkpoint or workdir, diverged
training) ends the command with `error: <what is wrong and what to do>` on stderr and exit
code 1; bad flags or config files with exit code 2; Ctrl-C with exit code 130. Set
RESNET_V2_JAX_TRACEBACK=1 to see the traceback as well.
"""

import importlib.util
import os
import sys
import types
from typing import Callable, Sequence, Tuple, Type

import ml_collections
from absl import app, flags, logging

TRACEBACK_VARIABLE = "RESNET_V2_JAX_TRACEBACK"


def fail(message: str, code: int = 1, error: BaseException = None) -> None:
    """Ends the command with `error: <message>` on stderr (and the traceback of `error` when
    RESNET_V2_JAX_TRACEBACK is set)."""
    if error is not None and os.environ.get(TRACEBACK_VARIABLE):
        logging.exception("%s", message)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _config_paths(argv: Sequence[str]):
    """The .py files named by --config=... (ignoring `:args` suffixes and overrides)."""
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--config="):
            value = arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        if value:
            yield value.split(":", 1)[0]


def _importable_configs(path: str) -> None:
    """Puts the folder holding `path`'s `configs/` package on sys.path: config files import
    their base as `from configs import default`."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if package_root not in sys.path:
        sys.path.insert(0, package_root)


def import_config_file(path: str) -> types.ModuleType:
    """A config file imported as a module (for commands that take several configs)."""
    _importable_configs(path)
    name = "config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _root_cause(error: BaseException) -> BaseException:
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        nested = getattr(error, "_error", None) or error.__cause__ or error.__context__
        if nested is None:
            break
        error = nested
    return error


def _describe_config_error(error: BaseException, paths: Sequence[str]) -> str:
    where = ", ".join(paths) or "--config"
    cause = _root_cause(error)
    if isinstance(cause, SyntaxError):
        return f"{cause.filename} line {cause.lineno}: {cause.msg} (syntax error in the config)"
    if isinstance(cause, AttributeError) and "get_config" in str(cause):
        return f"{where} has no get_config() function: a config file defines get_config()"
    if isinstance(cause, (AttributeError, KeyError)):
        name = str(cause).strip("\"'")
        return (f"unknown config key {name!r} in a --config.<key>=... override; the keys are "
                f"those of {where} (see configs/default.py)")
    return f"cannot load the config {where}: {type(cause).__name__}: {cause}"


def parse_flags(argv: Sequence[str]):
    """absl's flag parsing, with config files made loadable from any working directory and
    every failure reported in one line (exit code 2).

    Config files import their base as `from configs import default`; the folder that holds a
    given file's `configs/` package is put on sys.path, so `--config=/path/to/configs/x.py`
    works wherever the command runs.
    """
    paths = list(_config_paths(argv))
    for path in paths:
        if not os.path.isfile(path):
            fail(f"config file {path} not found (working directory {os.getcwd()})", 2)
        _importable_configs(path)
    try:
        rest = flags.FLAGS(list(argv))
        if "config" in flags.FLAGS and isinstance(flags.FLAGS.config, ml_collections.ConfigDict):
            flags.FLAGS.config.get("dataset")  # loads the file and applies the overrides now
    except flags.Error as e:
        fail(f"{e} (--help lists the flags)", 2, e)
    except Exception as e:  # config files run arbitrary code; any failure is the file's
        fail(_describe_config_error(e, paths), 2, e)
    return rest


def run(main: Callable, user_errors: Tuple[Type[BaseException], ...]) -> None:
    """`app.run(main)` where `user_errors` and Ctrl-C end in one line instead of a traceback."""

    def guarded(argv):
        try:
            main(argv)
        except KeyboardInterrupt as e:
            fail("interrupted: stopped at once; rerun the same command to resume from the "
                  "last checkpoint", 130, e)
        except user_errors as e:
            fail(str(e), 1, e)

    app.run(guarded, flags_parser=parse_flags)


def print_results(results: dict, dataset: str, split: str) -> None:
    """One line per eval crop, as `main` and `evaluate` print them."""
    for crop, r in results["eval"].items():
        print(f"step {results['step']}: test accuracy {100 * (1 - r['top1_error']):.2f}% "
              f"(top-1 error {100 * r['top1_error']:.2f}%, top-5 error "
              f"{100 * r['top5_error']:.2f}%) on {r['num_examples']} {dataset} {split} images "
              f"at crop {crop}")
