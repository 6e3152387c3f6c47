"""Training checkpoints: one safetensors file, written atomically, with a checksum.

The file holds the model, EMA and optimizer tensors and the RNG states under prefixes
(``model.``, ``ema.``, ``optim.``, ``rng.``); everything that is not a tensor (step,
images seen, optimizer hyper-parameters, the run's config) is JSON in the safetensors
metadata, together with ``sha256``: a digest of every tensor's name, dtype, shape and bytes
and of every other metadata entry (`content_digest`). Any change after writing, a flipped bit
in a weight or in the header or a truncation, is therefore found when the file is loaded,
and reported as one `CheckpointDamagedError` naming the file and what to do.

Saving writes a temporary file in the same folder, fsyncs it, reads it back and checks its
digest, and only then moves it into place (`edm_sampling.safety.atomic_write`). The
checkpoint it replaces becomes ``checkpoint.prev.safetensors`` (a hard link, no copy): from
the second save on there are always two good checkpoints on disk, and a kill at any moment
leaves at least the older one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from edm_sampling.safety import CheckpointDamagedError, atomic_write

CHECKPOINT_NAME = "checkpoint.safetensors"
FORMAT = "edm_sampling.training/2"
LEGACY_FORMAT = "edm_sampling.training/1"  # no checksum: loaded with a warning
_log = logging.getLogger(__name__)


def flatten_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    for index, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            name = f"{index}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                extra[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": extra}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def previous_checkpoint_path(path: str | os.PathLike) -> Path:
    """``checkpoint.prev.safetensors`` beside ``checkpoint.safetensors``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def content_digest(tensors: Iterable[tuple[str, torch.Tensor]], metadata: Mapping[str, str]) -> str:
    """sha256 over each (name, dtype, shape, bytes) of ``tensors`` (give them in name order)
    and each metadata entry in key order, except ``sha256`` itself; every field is
    length-delimited, so no two different contents give the same byte stream."""
    digest = hashlib.sha256()

    def fields(*texts: str) -> bytes:
        return b"".join(len(data).to_bytes(8, "little") + data for data in (text.encode() for text in texts))

    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        digest.update(fields("tensor", name, str(tensor.dtype), str(tuple(tensor.shape)), str(data.nbytes)))
        digest.update(data)
    for key in sorted(metadata):
        if key != "sha256":
            digest.update(fields("meta", key, metadata[key]))
    return digest.hexdigest()


