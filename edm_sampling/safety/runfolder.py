"""A job's hold on its output folder: lock, clean-up, a manifest of what the package wrote,
and the rules of ``--overwrite`` / ``--resume``.

    with RunFolder(out, "edm-sampling train ...", outputs=("checkpoint.safetensors", "pipeline/")) as run:
        ...                # every atomic_write below `out` is recorded in the manifest
        run.commit()       # the job is done: files of earlier runs that it did not rewrite go

A fresh run and ``--overwrite`` open it alike (whether a non-empty folder may be reused is the
command's check, made with the lock held); ``resume=True`` continues the run recorded in the
manifest, and ``resume=NAME`` the run that wrote the file NAME (the checkpoint being resumed: an
``--overwrite`` run killed before its first checkpoint leaves the old run's checkpoint, and
resuming it continues the old run), so `commit` keeps what the earlier jobs of that run wrote.

On entering, under the folder's `FolderLock`, the temporaries of interrupted writes are
removed (`clean_temp_files`) and the declared ``outputs`` (files, or folders replaced as a
whole) are checked: each existing file at or below them must be one the package wrote and
nobody changed since, else `FolderContentsError` names them before any work starts.

The manifest, ``.edm_sampling-manifest.json``, holds each written file's size, sha256 and
(inode, mtime) and the run that wrote it. A file is "ours" when its size matches and either its
(inode, mtime) or its sha256 does; the first test is free, the second survives a copy of the
folder. Before a write replaces anything, the new records are saved as "pending" (write-ahead),
so a kill between the rename and the next manifest save still leaves the file recognised.

``--overwrite`` never deletes at the start: the new run's files replace the old ones one by one
as they are written, so until then the old ones stay intact (a new training run killed before its
first checkpoint leaves the old checkpoint in place). `commit` then deletes the files of earlier
runs that this run did not rewrite, only if unchanged. Files the package did not write are kept
where they are, and refused only where the run would have to replace them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Iterable

from .atomic import TEMP_PATTERN, atomic_write, clean_temp_files, observe, unobserve
from .errors import FolderContentsError
from .lock import LOCK_SUFFIX, FolderLock

_log = logging.getLogger(__name__)
MANIFEST_NAME = ".edm_sampling-manifest.json"
MANIFEST_FORMAT = "edm_sampling.manifest/1"


def is_internal(name: str) -> bool:
    """The safety layer's own files: temporaries, lock files, manifests."""
    return (
        name == MANIFEST_NAME
        or TEMP_PATTERN.match(name) is not None
        or (name.startswith(".") and name.endswith(LOCK_SUFFIX))
    )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, run: str) -> dict:
    """What the manifest keeps about a file it wrote."""
    st = path.stat()
    return {"size": st.st_size, "sha256": file_sha256(path), "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "run": run}


def record_matches(record: dict, path: Path) -> bool:
    """Whether ``path`` still holds what ``record`` describes (size, then inode+mtime or sha256)."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    if not path.is_file() or st.st_size != record["size"]:
        return False
    if (st.st_ino, st.st_mtime_ns) == (record.get("ino"), record.get("mtime_ns")):
        return True
    return file_sha256(path) == record["sha256"]


def files_below(path: Path) -> list[Path]:
    """Every file at or below ``path`` except the safety layer's own, sorted."""
    if not path.is_dir():
        return [path] if path.exists() or path.is_symlink() else []
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not is_internal(d))
        found += [Path(root) / f for f in sorted(files) if not is_internal(f)]
    return found


def check_folder_replaceable(old: Path, new: Path) -> None:
    """Replacing the folder ``old`` by ``new`` (outside a run folder, with no manifest to ask) may
    not delete anything: `FolderContentsError` naming the files of ``old`` that ``new`` does not
    have (a user's notes in an exported pipeline folder)."""
    kept = {f.relative_to(new).as_posix() for f in files_below(new)}
    lost = [f.relative_to(old).as_posix() for f in files_below(old) if f.relative_to(old).as_posix() not in kept]
    if lost:
        raise FolderContentsError(
            f"{old}: replacing it would delete {_listing(lost)}, which edm_sampling would not write again; "
            "move them out of the folder and run again (nothing was changed)"
        )


def _new_run_id() -> str:
    return f"{datetime.datetime.now():%Y%m%dT%H%M%S}-{os.getpid()}-{secrets.token_hex(3)}"


