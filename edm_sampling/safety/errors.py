"""The errors the safety layer raises: each is one line naming the file or folder and what to do.

Refusals (bad state found before any work) are ValueErrors, so the CLI prints them as one line
and exits 2; `WriteFailedError` is an OSError (the disk refused a write) that keeps the errno;
`NonFiniteOutputError` (a model returned NaN / inf while sampling) is a RuntimeError.
"""

from __future__ import annotations


class FolderLockedError(ValueError):
    """Another job holds the run folder."""


class FolderContentsError(ValueError):
    """The folder holds files edm_sampling did not write (or that changed since) where it would write."""


class CheckpointDamagedError(ValueError):
    """A checkpoint is truncated, garbled or fails its checksum."""


class NonFiniteWeightsError(ValueError):
    """Weights hold NaN or inf and must not be saved as a model."""


class WriteFailedError(OSError):
    """A write failed (disk full, I/O error); the file it would have replaced is unchanged."""


class NonFiniteOutputError(RuntimeError):
    """The model returned NaN or inf during sampling (the message names the step)."""
