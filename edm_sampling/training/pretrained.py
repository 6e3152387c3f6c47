"""Pretrained diffusers models to fine-tune: check the folder, pick the family, load the parts.

``--pretrained PATH`` is a local pipeline folder (``model_index.json`` with a ``unet`` and a
``scheduler``: DDPMPipeline, DDIMPipeline, StableDiffusionPipeline, our EDMPipeline, ...) or a
bare UNet2DModel folder plus ``--scheduler-config``. Everything is checked from the JSON files
before a weight is loaded or anything is written.

The model keeps its own preconditioning: :func:`pretrained_family` (the one place that decides
it, from the scheduler config) gives "ddpm" for DDPM-family schedulers (discrete VP with
epsilon, v or sample prediction: the core `DiscreteVPDenoiser`, the same D(x; sigma) the
samplers use) and "edm" for EDM-preconditioned models (our recipe's exports, diffusers' EDM
schedulers). Flow-matching, VE and zero-terminal-SNR models are refused.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edm_sampling.safety.inputs import InvalidArgument, existing_path, read_json_object, read_pipeline_index

SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")


def pretrained_family(scheduler_config: dict[str, Any], flag: str = "pretrained") -> str:
    """The preconditioning family of a pretrained model, from its scheduler config through
    `families.family_from_scheduler_config`: "ddpm" (discrete VP: DDPM / DDIM / PNDM / Euler ...
    schedulers with betas) or "edm". Other families are refused naming `flag`."""
    from edm_sampling.families import EDM, DiscreteVP, family_from_scheduler_config

    try:
        family = family_from_scheduler_config(scheduler_config)
    except ValueError as error:
        raise InvalidArgument(flag, f"cannot precondition this model: {error}") from error
    if isinstance(family, DiscreteVP):
        return "ddpm"
    if isinstance(family, EDM):
        return "edm"
    raise InvalidArgument(flag, f"cannot precondition this model for fine-tuning: its scheduler config describes a "
                     f"{family.name!r} model; only DDPM-family (discrete VP) and EDM models can be fine-tuned here")


@dataclass
class PretrainedFolder:
    """What the JSON files of ``--pretrained`` say, before any weight is loaded."""

    root: Path
    index: dict[str, Any] | None  # model_index.json; None for a bare UNet folder
    unet_dir: Path
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    family: str

    @property
    def pipeline_class(self) -> str | None:
        return self.index.get("_class_name") if self.index else None

    def component(self, name: str) -> tuple[str, str] | None:
        """(library, class) of a pipeline component with a folder, or None."""
        spec = (self.index or {}).get(name)
        if isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[0] and (self.root / name).is_dir():
            return spec[0], spec[1]
        return None

    @property
    def latent(self) -> bool:
        return self.component("vae") is not None

    @property
    def text_conditioned(self) -> bool:
        return self.unet_config.get("_class_name") == "UNet2DConditionModel"

    @property
    def num_classes(self) -> int:
        return int(self.unet_config.get("num_class_embeds") or 0)

    def vae_scale(self) -> int:
        if not self.latent:
            return 1
        vae = read_json_object("pretrained", self.root / "vae" / "config.json")
        return 2 ** (len(vae.get("block_out_channels", [0])) - 1)

    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the UNet's downsampling times the VAE's."""
        blocks = len(self.unet_config.get("down_block_types") or self.unet_config.get("block_out_channels") or [0])
        return 2 ** max(blocks - 1, 0) * self.vae_scale()

    def default_resolution(self) -> tuple[int, int]:
        size = self.unet_config.get("sample_size") or 64
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return height * self.vae_scale(), width * self.vae_scale()

    def check_resolution(self, resolution: tuple[int, int]) -> None:
        multiple = self.size_multiple()
        if any(side % multiple for side in resolution):
            raise ValueError(
                f"--resolution: {resolution[0]}x{resolution[1]} cannot be taken by this model: both sides must be "
                f"multiples of {multiple} (its UNet halves the size {multiple // self.vae_scale()}x, its VAE "
                f"{self.vae_scale()}x); e.g. --resolution {self.default_resolution()[0]}"
            )


