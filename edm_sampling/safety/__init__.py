"""Data safety for every file the package writes: nothing lost, nothing half-done.

- `atomic_write` (and `atomic_write_text`, `atomic_write_bytes`, `append_text`): a file or
  folder is replaced whole or not at all, with the user's umask; `clean_temp_files` removes
  what a killed write left.
- `FolderLock`: one job per output folder, a dead holder's lock taken over.
- `RunFolder`: lock + clean-up + a manifest of what the package wrote, so ``--overwrite``
  replaces only the package's own files and keeps everything else.
- `GracefulStop` / `resume_command`: SIGINT / SIGTERM end a loop between steps.
- `assert_finite_state`: no NaN / inf weights are saved as a model.
- `inputs`: checks of what users type (`InvalidArgument` names the parameter; the CLI shows
  the flag as typed).

Nothing here imports torch at module level.
"""

from .atomic import append_text, atomic_write, atomic_write_bytes, atomic_write_text, clean_temp_files
from .errors import (
    CheckpointDamagedError,
    FolderContentsError,
    FolderLockedError,
    NonFiniteOutputError,
    NonFiniteWeightsError,
    WriteFailedError,
)
from .finite import assert_finite_state
from .inputs import InvalidArgument
from .lock import FolderLock, LockHolder, lock_path
from .runfolder import MANIFEST_NAME, RunFolder, file_sha256
from .signals import GracefulStop, Stopped, resume_command

__all__ = [
    "CheckpointDamagedError",
    "FolderContentsError",
    "FolderLock",
    "FolderLockedError",
    "GracefulStop",
    "InvalidArgument",
    "LockHolder",
    "MANIFEST_NAME",
    "NonFiniteOutputError",
    "NonFiniteWeightsError",
    "RunFolder",
    "Stopped",
    "WriteFailedError",
    "append_text",
    "assert_finite_state",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_temp_files",
    "file_sha256",
    "lock_path",
    "resume_command",
]
