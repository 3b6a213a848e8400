"""The run's folder (--workdir): one absolute path, one run at a time, results as valid JSON.

* `resolve` turns whatever the user typed (`runs/r1`, `~/runs/r1`, `gs://bucket/r1`) into the
  one path the whole run uses. Orbax saves in background threads and refuses relative paths, so
  a relative workdir used as typed loses the run at the first save.
* `RunLock` keeps a second run out of a folder that is in use (two runs in one workdir overwrite
  each other's checkpoints and results): an OS file lock, which a crashed or killed run gives
  up with its process, so it never blocks its own resume; on Cloud Storage an object created
  only if absent (a generation precondition). On several processes only process 0 takes it,
  and every process learns the answer.
* `write_json` writes strict JSON (non-finite numbers become null) atomically.

gs:// paths go through etils.epath's fsspec backend (gcsfs; `startup` turns etils' TensorFlow
backend off) and the lock through google-cloud-storage: both from the [train] extra.

Reading a finished run back is `runs`' job; its config.json is read by `configuration.read`.
"""

import contextlib
import datetime
import errno
import fcntl
import importlib.util
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

from resnet_v2_jax import errors

LOCK_FILE = "run.lock"
HEARTBEAT_S = 60        # the holder rewrites the lock this often
STALE_AFTER_S = 600     # a lock without heartbeat for this long belongs to a dead run


def resolve(path: str) -> epath.Path:
    """`path` made absolute once: `~` expanded, relative paths joined to the current directory,
    URLs such as gs://bucket/run kept as they are."""
    if not path or not str(path).strip():
        raise errors.WorkdirError("--workdir is empty: name a folder for checkpoints and logs")
    path = str(path)
    if path.startswith("gs://") and not _has_gcs_clients():
        raise errors.WorkdirError(f"cannot use {path}: gs:// paths need gcsfs and "
                                  "google-cloud-storage; pip install 'resnet_v2_jax[train]'")
    if "://" in path:
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.path.expanduser(path)))


def _has_gcs_clients() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("gcsfs", "google.cloud.storage"))
    except ModuleNotFoundError:  # no google.cloud at all
        return False


def make(path: epath.Path) -> None:
    """Creates the folder (and parents), or raises errors.WorkdirError saying why it cannot."""
    if path.exists() and not path.is_dir():
        raise errors.WorkdirError(
            f"cannot use --workdir={path}: it is a file, not a folder; choose "
            "another path")
    _make_writable(path, f"cannot use --workdir={path}", "choose a folder you can write to")


