"""Export a trained or fine-tuned UNet as a diffusers pipeline folder.

Fine-tuned pretrained models go back into the user's own pipeline: the same pipeline class,
every component other than the UNet copied byte for byte (VAE, text encoder, tokenizer,
feature extractor, safety checker), the EMA UNet saved anew, and the scheduler the user
picks: EDMScheduler (its config mapped from the original) or the original one, untouched.
Note that DDIMPipeline turns any scheduler it is given into a DDIMScheduler when it is
built; set ``pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config)`` after loading.

A UNet trained from scratch with the EDM recipe: the folder holds the UNet (EMA weights; the
augmentation projection is dropped, which is exact at sampling because the augmentation
vector is zero there) and `edm_sampling.schedulers.EDMScheduler` configured by the model's
family object (model_family="edm", sigma_data): its state is kept in the UNet's input scale
c_in, its timesteps are c_noise = ln(sigma)/4 (what the trainer fed the UNet) and its `step`
forms D = c_skip x + c_out F. `EDMPipeline.from_pretrained(folder)`, or
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` in a process that has not
imported edm_sampling, gives back `edm_sampling.pipelines.EDMPipeline`, offline.

The folder is written next to its final place and moved in whole (`safety.atomic_write`: the
user's umask, an interrupted write never half-replaces it); an existing folder is replaced
only with ``overwrite=True``, and never so that a file edm_sampling did not write is lost: inside
a run folder its manifest says which files are the package's, elsewhere every file of the old
folder must be one the new export writes again.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from edm_sampling.families import EDM, Family
from edm_sampling.safety import atomic_write
from edm_sampling.safety.atomic import observed
from edm_sampling.safety.runfolder import check_folder_replaceable


def _edm_parts(source: Any) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(UNet, EDMScheduler config of its family) from a Trainer (its EMA) or a denoiser built by
    `precondition`."""
    denoiser = getattr(source, "ema", source)
    denoiser = getattr(denoiser, "module", denoiser)
    family = getattr(denoiser, "family", None)
    if not isinstance(family, EDM):
        name = family.name if isinstance(family, Family) else type(denoiser).__name__
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
    return EDMPipeline(unet=unet, scheduler=EDMScheduler(**scheduler_config))


def _ema_unet(trainer: Any) -> torch.nn.Module:
    """A float32 CPU copy of the trainer's EMA UNet (the augmentation projection left out), its
    ``sample_size`` the size it was trained at (pipelines sample at that size by default)."""
    unet = copy.deepcopy(trainer.ema.net.unet).to("cpu").float().eval()
    height, width = trainer.sample_shape[1:]
    unet.register_to_config(sample_size=height if height == width else [height, width])
    return unet


def _scheduler(config: dict[str, Any], choice: str) -> Any:
    """The exported scheduler: ``EDMScheduler.from_config`` or the original diffusers class."""
    import diffusers

    from edm_sampling.schedulers import EDMScheduler

    if choice == "edm":
        return EDMScheduler.from_config(config)
    name = config.get("_class_name", "DDPMScheduler")
    cls = EDMScheduler if name == EDMScheduler.__name__ else getattr(diffusers, name, diffusers.DDPMScheduler)
    return cls.from_config(config)


def _write_finetuned(trainer: Any, tmp: Path, choice: str) -> None:
    """The user's pipeline folder with the EMA UNet written anew; every other file copied as is
    (byte-identical), the scheduler replaced by EDMScheduler if ``choice`` is "edm"."""
    from edm_sampling.schedulers import EDMScheduler

    folder = trainer.pretrained
    unet = _ema_unet(trainer)
    if folder.index is None:  # a bare UNet: the smallest pipeline that samples it
        from diffusers import DDPMPipeline

        from edm_sampling.pipelines import EDMPipeline

        scheduler = _scheduler(folder.scheduler_config, choice)
        cls = EDMPipeline if folder.num_classes or folder.family == "edm" else DDPMPipeline
        cls(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        return
    for entry in sorted(folder.root.iterdir()):
        target = tmp / entry.name
        if entry.name == "unet":
            unet.save_pretrained(target, safe_serialization=True)
        elif entry.name == "scheduler" and choice == "edm":
            EDMScheduler.from_config(folder.scheduler_config).save_pretrained(target)
        elif entry.name == "model_index.json" and choice == "edm":
            index = dict(folder.index, scheduler=[EDMScheduler.__module__, EDMScheduler.__name__])
            target.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        elif entry.is_dir():
            shutil.copytree(entry, target)  # links followed: a hub cache snapshot links into its blobs
        else:
            shutil.copy2(entry, target)


def _write_scratch(trainer: Any, tmp: Path, choice: str) -> None:
    """A new UNet: EDM family -> EDMPipeline + EDMScheduler("edm"); the DDPM recipe ->
    DDPMPipeline with DDPMScheduler ("original") or EDMScheduler ("edm")."""
    if trainer.family == "edm":
        build_pipeline(trainer).save_pretrained(tmp, safe_serialization=True)
        return
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=_ema_unet(trainer), scheduler=_scheduler(DDPMScheduler().config, choice))
    pipe.save_pretrained(tmp, safe_serialization=True)


def export_pipeline(source: Any, folder: str | os.PathLike, overwrite: bool = False, scheduler: str = "edm") -> Path:
    """Write the pipeline folder for ``source``: a Trainer (its EMA UNet), or an EDM denoiser
    from `precondition`.

    A fine-tuned pretrained model goes back into the user's own pipeline class and
    components (``scheduler``: "edm" for EDMScheduler, "original" for the model's own); a
    new one into EDMPipeline (EDM recipe) or DDPMPipeline (DDPM recipe). Loading a folder
    with EDMScheduler / EDMPipeline needs ``import edm_sampling.pipelines`` first.
    """
    if scheduler not in ("edm", "original"):
        raise ValueError(f"--export-scheduler must be 'edm' or 'original', got {scheduler!r}")
    if getattr(source, "pretrained", None) is not None:
        write = lambda tmp: _write_finetuned(source, tmp, scheduler)  # noqa: E731
    elif hasattr(source, "family"):
        write = lambda tmp: _write_scratch(source, tmp, scheduler)  # noqa: E731
    else:
        pipe = build_pipeline(source)
        write = lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True)  # noqa: E731
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise ValueError(f"export folder {str(folder)!r} already exists; pass overwrite=True to replace it")
    guard = None if observed(folder) or not folder.is_dir() else (lambda tmp: check_folder_replaceable(folder, tmp))
    return atomic_write(folder, write, folder=True, check=guard)