def _cpu_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses tensors that share memory)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' save_file, with its I/O failures raised as OSError (it wraps them)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from error


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write ``tensors`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    cpu = _cpu_copies(tensors)
    return atomic_write(path, lambda tmp: _save_file(cpu, tmp, metadata))


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep_previous: bool = True,
) -> Path:
    """Save a full training state: checksummed, verified, atomic (see the module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, group in (("model.", model), ("ema.", ema), ("rng.", rng)):
        tensors.update({prefix + k: v for k, v in group.items()})
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer)
    tensors.update({"optim." + k: v for k, v in optim_tensors.items()})
    tensors = _cpu_copies(tensors)
    metadata = {"state": json.dumps(state), "optimizer": json.dumps(optim_meta), "format": FORMAT}
    metadata["sha256"] = content_digest(sorted(tensors.items()), metadata)
    path = Path(path)

    def verify(tmp: Path) -> None:
        try:
            _read(tmp, keep=False)
        except _Damage as damage:
            raise CheckpointDamagedError(
                f"checkpoint {path} failed its check right after writing ({damage}); the previous one is unchanged"
            ) from None

    return atomic_write(
        path,
        lambda tmp: _save_file(tensors, tmp, metadata),
        keep_previous=previous_checkpoint_path(path) if keep_previous else None,
        check=verify,
    )


class _Damage(Exception):
    """Why a checkpoint file cannot be trusted (turned into CheckpointDamagedError)."""


def _size_problem(path: Path) -> str | None:
    """Compare the file's size with what its safetensors header says (8-byte length, JSON header,
    data): a truncated or extended file, or a garbled header."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"truncated: {size} bytes"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"truncated: {size} bytes, its header alone needs {8 + length}"
        try:
            header = json.loads(handle.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return "its header is garbled"
    expected = 8 + length + end
    if size < expected:
        return f"truncated: {size} of {expected} bytes"
    if size > expected:
        return f"{size - expected} bytes more than its header describes"
    return None


def _read(path: Path, keep: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors if ``keep`` else {}, metadata) of a checkpoint whose checksum holds.

    Tensors are read one at a time, so checking a file (``keep=False``) needs the memory of
    its largest tensor only. Raises `_Damage`, ValueError (not a checkpoint) or OSError."""
    from safetensors import safe_open

    problem = _size_problem(path)
    if problem:
        raise _Damage(problem)
    kept: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}

            def items():
                for key in sorted(handle.keys()):
                    tensor = handle.get_tensor(key)
                    if keep:
                        kept[key] = tensor
                    yield key, tensor

            digest = content_digest(items(), metadata)
    except OSError:
        raise
    except Exception as error:  # safetensors reports a garbled file with its own error types
        raise _Damage(f"unreadable: {error}") from None
    form = metadata.get("format", "")
    if "sha256" not in metadata:
        if form == LEGACY_FORMAT:
            _log.warning("%s was written without a checksum (an older edm_sampling); loading it unverified", path)
            return kept, metadata
        if form.startswith("edm_sampling.training"):
            raise _Damage("no checksum recorded")
    elif metadata["sha256"] != digest:
        raise _Damage("checksum mismatch: its contents changed after it was written")
    if form != FORMAT:
        raise ValueError(f"{str(path)!r} is not an edm_sampling training checkpoint")
    return kept, metadata


def _recovery_hint(path: Path) -> str:
    """What the user can do about a damaged checkpoint: the previous one, if it is intact."""
    previous = previous_checkpoint_path(path)
    if not previous.is_file():
        return "no earlier checkpoint is kept; start over with --overwrite"
    try:
        step = json.loads(_read(previous, keep=False)[1]["state"])["step"]
    except (_Damage, ValueError, OSError, KeyError, TypeError):
        return f"the previous checkpoint {previous} is damaged too; start over with --overwrite"
    move = shlex.join(["mv", str(previous), str(path)])
    return f"the previous checkpoint {previous} (step {step}) is intact: to continue from it, run `{move}` and resume again, or start over with --overwrite"


def checkpoint_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The state a checkpoint records (step, config, ...), from its header alone, without the
    checksum (for messages, and the settings a resumed CLI run starts from before the load checks
    the file); None if the header cannot be read."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(min(length, 1 << 26)))
        state = json.loads(header["__metadata__"]["state"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if isinstance(state, dict) else None


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step a checkpoint records, from its header alone (`checkpoint_state`); None if the
    header cannot be read."""
    try:
        return int((checkpoint_state(path) or {})["step"])
    except (KeyError, TypeError, ValueError):
        return None


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint without keeping its tensors; returns its state (step, config, ...).
    Raises `CheckpointDamagedError` / ValueError like :func:`load_checkpoint`."""
    return json.loads(_load(Path(path), keep=False)[1]["state"])


def _load(path: Path, keep: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        return _read(path, keep)
    except _Damage as damage:
        raise CheckpointDamagedError(f"checkpoint {path} is damaged ({damage}); {_recovery_hint(path)}") from None
    except OSError as error:
        raise ValueError(f"cannot read checkpoint {path}: {error.strerror or error}") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on CPU), after checking
    its size against its header and its checksum (`CheckpointDamagedError` otherwise)."""
    tensors, metadata = _load(Path(path), keep=True)
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "rng": {}, "optim": {}}
    for key, tensor in tensors.items():
        prefix, name = key.split(".", 1)
        groups[prefix][name] = tensor
    optimizer = unflatten_optimizer_state(groups["optim"], json.loads(metadata["optimizer"]))
    return {
        "model": groups["model"],
        "ema": groups["ema"],
        "rng": groups["rng"],
        "optimizer": optimizer,
        "state": json.loads(metadata["state"]),
    }
