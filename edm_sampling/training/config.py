"""The configuration of a training run (no heavy imports: the CLI reads its defaults)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

from edm_sampling.safety.inputs import SEED, InvalidArgument, Number, check_bool, check_choice

LOSSES = ("edm", "vp", "ve", "ddpm")
NOISE_DISTRIBUTIONS = ("native", "lognormal", "ddpm")
LOSS_WEIGHTINGS = ("native", "edm", "balanced")
EXPORT_SCHEDULERS = ("edm", "original")
MIXED_PRECISION = ("no", "fp16", "bf16")
# Fields that must match when resuming: they change the model or the data stream.
RESUME_FIELDS = ("data", "dataset", "image_column", "caption_column", "pretrained", "scheduler_config",
                 "resolution", "loss", "noise_distribution", "loss_weighting", "p_mean", "p_std", "batch_size",
                 "seed", "class_conditional", "augment_p", "random_flip", "caption_dropout", "block_out_channels",
                 "layers_per_block", "attention", "dropout", "sigma_data", "grad_accum")


def parse_resolution(value: Any, name: str = "resolution") -> tuple[int, int] | None:
    """``--resolution``: None, an int (square), "S", "H,W" (or "HxW") or a pair -> (height, width),
    each side an integer >= 8; `InvalidArgument` naming ``name`` otherwise."""
    if value is None:
        return None
    problem = InvalidArgument(name, f"must be a size S or H,W in pixels, each an integer >= {MIN_SIDE}, got {value!r}")
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",")]
        if not all(p.isdigit() for p in parts):
            raise problem
        value = tuple(int(p) for p in parts)
    elif isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    elif not isinstance(value, (tuple, list)):
        raise problem
    value = tuple(value)
    if len(value) == 1:
        value = (value[0], value[0])
    if len(value) != 2 or not all(SIDE.accepts(v) for v in value):
        raise problem
    return value


def parse_channels(text: str) -> tuple[int, ...]:
    """``--channels 16,32,64`` -> (16, 32, 64); the values are checked by `TrainConfig.validate`."""
    try:
        return tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 16,32,64, got {text!r}") from None


MIN_SIDE = 8
SIDE = Number(MIN_SIDE, integer=True)
POSITIVE_INT = Number(1, integer=True)
COUNT = Number(0, integer=True)
POSITIVE = Number(0, low_open=True)
PROBABILITY = Number(0, 1)
# The numeric fields of TrainConfig and their allowed values (the CLI names them by their flags).
NUMBER_FIELDS: dict[str, Number] = {
    "p_mean": Number(),
    "p_std": POSITIVE,
    "steps": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "grad_accum": POSITIVE_INT,
    "lr": Number(0, low_open=True, optional=True),
    "lr_warmup_images": COUNT,
    "max_grad_norm": Number(0, low_open=True, optional=True),
    "ema_halflife_images": Number(0),
    "ema_rampup_ratio": Number(0, low_open=True, optional=True),
    "augment_p": PROBABILITY,
    "caption_dropout": PROBABILITY,
    "num_workers": COUNT,
    "sigma_data": POSITIVE,
    "layers_per_block": POSITIVE_INT,
    "dropout": Number(0, 1, high_open=True),
    "seed": SEED,
    "checkpoint_every": POSITIVE_INT,
    "log_every": POSITIVE_INT,
    "sample_steps": POSITIVE_INT,
    "num_samples": COUNT,
    "guidance_scale": Number(1),
}
CHOICE_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {  # name: (choices, None allowed)
    "loss": (LOSSES, True),  # None: "edm" from scratch, the fine-tuning recipe with pretrained
    "noise_distribution": (NOISE_DISTRIBUTIONS, True),
    "loss_weighting": (LOSS_WEIGHTINGS, True),
    "mixed_precision": (MIXED_PRECISION, False),
    "export_scheduler": (EXPORT_SCHEDULERS, False),
}
BOOL_FIELDS = ("random_flip", "cache_latents", "class_conditional", "attention", "gradient_checkpointing", "resume",
               "overwrite", "export", "progress")
TEXT_FIELDS: dict[str, bool] = {  # name: None allowed (paths are checked when the run opens them)
    "output_dir": False, "data": True, "dataset": True, "image_column": False, "caption_column": False,
    "pretrained": True, "scheduler_config": True,
}


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI flags map one to one onto these fields.

    From scratch (no ``pretrained``) a new UNet2DModel is trained on ``data`` (an image
    folder), ``dataset`` (a Hugging Face dataset) or the built-in digits. With ``pretrained``
    a local diffusers pipeline folder (or a bare UNet folder plus ``scheduler_config``) is
    fine-tuned in its own preconditioning family.

    ``loss`` picks the recipe: "edm" (log-normal sigma, EDM weighting), "ddpm" (the DDPM
    recipe: uniform integer timesteps, MSE on the network's own output), or, from scratch only,
    the Table 1 recipes "vp" / "ve". None (the default) is "edm" from scratch; with
    ``pretrained`` it is the fine-tuning recipe: the model's own noise levels with the balanced
    weighting (see :attr:`recipe`). ``noise_distribution`` and ``loss_weighting`` override the
    two halves of the recipe separately (None: from ``loss``).

    ``resume=True`` continues the run in ``output_dir`` with the fields given here, explicit
    like every other use of this class: the fields in `RESUME_FIELDS` must match the checkpoint's
    (a changed model or data setup is refused), the others (``steps``, ``lr``, ...) apply as
    given. The CLI's ``--resume`` instead takes every flag not typed from the checkpoint.
    """

    output_dir: str = "edm-output-train"
    data: str | None = None  # None / "digits": built-in digits (unless dataset / pretrained); else an image folder
    dataset: str | None = None  # a Hugging Face dataset: a folder saved with save_to_disk, or a name
    image_column: str = "image"
    caption_column: str = "text"
    pretrained: str | None = None
    scheduler_config: str | None = None  # for a bare UNet folder given as pretrained
    resolution: int | tuple[int, int] | str | None = None  # None: 16 (digits), the model's size, or the folder's
    loss: str | None = None  # None: "edm" from scratch, the fine-tuning recipe with pretrained
    noise_distribution: str | None = None
    loss_weighting: str | None = None
    p_mean: float = -1.2
    p_std: float = 1.2
    steps: int = 1500
    batch_size: int = 64
    grad_accum: int = 1
    lr: float | None = None  # None: 2e-3 from scratch, 1e-4 when fine-tuning
    lr_warmup_images: int = 10_000
    max_grad_norm: float | None = None
    ema_halflife_images: float = 10_000.0
    ema_rampup_ratio: float | None = 0.05
    augment_p: float = 0.0
    random_flip: bool = False
    caption_dropout: float = 0.0
    cache_latents: bool = False
    num_workers: int = 0
    class_conditional: bool = False
    sigma_data: float = 0.5
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention: bool = False
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    resume: bool = False
    overwrite: bool = False
    sample_steps: int = 18
    num_samples: int = 64
    guidance_scale: float = 5.0
    export: bool = True
    export_scheduler: str = "edm"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.loss is None and self.pretrained is None:
            self.loss = "edm"

    def validate(self) -> None:
        """`InvalidArgument` naming the first bad field and its allowed values (the CLI shows it under
        the field's flag), then the combinations that do not go together. Checks values only:
        paths are checked when the run opens them, still before any work."""
        for name, rule in NUMBER_FIELDS.items():
            rule.check(name, getattr(self, name))
        for name, (choices, optional) in CHOICE_FIELDS.items():
            check_choice(name, getattr(self, name), choices, optional)
        for name in BOOL_FIELDS:
            check_bool(name, getattr(self, name))
        for name, optional in TEXT_FIELDS.items():
            value = getattr(self, name)
            if not (value is None and optional) and not (isinstance(value, str) and value.strip()):
                raise InvalidArgument(name, f"must be a non-empty text{' or None' if optional else ''}, got {value!r}")
        channels = self.block_out_channels
        if (not isinstance(channels, (tuple, list)) or not channels
                or not all(Number(8, integer=True).accepts(c) and c % 8 == 0 for c in channels)):
            raise InvalidArgument("block_out_channels", f"must be one or more multiples of 8, e.g. 16,32,64, got {channels!r}")
        parse_resolution(self.resolution)
        combinations = [
            (not (self.data is not None and self.dataset is not None), "data", "cannot be used together with --dataset"),
            (self.scheduler_config is None or self.pretrained is not None, "scheduler_config",
             "is only used with --pretrained (a bare UNet folder)"),
            (self.loss is not None or self.pretrained is not None, "loss",
             f"must be one of {LOSSES} (None only with --pretrained), got None"),
            (self.pretrained is None or self.loss in (None, "edm", "ddpm"), "loss",
             f"must be 'edm' or 'ddpm' with --pretrained (the model keeps its own preconditioning), got {self.loss!r}"),
            (self.loss in (None, "edm", "ddpm") or (self.noise_distribution is None and self.loss_weighting is None),
             "noise_distribution", f"--noise-distribution / --loss-weighting apply to --loss edm or ddpm, not {self.loss!r}"),
            (not (self.resume and self.overwrite), "resume", "cannot be used together with --overwrite"),
        ]
        for ok, name, problem in combinations:
            if not ok:
                raise InvalidArgument(name, problem)

    @property
    def recipe(self) -> tuple[str, str]:
        """(noise distribution, loss weighting), the flags overriding ``loss``'s: "edm" ->
        (lognormal, edm), "ddpm" -> (ddpm, native), and for a pretrained model without
        ``loss`` (native, balanced): the noise levels it was trained on, each weighted by
        1 / its own loss there at step 0. That recipe improves an epsilon model where EDM's
        does not (benchmarks/finetune_quality.py)."""
        default = {"ddpm": ("ddpm", "native"), None: ("native", "balanced")}.get(self.loss, ("lognormal", "edm"))
        return (self.noise_distribution or default[0], self.loss_weighting or default[1])

    @property
    def learning_rate(self) -> float:
        """``lr``, or its default: 2e-3 from scratch, 1e-4 for fine-tuning a pretrained model."""
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.pretrained else 2e-3

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        resolution = parse_resolution(self.resolution)
        out["resolution"] = list(resolution) if resolution else None
        return out
