"""Training checkpoints: one safetensors file, written atomically.

The file holds the model, EMA and optimizer tensors and the RNG states under prefixes
(``model.``, ``ema.``, ``optim.``, ``rng.``); everything that is not a tensor (step,
images seen, optimizer hyper-parameters, the run's config) is JSON in the safetensors
metadata. The file is first written to a temporary name in the same folder, flushed to
disk, then moved into place with ``os.replace``, so a crash leaves either the old good
checkpoint or the new one, never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.safetensors"


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


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write ``tensors`` to ``path`` via a temporary file and ``os.replace``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor],
    optimizer: dict,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> None:
    """Save a full training state atomically (see module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, group in (("model.", model), ("ema.", ema), ("rng.", rng)):
        tensors.update({prefix + k: v for k, v in group.items()})
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer)
    tensors.update({"optim." + k: v for k, v in optim_tensors.items()})
    metadata = {"state": json.dumps(state), "optimizer": json.dumps(optim_meta), "format": "edm_sampling.training/1"}
    atomic_save_safetensors(tensors, path, metadata)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on CPU)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "ema": {}, "rng": {}, "optim": {}}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            prefix, name = key.split(".", 1)
            groups[prefix][name] = f.get_tensor(key)
    if metadata.get("format") != "edm_sampling.training/1":
        raise ValueError(f"{str(path)!r} is not an edm_sampling training checkpoint")
    optimizer = unflatten_optimizer_state(groups["optim"], json.loads(metadata["optimizer"]))
    return {
        "model": groups["model"],
        "ema": groups["ema"],
        "rng": groups["rng"],
        "optimizer": optimizer,
        "state": json.loads(metadata["state"]),
    }