def _make_writable(folder: epath.Path, what: str, advice: str) -> None:
    """Creates `folder` (and parents) and writes a probe file there, or raises errors.WorkdirError
    "<what>: <reason>; <advice>"."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{uuid.uuid4().hex}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise errors.WorkdirError(f"{what}: {e.strerror or type(e).__name__}; {advice}") from e


def check_output_file(path: epath.Path, flag: str) -> None:
    """Raises errors.WorkdirError, in one line naming `flag`, unless a file can be written at `path`
    (its folder made if needed): checked before a command does its work, not after."""
    if path.is_dir():
        raise errors.WorkdirError(f"cannot write {flag}={path}: it is a folder; name a file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise errors.WorkdirError(f"cannot write {flag}={path}: {folder} is a file, not a folder")
    _make_writable(path.parent, f"cannot write {flag}={path}", "choose a path you can write to")


def write_json(path: epath.Path, value: Any) -> None:
    """Writes `value` as strict JSON (NaN/Inf become null) so that a reader never sees half a
    file: on a filesystem via a temporary file and a rename; an object store (gs://) replaces
    an object whole, so there it is one upload (a rename there is a copy and a delete)."""
    text = json.dumps(_finite(value), indent=2, allow_nan=False)
    if "://" in str(path):
        path.write_text(text)
        return
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


def _parse(text: str) -> dict:
    """A lock record; {} for an empty or damaged one."""
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class _GcsObject:
    """One Cloud Storage object, written only under a generation precondition: of any number of
    writers racing, `write(text, 0)` succeeds for exactly one while the object is absent, and
    `write(text, g)` for exactly one of those that read generation g (GCS answers the others
    412)."""

    def __init__(self, path: epath.Path):
        from google.cloud import storage  # the [train] extra; only for gs:// workdirs
        bucket, _, self.name = str(path).removeprefix("gs://").partition("/")
        self.bucket = storage.Client().bucket(bucket)

    def _blob(self):
        """A new handle each time: one that has seen a generation reads that one only."""
        return self.bucket.blob(self.name)

    def read(self) -> tuple[Optional[str], int]:
        """(text, generation) of the object; (None, 0) without one."""
        blob = self._blob()
        with _as_os_error() as exceptions:
            try:
                return blob.download_as_text(), blob.generation
            except exceptions.NotFound:
                return None, 0

    def write(self, text: str, generation: int) -> Optional[int]:
        """Writes `text` if the object is at `generation` (0: absent); returns the new
        generation, or None where another writer got there first."""
        blob = self._blob()
        with _as_os_error() as exceptions:
            try:
                blob.upload_from_string(text, if_generation_match=generation)
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                return None
            return blob.generation

    def delete(self, generation: int) -> None:
        with _as_os_error() as exceptions:
            try:
                self._blob().delete(if_generation_match=generation)
            except (exceptions.PreconditionFailed, exceptions.NotFound):
                pass  # another run's now


@contextlib.contextmanager
def _as_os_error():
    """Yields google.api_core.exceptions; an API error left unhandled (403, 5xx after the
    client's retries) becomes the OSError that callers of the lock handle."""
    from google.api_core import exceptions
    try:
        yield exceptions
    except exceptions.GoogleAPICallError as e:
        raise OSError(errno.EIO, f"{e.code} {e.message}") from e


class RunLock:
    """`<workdir>/run.lock` while a run trains in that folder; a context manager. Exactly one
    of any number of runs started at once holds it.

    On a filesystem (local, NFS) the holder keeps an exclusive `flock` on the file: the kernel
    decides who gets it, and releases it when the holder dies, however it dies, so a killed
    run's leftover file is taken over at once and a file being written is never mistaken for a
    dead run's. The file names its holder, as JSON {"host", "pid", "boot", "token", "started",
    "heartbeat"}, for the message a second run gets. Object stores have no locks: there the
    holder rewrites "heartbeat" every HEARTBEAT_S seconds and a lock without one for
    STALE_AFTER_S (or of a dead process on this host) is taken over. On Cloud Storage (gs://)
    every write of the lock is conditional on the generation its writer read (absent, for a
    new lock): of runs starting together, or taking over the same dead run's lock, the store
    lets exactly one write. Elsewhere (other object stores, filesystems without `flock`) the
    last writer wins and two runs started in the same second are not told apart.
    """

    def __init__(self, workdir: epath.Path):
        self.path = workdir / LOCK_FILE
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._fd: Optional[int] = None
        self._gcs: Optional[_GcsObject] = None
        self._generation = 0  # of the lock object this run wrote last (gs://)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "RunLock":
        error = ""
        if jax.process_index() == 0:
            try:
                self._acquire()
            except errors.WorkdirError as e:
                error = str(e)
        if jax.process_count() > 1:  # every process stops, or none does
            failed = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
            if failed and not error:
                error = f"process 0 could not lock {self.path} (see its log)"
        if error:
            raise errors.WorkdirError(error)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _record(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "boot": _boot_id(),
                "token": self.token, "started": self.started, "heartbeat": time.time()}

    def _holder(self) -> Optional[dict]:
        """The record in the lock file; None without a file, {} for an empty or unreadable one
        (being written, or left half-written by a dying run)."""
        try:
            return _parse(self.path.read_text())
        except FileNotFoundError:
            return None
        except OSError:
            return {}

    def _is_stale(self, holder: dict) -> bool:
        """Heartbeat locks: whether `holder` is a run that is gone."""
        if not holder:  # being written now, or half-written long ago
            info = self.path.stat()
            mtime = getattr(info, "mtime", None) or getattr(info, "st_mtime", 0)
            return time.time() - mtime > STALE_AFTER_S
        if time.time() - float(holder.get("heartbeat", 0)) > STALE_AFTER_S:
            return True
        if holder.get("host") == socket.gethostname():
            if holder.get("boot") != _boot_id():
                return True  # the machine rebooted since
            return not _process_alive(int(holder.get("pid", -1)))
        return False

    def _in_use(self, holder: Optional[dict]) -> errors.WorkdirError:
        if not holder:
            return errors.WorkdirError(
                f"{self.path.parent} is in use by another run that is starting: "
                "wait for it or use another --workdir")
        started = datetime.datetime.fromtimestamp(float(holder.get("started", 0)))
        return errors.WorkdirError(
            f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
            f"{holder.get('host')}, started {started:%Y-%m-%d %H:%M:%S}): wait for it to end or "
            f"use another --workdir")

    def _acquire(self) -> None:
        try:
            if str(self.path).startswith("gs://"):
                self._acquire_by_generation()
            elif "://" in str(self.path) or not self._acquire_flock():
                self._acquire_by_heartbeat()
        except OSError as e:  # a full or read-only disk: nothing of ours is left behind
            self.release()
            reason = e.strerror or type(e).__name__
            raise errors.WorkdirError(f"cannot write {self.path}: {reason}; free space or choose "
                                      "another --workdir") from e

    def _acquire_flock(self) -> bool:
        """Takes the OS lock on the file; False where the filesystem has no such locks."""
        for _ in range(100):  # a holder that releases unlinks the file it held: retry then
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder()
                os.close(fd)
                raise self._in_use(holder) from None
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    logging.warning("%s: this filesystem has no file locks (%s); locking by "
                                    "heartbeat instead", self.path, e.strerror)
                    return False
                raise
            try:
                same_file = os.fstat(fd).st_ino == os.stat(str(self.path)).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            self._fd = fd
            previous = self._holder()
            if previous:
                logging.warning("taking over %s from a run that is gone (%s)", self.path,
                                {k: previous.get(k) for k in ("host", "pid")})
            record = json.dumps(self._record()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            os.fsync(fd)
            return True
        raise errors.WorkdirError(
            f"could not lock {self.path}: it keeps changing; use another --workdir")

    def _acquire_by_heartbeat(self) -> None:
        holder = self._holder()
        if holder is not None:
            if not self._is_stale(holder):
                raise self._in_use(holder)
            logging.warning("taking over %s from a run that is gone (%s)", self.path,
                            {k: holder.get(k) for k in ("host", "pid")})
            self.path.unlink(missing_ok=True)
        self.path.write_text(json.dumps(self._record()))  # last writer wins; check who that was
        if (self._holder() or {}).get("token") != self.token:
            raise errors.WorkdirError(
                f"{self.path.parent} was locked by another run that started at "
                "the same moment: use another --workdir")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="run.lock")
        self._thread.start()

    def _acquire_by_generation(self) -> None:
        """Cloud Storage: creates the lock object if absent, or replaces a dead run's lock at
        the generation read; the store refuses every other writer (412)."""
        self._gcs = _GcsObject(self.path)
        record = json.dumps(self._record())
        for _ in range(10):  # a holder that releases between our write and our read: again
            self._generation = self._gcs.write(record, 0) or 0
            if self._generation:
                break
            text, generation = self._gcs.read()
            if text is None:
                continue
            holder = _parse(text)
            if holder.get("token") == self.token:  # our create, retried after a lost answer
                self._generation = generation
                break
            if not self._is_stale(holder):
                raise self._in_use(holder)
            self._generation = self._gcs.write(record, generation) or 0
            if not self._generation:
                raise self._in_use(_parse(self._gcs.read()[0] or ""))
            logging.warning("taking over %s from a run that is gone (%s)", self.path,
                            {k: holder.get(k) for k in ("host", "pid")})
            break
        else:
            raise errors.WorkdirError(f"could not lock {self.path}: it keeps changing; use another "
                               "--workdir")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="run.lock")
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and self._refresh():
            pass

    def _refresh(self) -> bool:
        """Rewrites the heartbeat of the lock; False once another run has taken it over."""
        try:
            if self._gcs is not None:
                generation = self._gcs.write(json.dumps(self._record()), self._generation)
                if generation is None:
                    logging.error("%s was taken over by another run: this run no longer holds "
                                  "it", self.path)
                    return False
                self._generation = generation
            elif (self._holder() or {}).get("token") == self.token:
                write_json(self.path, self._record())
        except OSError as e:  # a full disk or a flaky network must not kill the run
            logging.warning("could not refresh %s: %s", self.path, e)
        return True

    def release(self) -> None:
        """Removes the lock file if this run holds it (then lets go of the OS lock)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            try:
                if self._gcs is not None:
                    text, generation = self._gcs.read()
                    if _parse(text or "").get("token") == self.token:
                        self._gcs.delete(generation)
                elif (self._holder() or {}).get("token") == self.token:
                    self.path.unlink()
            except OSError as e:
                logging.warning("could not remove %s: %s", self.path, e)
        if self._fd is not None:
            try:
                self.path.unlink()  # while still held: a run waiting on this file retries
            except OSError as e:
                logging.warning("could not remove %s: %s", self.path, e)
            os.close(self._fd)
            self._fd = None
