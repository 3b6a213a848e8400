"""The errors resnet_v2_jax raises for what its user can fix: each message says, in one line,
what is wrong and what to do. The commands print them as `error: <message>` with exit code 1
(`cli.run`); any other exception there is a bug, printed with its traceback.

Each kind is also the built-in exception it was before it had a type of its own (ValueError,
FileNotFoundError, RuntimeError), so a library user's `except ValueError` still catches it.
Exceptions only a bug can reach (a caller breaking an API's contract, an impossible state) stay
ordinary exceptions. This module imports nothing of the package: every module can raise these.
"""


class Error(Exception):
    """Something the user can fix; the message says what and how."""


class ConfigError(Error, ValueError):
    """A config value, combination of values or command-line flag value that is not allowed."""


class DataError(Error, ValueError):
    """A dataset whose files do not hold what the config expects."""


class CheckpointError(Error, ValueError):
    """A checkpoint that cannot be used for this run."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint of another model, optimiser or dtype than this run builds."""


class WeightsError(Error, ValueError):
    """Weights to start from or convert (a weights file, a timm or BiT state dict, an
    `init_from` source) that cannot be read or do not fit the network."""


class WorkdirError(Error, ValueError):
    """The workdir cannot be used (not writable, a file, not a run's folder, or in use by
    another run)."""


class NotFoundError(Error, FileNotFoundError):
    """A file or folder the command was given or needs is not there (a run, a weights file, a
    dataset not prepared yet)."""


class SetupError(Error, ValueError):
    """The installation or environment cannot run what was asked: a missing extra or
    compiler, an environment variable out of range, a process setting the config needs."""


class MissingCompilerError(SetupError):
    """The compiler of a target's platform is not installed."""


class NonFiniteLossError(Error, RuntimeError):
    """The training loss became NaN or Inf (training diverged)."""


class Interrupted(Error):
    """SIGINT or SIGTERM before training started: nothing was trained. `signal_name` is
    "SIGINT" or "SIGTERM"."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name
