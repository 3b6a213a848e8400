"""The run's folder (--workdir): one absolute path, one run at a time, results as valid JSON.

* `resolve` turns whatever the user typed (`runs/r1`, `~/runs/r1`, `gs://bucket/r1`) into the
  one path the whole run uses. Orbax saves in background threads and refuses relative paths, so
  a relative workdir used as typed loses the run at the first save.
* `RunLock` keeps a second run out of a folder that is in use (two runs in one workdir overwrite
  each other's checkpoints and results). The lock file names its holder (host, pid, boot); a
  lock whose holder is gone (same host and boot, process dead; or no heartbeat for
  `STALE_AFTER_S`) is taken over with a warning, so a crashed or killed run never blocks its
  own resume. On several processes only process 0 takes it, and every process learns the answer.
* `write_json` writes strict JSON (non-finite numbers become null) atomically.

Reading a finished run back is `runs`' job; its config.json is read by `configuration.read`.
"""

import datetime
import json
import math
import os
import socket
import threading
import time
import uuid
from typing import Any, Optional

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = "run.lock"
HEARTBEAT_S = 60        # the holder rewrites the lock this often
STALE_AFTER_S = 600     # a lock without heartbeat for this long belongs to a dead run


class WorkdirError(ValueError):
    """The workdir cannot be used (not writable, a file, or in use by another run)."""


def resolve(path: str) -> epath.Path:
    """`path` made absolute once: `~` expanded, relative paths joined to the current directory,
    URLs such as gs://bucket/run kept as they are."""
    if not path or not str(path).strip():
        raise WorkdirError("--workdir is empty: name a folder for checkpoints and logs")
    path = str(path)
    if "://" in path:
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.path.expanduser(path)))


def make(path: epath.Path) -> None:
    """Creates the folder (and parents), or raises WorkdirError saying why it cannot."""
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"cannot use --workdir={path}: it is a file, not a folder; choose "
                           "another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise WorkdirError(f"cannot use --workdir={path}: {reason}; choose a folder you can "
                           "write to") from e


def write_json(path: epath.Path, value: Any) -> None:
    """Writes `value` as strict JSON (NaN/Inf become null), via a temporary file and a rename,
    so a reader never sees half a file."""
    text = json.dumps(_finite(value), indent=2, allow_nan=False)
    temporary = path.parent / f".{path.name}.tmp"
    temporary.write_text(text)
    temporary.replace(path)


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child that nobody has waited for yet is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """`<workdir>/run.lock` while a run trains or evaluates in that folder; a context manager.

    The file is JSON: {"host", "pid", "boot", "token", "started", "heartbeat"}. A background
    thread refreshes "heartbeat" every HEARTBEAT_S seconds.
    """

    def __init__(self, workdir: epath.Path):
        self.path = workdir / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RunLock":
        error = ""
        if jax.process_index() == 0:
            try:
                self._acquire()
            except WorkdirError as e:
                error = str(e)
        if jax.process_count() > 1:  # every process stops, or none does
            failed = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
            if failed and not error:
                error = f"process 0 could not lock {self.path} (see its log)"
        if error:
            raise WorkdirError(error)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "boot": _boot_id(),
                "token": self.token, "started": self.started, "heartbeat": time.time()}

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # half-written by a dying run: treat as stale
            return {}

    def _is_stale(self, holder: dict) -> bool:
        if not holder:
            return True
        if time.time() - float(holder.get("heartbeat", 0)) > STALE_AFTER_S:
            return True
        if holder.get("host") == socket.gethostname():
            if holder.get("boot") != _boot_id():
                return True  # the machine rebooted since
            return not _process_alive(int(holder.get("pid", -1)))
        return False

    def _acquire(self) -> None:
        holder = self._holder()
        if holder is not None:
            if not self._is_stale(holder):
                started = datetime.datetime.fromtimestamp(float(holder["started"]))
                raise WorkdirError(
                    f"{self.path.parent} is in use by another run (pid {holder['pid']} on "
                    f"{holder['host']}, started {started:%Y-%m-%d %H:%M:%S}): wait for it to end "
                    f"or use another --workdir; if that run is gone, delete {self.path}")
            logging.warning("taking over %s from a run that is gone (%s)", self.path,
                            {k: holder.get(k) for k in ("host", "pid")})
            self.path.unlink(missing_ok=True)
        if not self._create():
            raise WorkdirError(f"{self.path.parent} was locked by another run that started at "
                               "the same moment: use another --workdir")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="run.lock")
        self._thread.start()

    def _create(self) -> bool:
        """Writes the lock file unless someone else just did (atomic on local disks)."""
        text = json.dumps(self._record())
        if "://" not in str(self.path):
            try:
                fd = os.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return True
        self.path.write_text(text)  # object stores: last writer wins; check who that was
        return (self._holder() or {}).get("token") == self.token

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if (self._holder() or {}).get("token") == self.token:
                    write_json(self.path, self._record())
            except OSError as e:  # a full or flaky disk must not kill the run
                logging.warning("could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            if (self._holder() or {}).get("token") == self.token:
                self.path.unlink()
        except OSError as e:
            logging.warning("could not remove %s: %s", self.path, e)
