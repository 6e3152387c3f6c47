"""The EDM training loop on accelerate (EDM_SPEC.md section 3).

One optimizer step = ``batch_size`` images, split over processes and gradient-accumulation
rounds; ``accelerate launch`` runs the same code on one or many GPUs / nodes, accelerate
being the only distributed engine. Per step:

1. the global batch is a pure function of (seed, step): `data.batch_indices`; each process
   takes its slice. Every random draw of the step (augmentation, sigma, noise, dropout)
   comes from generators seeded from (seed, step, process, round), so a resumed run draws
   exactly what an uninterrupted one would.
2. optional non-leaky augmentation, then the loss of `losses.py` on the preconditioned
   UNet of `preconditioning.py`;
3. non-finite gradients: the step is skipped and counted (fp16 leaves that to the
   gradient scaler, which also lowers its scale);
4. learning rate = lr * min(images seen / warm-up images, 1); Adam step;
5. EMA with a half-life in images and a ramp-up (`ema.py`).

Checkpoints (`checkpoint.py`) hold model, EMA, optimizer, step and RNG states in one
safetensors file written atomically. The run ends by exporting the EMA UNet as a diffusers
pipeline folder (`export.py`) and writing a sample grid.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .augment import AUGMENT_DIM, GeometricAugment
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .data import ImageDataset, batch_indices, load_dataset
from .ema import ema_beta, ema_update
from .config import RESUME_FIELDS, TrainConfig
from .losses import SigmaBucketLog, make_loss
from .preconditioning import precondition

PIPELINE_DIR = "pipeline"
SAMPLES_NAME = "samples.png"
LOG_NAME = "log.jsonl"


def check_output_dir(config: TrainConfig) -> Path:
    """Refuse to touch an existing run folder unless resuming or overwriting (ValueError)."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {str(out)!r} exists and is not a folder")
    nonempty = out.is_dir() and any(out.iterdir())
    if config.resume:
        if not (out / CHECKPOINT_NAME).is_file():
            raise ValueError(f"resume: no checkpoint {CHECKPOINT_NAME} in {str(out)!r}")
    elif nonempty and not config.overwrite:
        raise ValueError(
            f"output_dir {str(out)!r} already exists and is not empty; pass --resume to continue it "
            "or --overwrite to start over (its checkpoint will be replaced)"
        )
    return out


