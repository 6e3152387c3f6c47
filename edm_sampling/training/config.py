"""The configuration of a training run (no heavy imports: the CLI reads its defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

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


def parse_resolution(value: Any) -> tuple[int, int] | None:
    """``--resolution``: None, an int (square), "S", "H,W" or a pair -> (height, width)."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace("x", ",").split(",") if p.strip()]
        try:
            value = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"--resolution must be a size S or H,W in pixels, got {value!r}") from None
    if isinstance(value, int):
        value = (value, value)
    value = tuple(value)
    if len(value) == 1:
        value = (value[0], value[0])
    if len(value) != 2 or not all(isinstance(v, int) and v >= 8 for v in value):
        raise ValueError(f"--resolution must be S or H,W with each side >= 8 pixels, got {value!r}")
    return value


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
        """ValueError naming the first bad field (as its CLI flag) and its allowed range."""
        checks = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.loss in LOSSES or (self.loss is None and self.pretrained is not None),
             f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (self.noise_distribution in (None, *NOISE_DISTRIBUTIONS),
             f"--noise-distribution must be one of {NOISE_DISTRIBUTIONS}, got {self.noise_distribution!r}"),
            (self.loss_weighting in (None, *LOSS_WEIGHTINGS),
             f"--loss-weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}"),
            (self.p_std > 0, f"--p-std must be > 0, got {self.p_std}"),
            (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.lr_warmup_images >= 0, f"lr_warmup_images must be >= 0, got {self.lr_warmup_images}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {self.max_grad_norm}"),
            (self.ema_halflife_images >= 0, f"ema_halflife_images must be >= 0, got {self.ema_halflife_images}"),
            (0.0 <= self.augment_p <= 1.0, f"augment_p must be in [0, 1], got {self.augment_p}"),
            (0.0 <= self.caption_dropout <= 1.0, f"--caption-dropout must be in [0, 1], got {self.caption_dropout}"),
            (self.num_workers >= 0, f"--num-workers must be >= 0, got {self.num_workers}"),
            (self.sigma_data > 0, f"sigma_data must be > 0, got {self.sigma_data}"),
            (len(self.block_out_channels) >= 1 and all(c >= 8 and c % 8 == 0 for c in self.block_out_channels),
             f"block_out_channels must be multiples of 8, got {self.block_out_channels}"),
            (self.layers_per_block >= 1, f"layers_per_block must be >= 1, got {self.layers_per_block}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}"),
            (self.num_samples >= 0, f"num_samples must be >= 0, got {self.num_samples}"),
            (self.guidance_scale >= 1.0, f"--guidance-scale must be >= 1, got {self.guidance_scale}"),
            (self.export_scheduler in EXPORT_SCHEDULERS,
             f"--export-scheduler must be one of {EXPORT_SCHEDULERS}, got {self.export_scheduler!r}"),
            (not (self.data is not None and self.dataset is not None), "--data and --dataset cannot both be given"),
            (self.scheduler_config is None or self.pretrained is not None,
             "--scheduler-config is only used with --pretrained (a bare UNet folder)"),
            (self.pretrained is None or self.loss in (None, "edm", "ddpm"),
             f"--loss must be 'edm' or 'ddpm' with --pretrained (the model keeps its own preconditioning), got {self.loss!r}"),
            (self.loss in (None, "edm", "ddpm") or (self.noise_distribution is None and self.loss_weighting is None),
             f"--noise-distribution / --loss-weighting apply to --loss edm or ddpm, not {self.loss!r}"),
            (not (self.resume and self.overwrite), "resume and overwrite cannot both be set"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        parse_resolution(self.resolution)

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
