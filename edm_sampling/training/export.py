"""Export a trained EDM UNet as a diffusers pipeline folder.

The folder holds the UNet (EMA weights; the augmentation projection is dropped, which is
exact at sampling because the augmentation vector is zero there) and
`edm_sampling.schedulers.EDMScheduler` configured by the model's family object
(model_family="edm", sigma_data): its state is kept in the UNet's input scale c_in, its
timesteps are c_noise = ln(sigma)/4 (what the trainer fed the UNet) and its `step` forms
D = c_skip x + c_out F. `EDMPipeline.from_pretrained(folder)`, or
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` in a process that has not
imported edm_sampling, gives back `edm_sampling.pipelines.EDMPipeline`, offline.

The folder is written next to its final place and moved in with `os.replace`; an existing
folder is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from edm_sampling.families import EDM


def _edm_parts(source: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(UNet, EDMScheduler config of its family) from a Trainer (its EMA) or a denoiser built by
    `precondition`."""
    denoiser = getattr(source, "ema", source)
    denoiser = getattr(denoiser, "module", denoiser)
    family = getattr(denoiser, "family", None)
    if not isinstance(family, EDM):
        name = family.name if family is not None else type(denoiser).__name__
        raise ValueError(f"only EDM-preconditioned models can be exported for EDMScheduler, got {name!r}")
    net = denoiser.net
    if getattr(net, "fourier", False):
        raise ValueError("a fourier UNet2DModel cannot be exported: the scheduler feeds it c_noise, not exp(c_noise)")
    return net.unet, family.scheduler_config()


def build_pipeline(source: Any):
    """An `EDMPipeline` (UNet copy + the EDMScheduler its family describes)."""
    from edm_sampling.pipelines import EDMPipeline
    from edm_sampling.schedulers import EDMScheduler

    unet, scheduler_config = _edm_parts(source)
    unet = copy.deepcopy(unet).to("cpu").float().eval()
    scheduler = EDMScheduler(**scheduler_config)
    return EDMPipeline(unet=unet, scheduler=scheduler)


def export_pipeline(source: Any, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the pipeline folder for ``source`` (a Trainer, or an EDM denoiser from `precondition`)."""
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ValueError(f"export folder {str(folder)!r} already exists; pass overwrite=True to replace it")
    pipe = build_pipeline(source)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
            os.replace(folder, old / "x")
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