def _listing(names: list[str], limit: int = 10) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class RunFolder:
    """Exclusive, recorded use of an output folder by one job (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike,
        command: str | None = None,
        *,
        resume: bool | str = False,
        outputs: Iterable[str] = (),
        parameter: str = "output_dir",
    ):
        """``resume``: False for a new run; True to continue the manifest's run; a file name (inside
        the folder) to continue the run that wrote that file, or the manifest's run if it changed
        since. ``parameter``: the name under which a folder that cannot be locked is refused."""
        self.path = Path(path)
        self.root = self.path.resolve()
        self.resume = resume
        self.outputs = tuple(outputs)
        self.lock = FolderLock(self.path, command, parameter)
        self.cleaned: list[str] = []
        self.run_id = ""
        self._files: dict[str, dict] = {}
        self._pending: dict[str, dict] = {}
        self._replacing: str | None = None
        self._unsaved = False
        self._mutex = threading.RLock()

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    # ---- entering and leaving ------------------------------------------------------------
    def __enter__(self) -> "RunFolder":
        self.lock.acquire()
        try:
            if self.root.is_dir():
                self.cleaned = clean_temp_files(self.root)
            run = self._load()
            if isinstance(self.resume, str):
                run = self.writer(self.resume) or run
            self.run_id = run if self.resume and run else _new_run_id()
            self.check_replaceable(self.root / name for name in self.outputs)
            observe(self)
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        unobserve(self)
        try:
            if self._unsaved:
                self._save()
        except OSError as error:  # the pending records already on disk keep the next start right
            _log.warning("could not update %s: %s", self.manifest_path, error)
        finally:
            self.lock.release()
        return False

    def _load(self) -> str | None:
        """Read the manifest; settle the pending records of a write that was interrupted."""
        try:
            data = json.loads(self.manifest_path.read_text())
            if data.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            files = dict(data["files"])
            for rel, record in data["pending"].items():
                if record_matches(record, self.root / rel):
                    files[rel] = record
            self._files = {rel: r for rel, r in files.items() if (self.root / rel).is_file()}
        except FileNotFoundError:
            return None
        except (ValueError, OSError, AttributeError, KeyError, TypeError) as error:
            _log.warning("ignoring the unreadable manifest %s (%s): its files count as not written by edm_sampling",
                         self.manifest_path, error)
            self._files = {}
            return None
        return data.get("run")

    def _save(self) -> None:
        payload = {"format": MANIFEST_FORMAT, "run": self.run_id, "files": self._files, "pending": self._pending}
        text = json.dumps(payload, indent=1, sort_keys=True) + "\n"
        atomic_write(self.manifest_path, lambda tmp: tmp.write_text(text))
        self._unsaved = False

    # ---- what is ours ----------------------------------------------------------------------
    def _rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def _record(self, path: str | os.PathLike) -> dict | None:
        """The manifest's record of ``path`` (relative to the folder, or absolute) if the package
        wrote it and it is unchanged."""
        path = self.root / path
        record = self._files.get(self._rel(path))
        return record if record is not None and record_matches(record, path) else None

    def owned(self, path: str | os.PathLike) -> bool:
        """Whether the package wrote ``path`` (inside the folder) and it is unchanged since."""
        return self._record(path) is not None

    def writer(self, path: str | os.PathLike) -> str | None:
        """The run that wrote ``path`` (inside the folder), if the package wrote it and it is unchanged."""
        record = self._record(path)
        return record.get("run") if record is not None else None

    def own_files(self) -> list[str]:
        """Files in the folder that the package wrote and nobody changed since."""
        return sorted(rel for rel in self._files if self.owned(rel))

    def keep(self, paths: Iterable[str | os.PathLike]) -> None:
        """Record files this run found valid by its own check and uses as they are (a checkpoint
        whose checksum holds, a cache whose key matches) as this run's: later writes may replace
        them and `commit` keeps them, whoever wrote them."""
        with self._mutex:
            for path in paths:
                path = self.root / path
                if path.is_file():
                    self._files[self._rel(path)] = file_record(path, self.run_id)
                    self._unsaved = True

    def foreign_files(self) -> list[str]:
        """Files in the folder that the package did not write, or that changed since."""
        return sorted(self._rel(f) for f in files_below(self.root) if not self.owned(f))

    def check_replaceable(self, paths: Iterable[Path]) -> None:
        """`FolderContentsError` naming every file at or below ``paths`` that is not ours."""
        offenders = [self._rel(f) for p in paths for f in files_below(Path(p).resolve()) if not self.owned(f)]
        if offenders:
            raise FolderContentsError(
                f"{self.path}: {_listing(offenders)} would be replaced, but edm_sampling did not write "
                f"{'them' if len(offenders) > 1 else 'it'} or {'they' if len(offenders) > 1 else 'it'} changed since; "
                "move them out of the folder and run again (nothing was changed)"
            )

    # ---- WriteObserver: called by atomic_write ----------------------------------------------
    def covers(self, path: Path) -> bool:
        if is_internal(path.name):
            return False
        try:
            return path.resolve().relative_to(self.root) != Path(".")
        except ValueError:
            return False

    def before_replace(self, path: Path, tmp: Path, previous: Path | None) -> None:
        with self._mutex:
            rel = self._rel(path)
            self.check_replaceable([path] + ([previous] if previous is not None else []))
            if tmp.is_dir():
                pending = {f"{rel}/{f.relative_to(tmp).as_posix()}": file_record(f, self.run_id) for f in files_below(tmp)}
            else:
                pending = {rel: file_record(tmp, self.run_id)}
            if previous is not None and rel in self._files:
                pending[self._rel(previous)] = dict(self._files[rel])
            self._pending, self._replacing = pending, rel
            self._save()

    def after_replace(self, path: Path) -> None:
        with self._mutex:
            prefix = f"{self._replacing}/"
            self._files = {rel: r for rel, r in self._files.items() if not rel.startswith(prefix)}
            self._files.update(self._pending)
            self._pending, self._unsaved = {}, True

    # ---- the end of a job ----------------------------------------------------------------
    def commit(self) -> list[str]:
        """Delete the files earlier runs wrote that this run did not rewrite (unchanged ones
        only; a changed one is left and no longer counted as ours). Returns what was deleted."""
        with self._mutex:
            deleted, changed = [], []
            for rel, record in sorted(self._files.items()):
                if record.get("run") == self.run_id:
                    continue
                path = self.root / rel
                if record_matches(record, path):
                    path.unlink()
                    deleted.append(rel)
                else:
                    changed.append(rel)
                del self._files[rel]
            for rel in deleted:
                for folder in (self.root / rel).parents:
                    if folder == self.root or not folder.is_dir() or any(folder.iterdir()):
                        break
                    folder.rmdir()
            if changed:
                _log.warning("%s: kept %s from an earlier run (changed since it was written)", self.path, _listing(changed))
            self._save()
            return deleted
