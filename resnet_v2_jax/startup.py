"""The first lines of every command: Ctrl-C or SIGTERM while a command starts (Python importing
JAX, TensorFlow and the rest, which takes seconds) ends it at once with one line and exit code
130 or 143, before anything is written. Left to Python, a Ctrl-C then can be swallowed by a
callback (and the run goes on to train), or surface as a library's ImportError.

Each command module calls `exit_on_signals()` before its other imports, under
`if __name__ == "__main__"`, so importing a command as a library changes no handler; `cli.run`
hands the signals to the command's own handling once it starts.

Importing this module also makes etils.epath reach gs:// through fsspec (gcsfs) rather than
TensorFlow's `tf.io.gfile`, unless the user set EPATH_USE_TF: the same client on every
machine, with or without TensorFlow, and the one the tests run against a local Cloud Storage
server (TensorFlow's has no endpoint setting; docs/running.md). etils reads the variable when
it first resolves a gs:// path, so it is set before anything imports etils.
"""
import os
import signal
import sys

os.environ.setdefault("EPATH_USE_TF", "false")


def _exit(signum, frame) -> None:
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    sys.stderr.write(f"error: interrupted ({name}) while starting: nothing was done\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def exit_on_signals() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit)