def check_pretrained(path: str, scheduler_config: str | None = None) -> PretrainedFolder:
    """Validate ``--pretrained`` (and ``--scheduler-config``) from the JSON files alone."""
    root = existing_path("pretrained", path, folder=True)
    if (root / "model_index.json").is_file():
        index = read_pipeline_index("pretrained", root)
        if "unet" not in index:
            parts = sorted(k for k in index if not k.startswith("_"))
            raise InvalidArgument("pretrained", f"{root} has no 'unet' component (components: {parts}); "
                             "transformer-based pipelines (SD3, Flux, PixArt) are not supported")
        if scheduler_config is not None:
            raise InvalidArgument("scheduler_config", f"{root} is a whole pipeline with its own scheduler; "
                             "--scheduler-config is for a bare UNet folder")
        if "text_encoder_2" in index:
            raise InvalidArgument("pretrained", f"{root} has two text encoders (SDXL-style); only single-encoder "
                             "pipelines (Stable Diffusion 1.x / 2.x) are supported")
        unet_dir, sched_path = root / "unet", root / "scheduler" / "scheduler_config.json"
        if not sched_path.is_file():
            raise InvalidArgument("pretrained", f"{root} has no scheduler/scheduler_config.json")
    elif (root / "config.json").is_file():
        index, unet_dir = None, root
        if scheduler_config is None:
            raise InvalidArgument("scheduler_config", f"{root} is a bare UNet folder; give its scheduler's "
                             "scheduler_config.json (or the folder holding it) with --scheduler-config")
        sched_path = Path(scheduler_config)
        if sched_path.is_dir():
            sched_path = sched_path / "scheduler_config.json"
    else:
        raise InvalidArgument("pretrained", f"{root} is not a diffusers folder: no model_index.json (a pipeline "
                         "saved with save_pretrained) and no config.json (a UNet folder)")
    unet_config = read_json_object("pretrained", unet_dir / "config.json")
    unet_class = unet_config.get("_class_name")
    if unet_class not in SUPPORTED_UNETS:
        raise InvalidArgument("pretrained", f"the model is a {unet_class!r}; supported: {SUPPORTED_UNETS}")
    if unet_config.get("addition_embed_type") or unet_config.get("class_embed_type"):
        raise InvalidArgument("pretrained", "UNets with extra conditioning (addition_embed_type / class_embed_type, "
                         "e.g. SDXL) are not supported")
    flag = "scheduler_config" if index is None else "pretrained"
    scheduler = read_json_object(flag, sched_path)
    folder = PretrainedFolder(root, index, unet_dir, unet_config, scheduler, pretrained_family(scheduler, flag))
    if folder.text_conditioned and not (folder.component("text_encoder") and folder.component("tokenizer")):
        raise InvalidArgument("pretrained", f"{root}: a UNet2DConditionModel needs its pipeline's text_encoder and "
                         "tokenizer; give the whole pipeline folder")
    if not folder.latent and int(unet_config.get("in_channels", 3)) not in (1, 3):
        raise InvalidArgument("pretrained", f"a pixel UNet must take 1 or 3 channels, this one takes {unet_config.get('in_channels')}"
                         " (a latent model needs its pipeline's vae)")
    return folder


def load_component(folder: PretrainedFolder, name: str) -> Any:
    """Load component ``name`` of a pipeline folder by its (library, class) entry."""
    spec = folder.component(name)
    if spec is None:
        return None
    library, class_name = spec
    try:
        cls = getattr(importlib.import_module(library), class_name)
        return cls.from_pretrained(str(folder.root / name))
    except Exception as error:  # a broken component is a bad --pretrained
        raise InvalidArgument("pretrained", f"cannot load {name!r} ({library}.{class_name}) from {folder.root / name}: {error}") from error


def load_unet(folder: PretrainedFolder) -> torch.nn.Module:
    """The UNet in float32, ready to train."""
    import diffusers

    cls = getattr(diffusers, folder.unet_config["_class_name"])
    try:
        unet = cls.from_pretrained(str(folder.unet_dir), torch_dtype=torch.float32)
    except Exception as error:
        raise InvalidArgument("pretrained", f"cannot load the UNet from {folder.unet_dir}: {error}") from error
    return unet.float().train()


def pretrained_denoiser(folder: PretrainedFolder, unet: torch.nn.Module, augment_dim: int = 0):
    """The UNet in its own family's preconditioning (`preconditioning.precondition`); a new
    augmentation projection starts at zero, so step 0 is the pretrained model exactly."""
    from .preconditioning import precondition

    sigma_data = float(folder.scheduler_config.get("sigma_data", 0.5))
    denoiser = precondition(unet, folder.family, sigma_data=sigma_data, augment_dim=augment_dim,
                            scheduler_config=folder.scheduler_config)
    if denoiser.net.augment_proj is not None:
        torch.nn.init.zeros_(denoiser.net.augment_proj.weight)
    return denoiser
