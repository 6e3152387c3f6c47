"""The configuration of a training run (no heavy imports: the CLI reads its defaults)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

LOSSES = ("edm", "vp", "ve")
MIXED_PRECISION = ("no", "fp16", "bf16")
# Fields that must match when resuming: they change the model or the data stream.
RESUME_FIELDS = ("data", "resolution", "loss", "batch_size", "seed", "class_conditional", "augment_p",
                 "block_out_channels", "layers_per_block", "attention", "dropout", "sigma_data", "grad_accum")


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI flags map one to one onto these fields."""

    output_dir: str = "edm-output-train"
    data: str | None = None  # None / "digits": built-in digits; else an image folder
    resolution: int = 16  # for the built-in digits; folders keep their own size
    loss: str = "edm"
    steps: int = 1500
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2e-3
    lr_warmup_images: int = 10_000
    ema_halflife_images: float = 10_000.0
    ema_rampup_ratio: float | None = 0.05
    augment_p: float = 0.0
    class_conditional: bool = False
    sigma_data: float = 0.5
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention: bool = False
    dropout: float = 0.0
    mixed_precision: str = "no"
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    resume: bool = False
    overwrite: bool = False
    sample_steps: int = 18
    num_samples: int = 64
    export: bool = True
    progress: bool = True

    def validate(self) -> None:
        """ValueError naming the first bad field and its allowed range."""
        checks = [
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.lr_warmup_images >= 0, f"lr_warmup_images must be >= 0, got {self.lr_warmup_images}"),
            (self.ema_halflife_images >= 0, f"ema_halflife_images must be >= 0, got {self.ema_halflife_images}"),
            (0.0 <= self.augment_p <= 1.0, f"augment_p must be in [0, 1], got {self.augment_p}"),
            (self.sigma_data > 0, f"sigma_data must be > 0, got {self.sigma_data}"),
            (self.resolution >= 8, f"resolution must be >= 8, got {self.resolution}"),
            (len(self.block_out_channels) >= 1 and all(c >= 8 and c % 8 == 0 for c in self.block_out_channels),
             f"block_out_channels must be multiples of 8, got {self.block_out_channels}"),
            (self.layers_per_block >= 1, f"layers_per_block must be >= 1, got {self.layers_per_block}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.sample_steps >= 1, f"sample_steps must be >= 1, got {self.sample_steps}"),
            (self.num_samples >= 0, f"num_samples must be >= 0, got {self.num_samples}"),
            (not (self.resume and self.overwrite), "resume and overwrite cannot both be set"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        return out
