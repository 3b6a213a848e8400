"""What a command prints when it fails (`cli.guard`): one `error:` line for each of the
package's own error types (resnet_v2_jax.errors), with the exit codes of the commands' docs;
a traceback and a line saying it is a bug for anything else."""
import os
import subprocess
import sys

import pytest

from cli_runs import ROOT, command, environment
from resnet_v2_jax import cli, errors

OWN_ERRORS = [errors.ConfigError, errors.DataError, errors.CheckpointError,
              errors.CheckpointMismatchError, errors.WeightsError, errors.WorkdirError,
              errors.NotFoundError, errors.SetupError, errors.MissingCompilerError,
              errors.NonFiniteLossError]


def ended(capsys, monkeypatch, raised: BaseException):
    """(exit code, stderr lines) of a command whose main raises `raised`."""
    def main(argv):
        def deep():  # a frame below the command, as a failure inside a library would be
            raise raised
        deep()

    def exit_now(code):  # fail() ends interrupted commands with os._exit
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_now)
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.guard(main)(["command"])
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("kind", OWN_ERRORS, ids=lambda kind: kind.__name__)
def test_each_own_error_is_one_line_with_exit_code_1(capsys, monkeypatch, kind):
    code, lines = ended(capsys, monkeypatch, kind("what is wrong; what to do"))
    assert (code, lines) == (1, ["error: what is wrong; what to do"])


@pytest.mark.parametrize("signal_name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupted_start_is_one_line_with_the_signals_exit_code(capsys, monkeypatch,
                                                                      signal_name, code):
    raised = errors.Interrupted(signal_name, f"interrupted ({signal_name}) while compiling")
    assert ended(capsys, monkeypatch, raised) == (
        code, [f"error: interrupted ({signal_name}) while compiling"])


@pytest.mark.parametrize("raised", [KeyError("params"), ZeroDivisionError("division by zero"),
                                    ValueError("a library's own check failed"),
                                    FileNotFoundError(2, "No such file", "/tmp/x"),
                                    ModuleNotFoundError("No module named 'jaxlib.x'",
                                                        name="jaxlib.x")],
                         ids=lambda e: type(e).__name__)
def test_anything_else_is_a_bug_with_its_traceback_and_exit_code_1(capsys, monkeypatch, raised):
    """A ValueError or FileNotFoundError not of the package's own types too: the commands no
    longer read them as the user's mistake."""
    code, lines = ended(capsys, monkeypatch, raised)
    assert code == 1
    assert lines[0] == "Traceback (most recent call last):"
    assert any("in deep" in line for line in lines)  # the frame that raised
    assert lines[-2].startswith(type(raised).__name__)  # Python's last line of the traceback
    assert lines[-1] == (f"error: unexpected {type(raised).__name__}: this is a bug in "
                         "resnet_v2_jax or a library it uses, not in your input; please report "
                         "it, with the command and the traceback above, in "
                         f"{cli.BUG_REPORTS}")
    assert sum(line.startswith("error: ") for line in lines) == 1


def test_a_missing_module_of_the_train_extra_names_the_extra(capsys, monkeypatch):
    raised = ModuleNotFoundError("No module named 'tensorboardX'", name="tensorboardX")
    assert ended(capsys, monkeypatch, raised) == (
        1, ["error: tensorboardX is not installed: training's input, logs and figures come "
            "with the [train] extra: pip install 'resnet_v2_jax[train]'"])


def test_own_errors_are_still_the_builtin_types_they_were():
    """A library user's `except ValueError` (or FileNotFoundError, RuntimeError) still
    catches them."""
    for kind in OWN_ERRORS:
        assert issubclass(kind, errors.Error)
    assert issubclass(errors.NotFoundError, FileNotFoundError)
    assert issubclass(errors.NonFiniteLossError, RuntimeError)
    assert all(issubclass(kind, ValueError) for kind in OWN_ERRORS
               if kind not in (errors.NotFoundError, errors.NonFiniteLossError))


@pytest.mark.slow
def test_a_bug_deep_in_a_real_command_prints_its_traceback_and_the_bug_line(tmp_path):
    """The training command, with a function it calls deep down broken: the traceback reaches
    the user, then the line that says it is a bug; nothing is reported as the user's input."""
    code = ("from resnet_v2_jax import cli, inputs, main\n"
            "def broken(config):\n"
            "    return {}['num_train_examples']\n"
            "inputs.check_data = broken\n"
            "main.define_flags()\n"
            "cli.run(main.main)\n")
    argv = command(tmp_path / "run", tmp_path)[3:]  # the training command's flags
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, text=True,
                            capture_output=True, env=environment(), timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback (most recent call last):" in lines, result.stderr[-3000:]
    assert "in broken" in result.stderr and lines[-2] == "KeyError: 'num_train_examples'"
    assert lines[-1].startswith("error: unexpected KeyError: this is a bug in resnet_v2_jax")
    assert sum(line.startswith("error: ") for line in lines) == 1