def build_unet(config: TrainConfig, channels: int, resolution: int, num_classes: int):
    """A small diffusers UNet2DModel for ``resolution`` images (positional time embedding)."""
    from diffusers import UNet2DModel

    n = len(config.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if config.attention and n > 1:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    if resolution % (2 ** (n - 1)) != 0:
        raise ValueError(f"resolution {resolution} must be divisible by 2^(len(block_out_channels)-1) = {2 ** (n - 1)}")
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(config.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        layers_per_block=config.layers_per_block,
        norm_num_groups=8,
        attention_head_dim=8,
        dropout=config.dropout,
        num_class_embeds=num_classes if num_classes else None,
    )


def step_seed(seed: int, step: int, process: int, round_: int) -> int:
    """A distinct 63-bit seed for each (seed, step, process, accumulation round)."""
    value = seed
    for part in (step, process, round_):
        value = (value * 0x9E3779B97F4A7C15 + part + 1) % (2**63 - 1)
    return value


@dataclass
class TrainResult:
    output_dir: str
    steps: int
    images_seen: int
    skipped_steps: int
    last_loss: float
    seconds: float
    pipeline_dir: str | None = None
    samples_path: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Holds the model, EMA, optimizer and data of one run; :meth:`run` trains it."""

    def __init__(self, config: TrainConfig, dataset: ImageDataset | None = None):
        config.validate()
        self.config = config
        self.output_dir = check_output_dir(config)
        self.dataset = dataset if dataset is not None else load_dataset(config.data, config.resolution)
        self.loss_fn = make_loss(config.loss, **({"sigma_data": config.sigma_data} if config.loss == "edm" else {}))

        from accelerate import Accelerator

        self.accelerator = Accelerator(mixed_precision=config.mixed_precision)
        processes = self.accelerator.num_processes
        if config.batch_size % (processes * config.grad_accum) != 0:
            raise ValueError(
                f"batch_size ({config.batch_size}) must be divisible by processes x grad_accum "
                f"({processes} x {config.grad_accum})"
            )
        self.micro_batch = config.batch_size // (processes * config.grad_accum)

        num_classes = self.dataset.num_classes if config.class_conditional else 0
        if config.class_conditional and num_classes < 1:
            raise ValueError("class_conditional needs a dataset with class subfolders (or the built-in digits)")
        torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
        unet = build_unet(config, self.dataset.channels, self.dataset.images.shape[-1], num_classes)
        self.augment = GeometricAugment(p=config.augment_p) if config.augment_p > 0 else None
        denoiser = precondition(unet, config.loss, sigma_data=config.sigma_data,
                                augment_dim=AUGMENT_DIM if self.augment else 0)
        self.ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
        optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
        self.model, self.optimizer = self.accelerator.prepare(denoiser, optimizer)
        self.ema.to(self.accelerator.device)
        self.images = self.dataset.images.to(self.accelerator.device)  # small sets: kept on the device
        self.labels = self.dataset.labels.to(self.accelerator.device)
        self.step = 0
        self.images_seen = 0
        self.skipped_steps = 0
        self.buckets = SigmaBucketLog()
        if config.resume:
            self.load(self.output_dir / CHECKPOINT_NAME)
        elif config.overwrite and self.accelerator.is_main_process:
            for name in (CHECKPOINT_NAME, LOG_NAME, SAMPLES_NAME):
                if (self.output_dir / name).exists():
                    (self.output_dir / name).unlink()

    # ---- one step -------------------------------------------------------------------
    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _micro_batch(self, round_: int) -> dict[str, torch.Tensor]:
        cfg, acc = self.config, self.accelerator
        indices = batch_indices(len(self.dataset), cfg.seed, self.step, cfg.batch_size, acc.device)
        per_round = self.micro_batch * acc.num_processes
        chunk = indices[round_ * per_round : (round_ + 1) * per_round]
        mine = chunk[acc.process_index * self.micro_batch : (acc.process_index + 1) * self.micro_batch]
        batch = {"images": self.images[mine]}
        if cfg.class_conditional:
            batch["class_labels"] = self.labels[mine]
        return batch

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``batch_size`` images.

        Returns its mean loss (a 0-d tensor on the device: reading it is left to the logger,
        so the only host-device sync of a step is the non-finite gradient check), lr and
        whether it was skipped.
        """
        cfg, acc = self.config, self.accelerator
        self.model.train()
        total = torch.zeros((), device=acc.device)
        for round_ in range(cfg.grad_accum):
            seed = step_seed(cfg.seed, self.step, acc.process_index, round_)
            torch.manual_seed(seed)  # dropout and anything else on the global generator
            generator = torch.Generator(device=acc.device).manual_seed(seed)
            batch = self._micro_batch(round_)
            images = batch.pop("images")
            if self.augment is not None:
                images, batch["augment_labels"] = self.augment(images, generator)
            last = round_ == cfg.grad_accum - 1
            context = acc.no_sync(self.model) if not last else _null_context()
            with context:
                out = self.loss_fn(self.model, images, generator, **batch)
                loss = out.loss.mean() / cfg.grad_accum
                acc.backward(loss)
            self.buckets.add(out.loss, out.sigma)
            total += loss.detach().float()

        lr = cfg.lr * min((self.images_seen + cfg.batch_size) / max(cfg.lr_warmup_images, 1), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cfg.mixed_precision == "fp16":
            self.optimizer.step()
            skipped = bool(acc.optimizer_step_was_skipped)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            skipped = not bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())  # one sync
            if not skipped:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if skipped:
            self.skipped_steps += 1
        else:
            self.images_seen += cfg.batch_size
            beta = ema_beta(cfg.batch_size, cfg.ema_halflife_images, self.images_seen, cfg.ema_rampup_ratio)
            ema_update(self.ema, self.unwrapped, beta)
        return {"loss": total, "lr": lr, "skipped": skipped}

    # ---- checkpoints -----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "skipped_steps": self.skipped_steps,
            "config": self.config.to_json(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def save(self, path: Path | None = None) -> Path:
        """Write the checkpoint (main process only; every process waits for it)."""
        path = path or self.output_dir / CHECKPOINT_NAME
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                rng["torch_cuda"] = torch.cuda.get_rng_state()
            save_checkpoint(
                path,
                model=self.unwrapped.state_dict(),
                ema=self.ema.state_dict(),
                optimizer=self.optimizer.state_dict(),
                rng=rng,
                state=self.state(),
            )
        self.accelerator.wait_for_everyone()
        return path

    def load(self, path: Path) -> None:
        """Restore everything :meth:`save` wrote; refuses a checkpoint of a different setup."""
        ckpt = load_checkpoint(path)
        saved = ckpt["state"]["config"]
        now = self.config.to_json()
        for key in RESUME_FIELDS:
            if saved.get(key) != now.get(key):
                raise ValueError(f"resume: {key} was {saved.get(key)!r} in the checkpoint, got {now.get(key)!r}")
        self.unwrapped.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        self.step, self.images_seen, self.skipped_steps = state["step"], state["images_seen"], state["skipped_steps"]
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch_cpu"])
        if "torch_cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng"]["torch_cuda"])

    # ---- the loop --------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train until ``config.steps``, checkpointing, then export and write the sample grid."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        start_time = time.perf_counter()
        history: list[dict[str, Any]] = []
        last_loss = math.nan
        running, count = torch.zeros((), device=acc.device), 0
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and acc.is_main_process), desc="train")
        while self.step < cfg.steps:
            info = self.train_step()
            running, count = running + info["loss"], count + 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                if acc.num_processes > 1:
                    running = acc.reduce(running, reduction="mean")  # sigma buckets stay per process
                last_loss = float(running) / count
                record = {
                    "step": self.step, "images": self.images_seen, "loss": last_loss, "lr": info["lr"],
                    "skipped_steps": self.skipped_steps, "seconds": time.perf_counter() - start_time,
                    "loss_by_sigma": self.buckets.means(),
                }
                history.append(record)
                bar.set_postfix(loss=f"{last_loss:.4f}")
                if acc.is_main_process:
                    with open(self.output_dir / LOG_NAME, "a") as f:
                        f.write(json.dumps(record) + "\n")
                running, count = torch.zeros((), device=acc.device), 0
                self.buckets.reset()
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()
        if self.step % cfg.checkpoint_every != 0 and self.step != cfg.steps:
            self.save()
        seconds = time.perf_counter() - start_time
        result = TrainResult(str(self.output_dir), self.step, self.images_seen, self.skipped_steps, last_loss, seconds,
                             history=history)
        if acc.is_main_process:
            if cfg.export and cfg.loss != "edm":
                print(f"not exporting: EDMScheduler pipelines need the EDM preconditioning, this run used {cfg.loss!r}")
            elif cfg.export:
                from .export import export_pipeline

                result.pipeline_dir = str(export_pipeline(self, self.output_dir / PIPELINE_DIR, overwrite=True))
            if cfg.num_samples:
                result.samples_path = str(self.write_sample_grid(self.output_dir / SAMPLES_NAME))
        acc.wait_for_everyone()
        return result

    # ---- samples ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, num: int, seed: int = 0, use_ema: bool = True, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``num`` samples in [-1, 1] with the EDM Heun sampler (zero augmentation vector)."""
        from edm_sampling.samplers import denoiser_sigmas, sample

        denoiser = self.ema if use_ema else self.unwrapped
        denoiser.eval()
        shape = (num, self.dataset.channels, *self.dataset.images.shape[-2:])
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = torch.randn(shape, generator=generator).to(self.accelerator.device)
        kwargs: dict[str, Any] = {}
        if self.config.class_conditional:
            labels = class_labels if class_labels is not None else torch.arange(num) % self.dataset.num_classes
            kwargs["class_labels"] = labels.to(self.accelerator.device)
        sigmas = denoiser_sigmas(denoiser, self.config.sample_steps)
        out = sample(denoiser, latents, sigmas, model_kwargs=kwargs)
        return out.sample.clamp(-1, 1).cpu()

    def write_sample_grid(self, path: Path, seed: int = 0) -> Path:
        from edm_sampling.images import save_image_grid

        images = self.generate(self.config.num_samples, seed=seed)
        return save_image_grid(images, path, max_images=None, scale=4, pad_value=-1.0)


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(config: TrainConfig, dataset: ImageDataset | None = None) -> TrainResult:
    """Validate, build and run a training job (see :class:`TrainConfig`)."""
    return Trainer(config, dataset).run()
