"""One job per run folder: a lock file beside the folder, held with ``fcntl.flock``.

The lock of ``runs/exp`` is ``runs/.exp.edm-lock``: beside the folder, not inside, so it can
be taken before the folder exists and survives the folder's contents being swapped. Where the
folder exists and its parent is not writable (a volume mounted at ``/output`` in a container
whose user may write only inside it), the lock is ``runs/exp/.exp.edm-lock``, inside it (the
manifest and the output checks skip it); a folder that cannot hold its lock either way is
refused as bad input naming the folder's parameter. The
holder keeps an exclusive flock on it for as long as it runs, and writes who it is into it
(pid, host, start time, command). The kernel drops a flock when its process dies, however
it dies, so a second job finds one of three things:

- the flock is held: a live job has the folder; refused, naming it;
- the flock is free but the file names a process on this host: that job died without
  cleaning up (SIGKILL, power loss); the lock is taken over with a warning;
- the flock is free and the file names another host: whether flock reaches across hosts
  depends on the shared filesystem (NFS v4 and Linux NFS v3 clients forward it, some
  network filesystems do not), and this host cannot see that host's processes; refused,
  saying which file to remove once that job is known to be gone.

On release the holder deletes the file while still holding the flock; a job that opened
the file just before sees afterwards that its inode is no longer the one at the path, and
tries again. Where ``fcntl`` does not exist (Windows) folders are not locked (a warning).
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import FolderLockedError
from .inputs import InvalidArgument

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

_log = logging.getLogger(__name__)
LOCK_SUFFIX = ".edm-lock"


def lock_path(folder: str | os.PathLike) -> Path:
    """Where the lock of ``folder`` lives: ``.NAME.edm-lock`` beside it, or inside it when the
    folder exists and its parent is not writable."""
    folder = Path(folder).resolve()
    beside = not folder.is_dir() or os.access(folder.parent, os.W_OK | os.X_OK)
    return (folder.parent if beside else folder) / f".{folder.name}{LOCK_SUFFIX}"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run folder."""

    pid: int
    host: str
    started: str
    command: str

    @classmethod
    def current(cls, command: str | None = None) -> "LockHolder":
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), started, command or " ".join(sys.argv))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}, command: {self.command}"


_UNREADABLE = LockHolder(-1, "(unknown)", "(unknown)", "(the lock file is unreadable)")


def _read_holder(fd: int) -> LockHolder | None:
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
        return None
    try:
        return LockHolder(**json.loads(data))
    except (ValueError, TypeError):
        return _UNREADABLE


def _write_holder(fd: int, holder: LockHolder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(asdict(holder)).encode(), 0)
    os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_dirs(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it created, outermost first."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    for p in missing:
        p.mkdir(exist_ok=True)
    return missing


class FolderLock:
    """Exclusive use of a run folder by one job; a context manager (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, command: str | None = None, parameter: str = "output_dir"):
        """``parameter``: the name under which a folder that cannot hold its lock is refused
        (`InvalidArgument`)."""
        self.folder = Path(folder)
        self.parameter = parameter
        self.path = lock_path(folder)
        self.holder = LockHolder.current(command)
        self._fd: int | None = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "FolderLock":
        """Take the lock or raise `FolderLockedError` naming the holder."""
        if fcntl is None:  # pragma: no cover - Windows
            _log.warning("run folders are not locked on this platform (no fcntl): do not run two jobs on %s", self.folder)
            return self
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        try:
            self._created = _make_dirs(self.path.parent)
            self._fd = self._take()
        except OSError as error:
            self._remove_created()
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise InvalidArgument(self.parameter, f"{str(self.folder)!r}: cannot create its lock {self.path} "
                                  f"({error.strerror or error}); a run folder needs a writable parent folder for its "
                                  "lock, or must exist and be writable itself (its lock then goes inside it)") from None
        except BaseException:
            self._remove_created()
            raise
        return self

    def _take(self) -> int:
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    who = holder.describe() if holder else "a job that is just starting"
                    raise FolderLockedError(
                        f"{self.folder} is in use by another edm_sampling job ({who}); "
                        "wait for it to finish or stop it, or choose another folder"
                    ) from None
                if _same_file(fd, self.path):
                    previous = _read_holder(fd)
                    if previous is not None:
                        self._take_over(previous)
                    _write_holder(fd, self.holder)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the holder released and deleted it meanwhile: try the new file
        raise FolderLockedError(f"{self.folder}: the lock {self.path} keeps changing hands; try again")

    def _take_over(self, previous: LockHolder) -> None:
        if previous.host != self.holder.host:
            raise FolderLockedError(
                f"{self.folder} is locked by a job on another host ({previous.describe()}); this host cannot "
                f"check whether it still runs. If it does not, remove {self.path} and run again"
            )
        state = "is no longer running" if not pid_alive(previous.pid) else "no longer holds it (its pid was reused)"
        _log.warning("taking over the lock of %s: its holder (%s) %s", self.folder, previous.describe(), state)

    def release(self) -> None:
        """Give the folder back (idempotent)."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
