"""Atomic writes: a file or folder is either the old one or the complete new one, never half.

`atomic_write(path, writer)` lets ``writer`` fill a temporary ``.NAME.PID-RANDOM.edm-tmp`` in
the same folder, gives it the modes of the user's umask (0644 / 0755 under umask 022) and
fsyncs it (every file and folder of it, for a folder), moves it into place with ``os.replace`` and fsyncs
the folder, so the rename too survives a power cut. On any error the temporary is removed and
the old file is left as it was; an OSError (disk full, I/O error) comes back as
`WriteFailedError` saying so. An existing folder is swapped in two renames through
``.NAME.PID-RANDOM.edm-old``; `clean_temp_files` (run at the next start) removes what a killed
process left and puts back an old folder caught between the two renames.

A `RunFolder` that is open in this process is told about every write under its folder
(`observe`), which is how its manifest learns what the package wrote.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

from .errors import WriteFailedError

_log = logging.getLogger(__name__)
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.edm-(?P<kind>tmp|old)$")


class WriteObserver(Protocol):
    """What `atomic_write` tells an open run folder (see `RunFolder`)."""

    def covers(self, path: Path) -> bool: ...

    def before_replace(self, path: Path, tmp: Path, previous: Path | None) -> None: ...

    def after_replace(self, path: Path) -> None: ...


_observers: list[WriteObserver] = []


def observe(observer: WriteObserver) -> None:
    """Tell ``observer`` about every later atomic write it `covers` (until `unobserve`)."""
    _observers.append(observer)


def unobserve(observer: WriteObserver) -> None:
    if observer in _observers:
        _observers.remove(observer)


def _observer_for(path: Path) -> WriteObserver | None:
    return next((o for o in reversed(_observers) if o.covers(path)), None)


def observed(path: str | os.PathLike) -> bool:
    """Whether an open `RunFolder` records writes to ``path`` (it then guards what they replace)."""
    return _observer_for(Path(path)) is not None


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """A fresh name beside ``path`` in our temporary pattern (``kind``: "tmp" or "old")."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.edm-{kind}")


def fsync_dir(folder: Path) -> None:
    """Make the renames inside ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def settle_tree(path: Path) -> None:
    """Give a written file, or every file and folder below a written folder, the modes the
    user's umask gives new files (0644 / 0755 under umask 022: some writers, safetensors
    among them, create 0600 files) and fsync it."""
    umask = current_umask()
    if not path.is_dir():
        _settle_file(path, umask)
        return
    for root, _, files in os.walk(path):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            _settle_file(Path(root) / name, umask)
        fsync_dir(Path(root))


def _settle_file(path: Path, umask: int) -> None:
    if path.is_symlink():  # its target is not ours to change
        return
    os.chmod(path, 0o666 & ~umask)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def remove_path(path: Path) -> None:
    """Remove a file or folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write(
    path: str | os.PathLike,
    writer: Callable[[Path], Any],
    *,
    folder: bool = False,
    keep_previous: str | os.PathLike | None = None,
    check: Callable[[Path], Any] | None = None,
) -> Path:
    """Write ``path`` (a file, or a folder with ``folder=True``) by calling ``writer(tmp)``.

    ``writer`` fills the temporary path it is given (the file already exists, empty; the
    folder exists, empty). ``check(tmp)`` may inspect the written result before it replaces
    anything. With ``keep_previous``, the file ``path`` held so far becomes that file (a hard
    link, so no copy), which makes two good versions on disk at every moment after the first.
    """
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise ValueError(f"{path} exists and is {'not ' if folder else ''}a folder")
    existed = path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    observer = _observer_for(path)
    previous = Path(keep_previous) if keep_previous is not None and existed else None
    try:
        if folder:
            os.mkdir(tmp)
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        writer(tmp)
        settle_tree(tmp)
        if check is not None:
            check(tmp)
        if observer is not None:
            observer.before_replace(path, tmp, previous)
        if previous is not None:
            _link_previous(path, previous)
        if folder and existed:
            _swap_folder(tmp, path)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except WriteFailedError:  # the manifest's own write, already explained
        remove_path(tmp)
        raise
    except OSError as error:
        remove_path(tmp)
        outcome = "the previous one is unchanged" if existed else "nothing was written"
        raise WriteFailedError(error.errno, f"could not write {path}: {error.strerror or error}; {outcome}") from error
    except BaseException:
        remove_path(tmp)
        raise
    if observer is not None:
        observer.after_replace(path)
    return path


def _link_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` hold what ``path`` holds now (hard link; a copy where links fail)."""
    tmp = temp_path(previous)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copy2(path, tmp)
        os.replace(tmp, previous)
    except BaseException:
        remove_path(tmp)
        raise


def _swap_folder(tmp: Path, path: Path) -> None:
    """Replace the folder ``path`` by ``tmp``; a crash between the renames is undone by
    `clean_temp_files`, which moves the old folder back."""
    aside = temp_path(path, "old")
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """`atomic_write` of ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of ``text`` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def append_text(path: str | os.PathLike, text: str) -> Path:
    """Append ``text`` by rewriting the whole file atomically: a crash never leaves half a
    line (meant for small logs; the cost grows with the file)."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    return atomic_write_bytes(path, old + text.encode("utf-8"))


def is_internal_name(name: str) -> bool:
    """Whether ``name`` is one of the safety layer's own temporary names."""
    return TEMP_PATTERN.match(name) is not None


def clean_temp_files(folder: str | os.PathLike) -> list[str]:
    """Remove the temporaries of interrupted writes below ``folder`` (only our own pattern).

    An ``.edm-old`` folder whose original name is missing was caught between the two renames
    of a folder swap: it is moved back instead. Returns what was done, one line per item.
    Call it only while holding the folder's lock, so no live write loses its temporary.
    """
    done: list[str] = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            match = TEMP_PATTERN.match(name)
            if match is None:
                continue
            item = Path(root) / name
            original = Path(root) / match.group("name")
            if match.group("kind") == "old" and not original.exists():
                os.replace(item, original)
                done.append(f"restored {original} (a folder replacement was interrupted)")
            else:
                remove_path(item)
                done.append(f"removed {item} (left by an interrupted write)")
        dirs[:] = [d for d in dirs if TEMP_PATTERN.match(d) is None]
    for line in done:
        _log.warning(line)
    return done
