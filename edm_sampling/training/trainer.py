"""The EDM training loop on accelerate (EDM_SPEC.md section 3): from scratch or fine-tuning.

One optimizer step = ``batch_size`` images, split over processes and gradient-accumulation
rounds; ``accelerate launch`` runs the same code on one or many GPUs / nodes, accelerate
being the only distributed engine. Per step:

1. the global batch is a pure function of (seed, step): `data.batch_indices`; each process
   takes its slice (`batches.BatchFeed`: in memory, streamed by a DataLoader, or from the
   latent cache). Every random draw of the step (flips, VAE posterior sample, caption
   dropout, augmentation, sigma, noise, dropout) comes from generators seeded from
   (seed, step, process, round), so a resumed run draws exactly what an uninterrupted one
   would;
2. latent models: images -> VAE latents (``scaling_factor``), captions -> the frozen text
   encoder; optional non-leaky augmentation for pixel models;
3. the loss (`losses.py`) on the preconditioned UNet: a new UNet in the recipe's family, or
   a pretrained one in its own family (`pretrained.py`);
4. gradient clipping (``max_grad_norm``); non-finite gradients: the step is skipped and
   counted (fp16 leaves that to the gradient scaler, which also lowers its scale);
5. learning rate = lr * min(images seen / warm-up images, 1); Adam step;
6. EMA with a half-life in images and a ramp-up (`ema.py`).

Checkpoints (`checkpoint.py`) hold model, EMA, optimizer, step and RNG states in one
safetensors file written atomically; each is followed by a sample grid from fixed seeds. The
run ends by exporting the EMA UNet as a diffusers pipeline folder (`export.py`).

The run folder is held from the start (`safety.RunFolder`, main process: one job per folder, a
manifest of what the package wrote, every output known up front so a user's file there is refused
before any work); what it holds is said once ("found a checkpoint at step N: resuming", "starting
a new run"). ``--overwrite`` deletes nothing at the start: the new run's files replace the old ones
as they are written (its log records wait in memory until its first checkpoint replaces the old
one, so a run killed before leaves the old run whole, and ``--resume`` continues the run that
wrote the checkpoint), and the old ones it did not write again go when it finishes. SIGINT / SIGTERM
finish the step, save, print the command that resumes and exit 130 / 143; NaN / inf EMA weights
are never exported.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .augment import AUGMENT_DIM, GeometricAugment
from .batches import BatchFeed
from edm_sampling.safety import (
    GracefulStop,
    InvalidArgument,
    RunFolder,
    append_text,
    assert_finite_state,
    atomic_write_text,
    resume_command,
)
from edm_sampling.safety.inputs import output_folder

from .checkpoint import CHECKPOINT_NAME, checkpoint_step, load_checkpoint, previous_checkpoint_path, save_checkpoint
from .config import RESUME_FIELDS, TrainConfig, parse_resolution
from .data import ImageDataset, load_builtin_digits
from .ema import ema_beta, ema_update
from .losses import FamilyLoss, SigmaBucketLog, denoising_loss, make_loss
from .preconditioning import precondition
from .sources import collate_images

PIPELINE_DIR = "pipeline"
SAMPLES_NAME = "samples.png"
SAMPLES_DIR = "samples"
LOG_NAME = "log.jsonl"
DIGITS_RESOLUTION = 16


def sample_grid_name(step: int) -> str:
    """Where the sample grid of the checkpoint at ``step`` goes, inside the run folder."""
    return f"{SAMPLES_DIR}/step-{step:07d}.png"


def run_outputs(config: TrainConfig) -> tuple[str, ...]:
    """Every file (or folder written whole) a run may write in its folder, known before it starts,
    so that a file the package did not write there is refused before any work (`RunFolder`)."""
    from .latents import CACHE_DIR, CACHE_FILES

    names = [CHECKPOINT_NAME, previous_checkpoint_path(CHECKPOINT_NAME).name, LOG_NAME]
    if config.num_samples:
        names.append(SAMPLES_NAME)
        names += [sample_grid_name(step) for step in range(config.checkpoint_every, config.steps, config.checkpoint_every)]
    if config.export:
        names.append(PIPELINE_DIR)
    if config.cache_latents:
        names += [f"{CACHE_DIR}/{name}" for name in CACHE_FILES]
    return tuple(names)


def check_output_dir(config: TrainConfig, run: RunFolder) -> str:
    """Whether the run may start in ``config.output_dir`` and what it will do, as one line to print;
    an `InvalidArgument` naming the flag to pass otherwise. ``run``: the folder, opened by the
    caller (its lock held, its manifest read).

    - ``--resume``: the folder must hold a checkpoint;
    - a checkpoint and neither flag: refused, naming its step and both flags;
    - ``--overwrite``: the old files stay until the new run writes its own (`RunFolder`);
    - no checkpoint: a folder holding only what an earlier run wrote (it stopped before its first
      checkpoint) starts fresh; files edm_sampling did not write need ``--overwrite`` (they are
      kept)."""
    out = output_folder("output_dir", config.output_dir)
    checkpoint = out / CHECKPOINT_NAME
    found = checkpoint.is_file()
    step = checkpoint_step(checkpoint) if found else None
    at = f"at step {step}" if step is not None else "(its step cannot be read)"
    ours = run.own_files() if out.is_dir() else []
    if config.resume:
        if not found:
            earlier = " (an earlier run stopped before writing one)" if ours else ""
            raise InvalidArgument("resume", f"no checkpoint {CHECKPOINT_NAME} in {str(out)!r} to resume{earlier}; "
                                            "run without --resume to start a new run there")
        return f"found a checkpoint {at} in {out}: resuming"
    if found and not config.overwrite:
        raise InvalidArgument("output_dir", f"{str(out)!r} holds a run with a checkpoint {at}; pass --resume to continue "
                                            "it, or --overwrite to start over (its files stay until the new run replaces them)")
    if found:
        return f"--overwrite: starting a new run in {out}; the checkpoint {at} stays until this run's first checkpoint replaces it"
    others = run.foreign_files() if out.is_dir() else []
    if others and not config.overwrite:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise InvalidArgument("output_dir", f"{str(out)!r} holds files edm_sampling did not write ({shown}); choose "
                                            "another folder, or pass --overwrite to use this one (they are kept)")
    if ours:
        return f"no checkpoint in {out} (an earlier run stopped before writing one): starting a new run"
    return f"starting a new run in {out}"


def build_unet(config: TrainConfig, channels: int, resolution: int | tuple[int, int], num_classes: int):
    """A small diffusers UNet2DModel for ``resolution`` (S or (H, W)) images (positional time embedding)."""
    from diffusers import UNet2DModel

    n = len(config.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if config.attention and n > 1:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    size = parse_resolution(resolution)
    if any(side % (2 ** (n - 1)) for side in size):
        raise InvalidArgument("resolution", f"{size[0]}x{size[1]} must be divisible by 2^(number of --channels - 1) = {2 ** (n - 1)}")
    return UNet2DModel(
        sample_size=size[0] if size[0] == size[1] else size,
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


def frozen_dtype(device_type: str, mixed_precision: str) -> torch.dtype | None:
    """The dtype of the frozen VAE and text encoder: half precision on a GPU with mixed precision
    (fp16 or bf16 as asked), None (as loaded: float32) otherwise."""
    if device_type != "cuda" or mixed_precision == "no":
        return None
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def _check_apart(pretrained: Path, output_dir: Path) -> None:
    """`InvalidArgument` when the model to fine-tune and the run folder overlap: --overwrite and
    the export replace a run folder's files, and the export copies the model's folder whole."""
    model, run = pretrained.resolve(), output_dir.resolve()
    if model == run or model.is_relative_to(run):
        raise InvalidArgument("pretrained", f"{str(pretrained)!r} is inside --output-dir {str(output_dir)!r}, whose files "
                              "this run replaces; copy the model out of it or pick another --output-dir")
    if run.is_relative_to(model):
        raise InvalidArgument("output_dir", f"{str(output_dir)!r} is inside --pretrained {str(pretrained)!r}, which the "
                              "export copies whole; pick an --output-dir outside the model's folder")


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


class Batch(NamedTuple):
    """One micro-batch, every random draw made: clean data y (pixels or latents), sigma, noise."""

    y: torch.Tensor
    sigma: torch.Tensor
    noise: torch.Tensor
    model_kwargs: dict[str, Any]
    failed: list[str]


class GuidedDenoiser(torch.nn.Module):
    """Classifier-free guidance in D space: D_u + w (D_c - D_u), one call on a doubled batch.
    D is affine in the network output, so this equals guidance on epsilon / v / F."""

    def __init__(self, denoiser: torch.nn.Module, cond: torch.Tensor, uncond: torch.Tensor, scale: float):
        super().__init__()
        self.denoiser, self.cond, self.uncond, self.scale = denoiser, cond, uncond, scale
        self.sigma_min, self.sigma_max = denoiser.sigma_min, denoiser.sigma_max
        self.round_sigma = denoiser.round_sigma

    def forward(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             encoder_hidden_states=torch.cat([self.uncond, self.cond]))
        uncond, cond = both.chunk(2)
        return uncond + self.scale * (cond - uncond)


class Trainer:
    """Holds the model, EMA, optimizer and data of one run; :meth:`run` trains it.

    Everything a user gave is checked before anything is written: the pretrained folder, the
    data, the columns, the resolution, the output folder.
    """

    def __init__(self, config: TrainConfig, dataset: ImageDataset | None = None, argv: list[str] | None = None):
        """Check everything, take the run folder (main process: its lock, until `run` ends or
        `close`), and build the run; ``argv``: the `edm-sampling` arguments that started it,
        for the resume command printed on SIGINT / SIGTERM (derived from ``config`` if None)."""
        config.validate()
        self.config = config
        self.argv = argv
        self.in_memory_data = dataset is not None
        self.output_dir = Path(config.output_dir)
        self.folder: RunFolder | None = None
        try:
            self._setup(dataset)
        except BaseException:
            self.close()
            raise

    def _open_folder(self) -> None:
        """Main process: open the run folder (lock, clean-up, manifest) and check what it holds;
        every process learns whether that failed, so none goes on alone."""
        acc, error, found = self.accelerator, None, ""
        if acc.is_main_process:
            try:
                output_folder("output_dir", self.config.output_dir)
                resume = CHECKPOINT_NAME if self.config.resume else False  # the run that wrote it goes on
                self.folder = RunFolder(self.output_dir, self._command_line(), resume=resume).__enter__()
                found = check_output_dir(self.config, self.folder)
                verified = (CHECKPOINT_NAME,) if self.config.resume else ()  # by its checksum, when it loads
                self.folder.check_replaceable(self.folder.root / name for name in run_outputs(self.config)
                                              if name not in verified)
            except ValueError as caught:
                error = caught
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            error = broadcast_object_list([error])[0]
        if error is not None:
            raise error
        self.found = found

    def _arguments(self) -> list[str]:
        """The `edm-sampling` arguments of this run: as typed, or the equivalent of its config."""
        from .command import config_argv

        return list(self.argv) if self.argv is not None else config_argv(self.config)

    def _command_line(self) -> str:
        import shlex

        return shlex.join(["edm-sampling", *self._arguments()])

    def close(self) -> None:
        """Give the run folder back (its lock); idempotent. `run` calls it when it ends."""
        folder, self.folder = getattr(self, "folder", None), None
        if folder is not None:
            folder.__exit__(None, None, None)

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit: the kernel drops the lock with the process anyway
            pass

    @staticmethod
    def _refuse_fp16(device: str) -> None:
        raise InvalidArgument("mixed_precision", f"fp16 needs a CUDA GPU (its loss scaling is what finds and skips "
                                                 f"non-finite steps); on {device} use bf16 or no")

    def _setup(self, dataset: ImageDataset | None) -> None:
        from accelerate import Accelerator

        config = self.config
        if config.mixed_precision == "fp16" and not torch.cuda.is_available():
            self._refuse_fp16("cpu")
        self.accelerator = acc = Accelerator(mixed_precision=config.mixed_precision)
        if config.mixed_precision == "fp16" and acc.device.type != "cuda":
            self._refuse_fp16(acc.device.type)
        if config.pretrained:
            _check_apart(Path(config.pretrained), self.output_dir)
        self._open_folder()
        self.pretrained = None
        if config.pretrained:
            from .pretrained import check_pretrained

            self.pretrained = check_pretrained(config.pretrained, config.scheduler_config)
        self.latent = self.pretrained is not None and self.pretrained.latent
        self.text_conditioned = self.pretrained is not None and self.pretrained.text_conditioned
        if config.cache_latents and not self.latent:
            raise InvalidArgument("cache_latents", "caches VAE latents: it needs --pretrained with a latent pipeline "
                                                   "(one with a vae); this model works on pixels")
        if self.latent and config.augment_p > 0:
            raise InvalidArgument("augment_p", "geometric augmentation is for pixel models; this model is latent")
        self._open_data(dataset)
        processes = acc.num_processes
        if config.batch_size % (processes * config.grad_accum) != 0:
            raise InvalidArgument("batch_size", f"{config.batch_size} must be divisible by processes x --grad-accum "
                                                f"({processes} x {config.grad_accum})")
        self.micro_batch = config.batch_size // (processes * config.grad_accum)
        self.augment = GeometricAugment(p=config.augment_p) if config.augment_p > 0 else None
        augment_dim = AUGMENT_DIM if self.augment else 0
        frozen = frozen_dtype(acc.device.type, config.mixed_precision)
        self.codec = self.text = None
        if self.pretrained is not None:
            from .latents import LatentCodec, TextConditioner
            from .pretrained import load_component, load_unet, pretrained_denoiser

            unet = load_unet(self.pretrained)
            denoiser = pretrained_denoiser(self.pretrained, unet, augment_dim)
            if self.latent:
                self.codec = LatentCodec(load_component(self.pretrained, "vae"), acc.device, frozen)
            if self.text_conditioned:
                self.text = TextConditioner(load_component(self.pretrained, "tokenizer"),
                                            load_component(self.pretrained, "text_encoder"), acc.device, frozen)
            self.family = self.pretrained.family
        else:
            torch.manual_seed(config.seed)  # the initial weights depend on the seed alone
            unet = build_unet(config, self.image_shape[0], self.image_shape[1:], self.num_classes)
            self.family = config.loss
            denoiser = precondition(unet, config.loss, sigma_data=config.sigma_data, augment_dim=augment_dim)
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.sample_shape = self.image_shape
        if self.codec is not None:
            h, w = (side // self.codec.scale for side in self.image_shape[1:])
            self.sample_shape = (self.codec.channels, h, w)
        if self.family in ("edm", "ddpm"):
            noise, weighting = config.recipe
            sigma_data = getattr(denoiser, "sigma_data", config.sigma_data)
            self.loss_fn = FamilyLoss(denoiser, noise, weighting, config.p_mean, config.p_std, sigma_data)
        else:
            self.loss_fn = make_loss(config.loss)

        self.ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
        optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        self.model, self.optimizer = acc.prepare(denoiser, optimizer)
        self.unwrapped = acc.unwrap_model(self.model)  # once: unwrap_model walks the module tree (1 ms a step)
        self.ema.to(acc.device)
        self.feed = BatchFeed(
            self.num_items, seed=config.seed, batch_size=config.batch_size, grad_accum=config.grad_accum,
            processes=processes, process_index=acc.process_index, device=acc.device,
            images=self.dataset.images if self.dataset is not None else None, streamed=self.streamed,
            cached=config.cache_latents and self.latent, num_workers=config.num_workers,
        )
        self.labels = self.labels.to(acc.device) if self.labels is not None else None
        self.step = 0
        self.images_seen = 0
        self.skipped_steps = 0
        self.unreadable: set[str] = set()
        self.buckets = SigmaBucketLog()
        if config.resume:
            self.load(self.output_dir / CHECKPOINT_NAME)
            if acc.is_main_process:
                self.folder.keep([CHECKPOINT_NAME])
            self.found = f"found a checkpoint at step {self.step} in {self.output_dir}: " + (
                f"resuming to step {config.steps}" if self.step < config.steps else f"the run is done (--steps {config.steps})")
        self._log_lines: list[str] | None = None  # log.jsonl as this job rewrites it (None: no record yet)
        self._log_written: int | None = None  # how many of them the file holds (None: not rewritten yet)
        self._log_held = not config.resume and (self.output_dir / CHECKPOINT_NAME).is_file()  # see _write_log
        self.cache = self._latent_cache() if config.cache_latents and self.latent else None
        if acc.is_main_process:
            print(self.found, flush=True)
        if self.loss_fn.needs_calibration:  # balanced weighting: the model's own loss per sigma, at step 0
            reduce = None if acc.num_processes == 1 else (
                lambda t: acc.reduce(t.float().to(acc.device), reduction="mean").cpu().double())
            self.loss_fn.calibrate(self.unwrapped, (self.prepare_batch(s, r) for s in itertools.count()
                                                    for r in range(config.grad_accum)), reduce, seed=config.seed)

    # ---- data ------------------------------------------------------------------------
    def _open_data(self, dataset: ImageDataset | None) -> None:
        """Set the data (in memory or streamed), its labels / captions and the image shape."""
        cfg = self.config
        size = parse_resolution(cfg.resolution)
        self.dataset, self.streamed, self.captions = None, None, None
        builtin = dataset is None and cfg.dataset is None and cfg.data in (None, "digits")
        if builtin and self.pretrained is not None:
            raise InvalidArgument("data", "fine-tuning needs your images: give --data FOLDER or --dataset NAME_OR_PATH")
        if dataset is not None or builtin:
            if builtin and size is not None and size[0] != size[1]:
                raise InvalidArgument("resolution", f"the built-in digits are square, got {size[0]},{size[1]}")
            if self.text_conditioned:
                raise InvalidArgument("data", "a text-to-image model needs captions: give --data FOLDER or --dataset with captions")
            self.dataset = dataset if dataset is not None else load_builtin_digits(size[0] if size else DIGITS_RESOLUTION)
            if size is not None and dataset is not None and tuple(dataset.images.shape[-2:]) != size:
                raise InvalidArgument("resolution", f"{size} does not match the in-memory images {tuple(dataset.images.shape[-2:])}")
            self.image_shape = tuple(self.dataset.images.shape[1:])
            self.num_items, self.num_classes = len(self.dataset), self.dataset.num_classes if cfg.class_conditional else 0
            self.labels = self.dataset.labels
            if cfg.class_conditional and self.num_classes < 1:
                raise InvalidArgument("class_conditional", "needs a dataset with class subfolders (or the built-in digits)")
            self.scan_skipped: list[tuple[str, str]] = []
            return
        from .sources import StreamedImages, open_source, source_mode, source_resolution

        source = open_source(cfg.data, cfg.dataset, cfg.image_column, cfg.caption_column)
        if self.pretrained is not None:
            size = size or self.pretrained.default_resolution()
            self.pretrained.check_resolution(size)
            channels = self.pretrained.unet_config.get("in_channels", 3) if not self.latent else 3
            mode = "L" if channels == 1 else "RGB"
            self.num_classes = self.pretrained.num_classes
        else:
            size = size or source_resolution(source)
            mode = source_mode(source)
            self.num_classes = len(source.class_names) if cfg.class_conditional else 0
            if cfg.class_conditional and self.num_classes < 1:
                raise InvalidArgument("class_conditional", "needs class subfolders in --data (or a 'label' column in --dataset)")
        if self.num_classes and source.labels is None:
            raise InvalidArgument("data", "the model is class-conditional but the data has no class subfolders / 'label' column")
        if self.text_conditioned:
            if source.captions is None:
                error = source.caption_error
                raise InvalidArgument(error.name, f"{error.problem}; a text-to-image model needs captions")
            self.captions = source.captions
        self.labels = torch.tensor(source.labels, dtype=torch.long) if source.labels is not None else None
        self.streamed = StreamedImages(source, size, mode)
        self.image_shape = (1 if mode == "L" else 3, *size)
        self.num_items = len(source)
        self.scan_skipped = list(source.report.skipped)

    def _latent_cache(self):
        """Open (building it first if needed) the latent cache of ``--cache-latents``."""
        import os

        from .latents import CACHE_DIR, CACHE_FILES, LatentCache

        cfg, acc = self.config, self.accelerator
        items: Any
        if hasattr(self.streamed.source, "files"):
            items = [(self.streamed.source.name(i), os.stat(p).st_size, os.stat(p).st_mtime_ns)
                     for i, p in enumerate(self.streamed.source.files)]
        else:
            items = getattr(self.streamed.source.data, "_fingerprint", None)
        key = {"pretrained": str(Path(cfg.pretrained).resolve()), "vae": self.pretrained.component("vae"),
               "vae_config": (self.pretrained.root / "vae" / "config.json").read_text(),
               "vae_dtype": str(self.codec.vae.dtype), "resolution": list(self.image_shape[1:]), "flip": cfg.random_flip,
               "items": items}
        cache = LatentCache(self.output_dir / CACHE_DIR, key)
        if acc.is_main_process and cache.valid():
            self.folder.keep(f"{CACHE_DIR}/{name}" for name in CACHE_FILES)  # reused: this run's too
        elif acc.is_main_process:
            def batches():
                loader = torch.utils.data.DataLoader(
                    self.streamed, batch_size=self.micro_batch, shuffle=False,
                    num_workers=cfg.num_workers, collate_fn=collate_images)
                for batch in loader:
                    yield {**batch, "images": batch["images"].to(acc.device)}

            cache.build(batches, self.codec, self.num_items, cfg.random_flip, progress=cfg.progress)
        acc.wait_for_everyone()
        cache.open()
        self.unreadable.update(cache.failed)
        return cache

    # ---- one step -------------------------------------------------------------------
    def prepare_batch(self, step: int, round_: int) -> Batch:
        """Micro-batch ``round_`` of step ``step`` with every random draw made (see module docstring).

        Draw order from the step's generator: flips, latent sample, caption dropout,
        augmentation, sigma, noise.
        """
        cfg, acc = self.config, self.accelerator
        seed = step_seed(cfg.seed, step, acc.process_index, round_)
        torch.manual_seed(seed)  # dropout and anything else on the global generator
        generator = torch.Generator(device=acc.device).manual_seed(seed)
        raw = self.feed.fetch(step, round_)
        index = raw["index"]
        flips = None
        if cfg.random_flip:
            flips = torch.rand(index.shape[0], generator=generator, device=acc.device) < 0.5
        if self.cache is not None:
            y = self.codec.sample(self.cache.moments(index, flips).to(acc.device), generator)
        else:
            y = raw["images"]
            if flips is not None:
                y = torch.where(flips.reshape(-1, 1, 1, 1), y.flip(-1), y)
            if self.codec is not None:
                y = self.codec.sample(self.codec.moments(y), generator)
        kwargs: dict[str, Any] = {}
        if self.num_classes:
            kwargs["class_labels"] = self.labels[index]
        if self.text is not None:
            captions = [self.captions[i] for i in index.tolist()]
            if cfg.caption_dropout > 0:
                drop = (torch.rand(len(captions), generator=generator, device=acc.device) < cfg.caption_dropout).tolist()
                captions = ["" if d else c for c, d in zip(captions, drop)]
            kwargs["encoder_hidden_states"] = self.text(captions).to(y.dtype)
        if self.augment is not None:
            y, kwargs["augment_labels"] = self.augment(y, generator)
        sigma = self.loss_fn.sample_sigma(y.shape[0], generator, y.device)
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        return Batch(y, sigma, noise, kwargs, raw["failed"])

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
            batch = self.prepare_batch(self.step, round_)
            self._report_unreadable(batch.failed)
            last = round_ == cfg.grad_accum - 1
            context = acc.no_sync(self.model) if not last else _null_context()
            with context:
                out = denoising_loss(self.model, batch.y, batch.sigma, batch.noise, self.loss_fn.weight(batch.sigma),
                                     batch.model_kwargs)
                loss = out.loss.mean() / cfg.grad_accum
                acc.backward(loss)
            self.buckets.add(out.loss, out.sigma)
            total += loss.detach().float()

        lr = cfg.learning_rate * min((self.images_seen + cfg.batch_size) / max(cfg.lr_warmup_images, 1), 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        norms = None
        if cfg.max_grad_norm is not None:  # fp16: accelerate unscales first
            norms = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm).reshape(1)
        if cfg.mixed_precision == "fp16":
            self.optimizer.step()
            skipped = bool(acc.optimizer_step_was_skipped)
        else:
            if norms is None:
                norms = torch.stack(torch._foreach_norm([p.grad for p in self.model.parameters() if p.grad is not None]))
            skipped = not bool(norms.isfinite().all())  # one sync
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

    def _report_unreadable(self, names: list[str]) -> None:
        new = [n for n in names if n not in self.unreadable]
        if new:
            from tqdm.auto import tqdm

            self.unreadable.update(new)
            for name in new:
                tqdm.write(f"skipped an unreadable image: {name}")

    # ---- checkpoints -----------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "skipped_steps": self.skipped_steps,
            "config": self.config.to_json(),
            "loss": self.loss_fn.state_dict(),
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
            if self._log_held:  # the old run's checkpoint is replaced: its log goes too
                self._log_held = False
                self._flush_log()
        self.accelerator.wait_for_everyone()
        return path

    def load(self, path: Path) -> None:
        """Restore everything :meth:`save` wrote; refuses a checkpoint of a different setup."""
        ckpt = load_checkpoint(path)
        saved = ckpt["state"]["config"]
        now = self.config.to_json()
        for key in RESUME_FIELDS:
            if saved.get(key) != now.get(key):
                raise InvalidArgument(key, f"was {saved.get(key)!r} in the checkpoint being resumed, got {now.get(key)!r}; "
                                           "a resumed run keeps the setup it started with")
        self.unwrapped.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        self.loss_fn.load_state_dict(state.get("loss", {}))
        self.step, self.images_seen, self.skipped_steps = state["step"], state["images_seen"], state["skipped_steps"]
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch_cpu"])
        if "torch_cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt["rng"]["torch_cuda"])

    # ---- the loop --------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train until ``config.steps``, checkpointing (with a sample grid), then export; the run
        folder is given back when it ends, however it ends.

        SIGINT / SIGTERM end the loop after the current step (all processes at the same step): the
        checkpoint is written, the command that resumes is printed, and the process exits with
        130 / 143 (`safety.GracefulStop`)."""
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for name, why in self.scan_skipped:
                print(f"skipped an unreadable image: {name} ({why})")
        start_time, start_step = time.perf_counter(), self.step
        saved_step = self.step if cfg.resume else None
        history: list[dict[str, Any]] = []
        last_loss = math.nan
        running, count = torch.zeros((), device=acc.device), 0
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and acc.is_main_process), desc="train",
                   unit="step")
        with GracefulStop() as stop:
            while self.step < cfg.steps:
                info = self.train_step()
                running, count = running + info["loss"], count + 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    if acc.num_processes > 1:
                        running = acc.reduce(running, reduction="mean")  # sigma buckets stay per process
                    last_loss = float(running) / count
                    seconds = time.perf_counter() - start_time
                    record = {
                        "step": self.step, "images": self.images_seen, "loss": last_loss, "lr": info["lr"],
                        "skipped_steps": self.skipped_steps, "seconds": seconds,
                        "images_per_second": (self.step - start_step) * cfg.batch_size / max(seconds, 1e-9),
                        "unreadable_images": len(self.scan_skipped) + len(self.unreadable),
                        "loss_by_sigma": self.buckets.means(),
                    }
                    history.append(record)
                    bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{record['images_per_second']:.1f}")
                    if acc.is_main_process:
                        self._write_log(record, start_step)
                    running, count = torch.zeros((), device=acc.device), 0
                    self.buckets.reset()
                if self.step % cfg.checkpoint_every == 0 and self.step != cfg.steps:
                    self.save()
                    saved_step = self.step
                    if cfg.num_samples and acc.is_main_process:
                        self.write_sample_grid(self.output_dir / sample_grid_name(self.step))
                if self._stop_signal(stop):
                    break
        bar.close()
        self.feed.close()
        if stop.requested:
            if saved_step != self.step:
                self.save()
            if not acc.is_main_process:
                raise SystemExit(stop.exit_code)
            stop.exit(f"checkpoint written at step {self.step} of {cfg.steps} in {self.output_dir}", self._resume_hint())
        if start_step == self.step or self.step == cfg.steps:
            self.save()
        seconds = time.perf_counter() - start_time
        result = TrainResult(str(self.output_dir), self.step, self.images_seen, self.skipped_steps, last_loss, seconds,
                             history=history)
        if acc.is_main_process:
            if cfg.export and self.family not in ("edm", "ddpm"):
                print(f"not exporting: EDMScheduler pipelines need the EDM or DDPM preconditioning, this run used {cfg.loss!r}")
            elif cfg.export:
                from .export import export_pipeline

                self.check_finite_ema("not exported")
                result.pipeline_dir = str(export_pipeline(self, self.output_dir / PIPELINE_DIR, overwrite=True,
                                                          scheduler=cfg.export_scheduler))
            if cfg.num_samples:
                result.samples_path = str(self.write_sample_grid(self.output_dir / SAMPLES_NAME))
            self.folder.commit()
        acc.wait_for_everyone()
        return result

    def _stop_signal(self, stop: GracefulStop) -> bool:
        """Whether any process was asked to stop (SIGINT / SIGTERM); with several processes the
        signal is agreed on (one tiny collective per step), so all stop after the same step."""
        if self.accelerator.num_processes > 1:
            signums = self.accelerator.gather(torch.tensor([stop.signum or 0], device=self.accelerator.device))
            stop.signum = int(signums.max()) or None
        return stop.requested

    def _resume_hint(self) -> str:
        """The command that continues this run (the in-memory data of the Python API aside)."""
        command = resume_command(self._arguments())
        if self.in_memory_data and self.argv is None:
            return f"train() again with the same data and resume=True (the CLI equivalent: {command})"
        return command

    def _write_log(self, record: dict[str, Any], start_step: int) -> None:
        """Add ``record`` to log.jsonl (main process). The job's first record starts from what a
        fresh run keeps (nothing) or a resumed one (`_earlier_log_lines`). An ``--overwrite`` run
        over a checkpoint keeps its records in memory until its first checkpoint replaces that one
        (`save`): killed before, it leaves the old run's log as it was, for ``--resume``."""
        if self._log_lines is None:
            self._log_lines = self._earlier_log_lines(start_step)
        self._log_lines.append(json.dumps(record) + "\n")
        if not self._log_held:
            self._flush_log()

    def _earlier_log_lines(self, start_step: int) -> list[str]:
        """What a resumed job keeps of log.jsonl: the records up to its checkpoint, if the run it
        continues wrote them (none of another run's, none past the checkpoint, which it repeats)."""
        path = self.output_dir / LOG_NAME
        if not (self.config.resume and path.is_file() and self.folder.writer(LOG_NAME) == self.folder.run_id):
            return []
        return [line for line in path.read_text().splitlines(keepends=True) if _log_step(line) <= start_step]

    def _flush_log(self) -> None:
        """Write the records log.jsonl lacks: the job's first write replaces the file whole, the
        later ones append (both atomic)."""
        path = self.output_dir / LOG_NAME
        if self._log_lines is None:
            return
        if self._log_written is None:
            atomic_write_text(path, "".join(self._log_lines))
        elif len(self._log_lines) > self._log_written:
            append_text(path, "".join(self._log_lines[self._log_written:]))
        self._log_written = len(self._log_lines)

    def check_finite_ema(self, outcome: str) -> None:
        """`NonFiniteWeightsError` if the EMA weights hold NaN or inf (the run diverged), saying
        what is not done (``outcome``) and that the checkpoint was kept."""
        assert_finite_state(self.ema.state_dict(), f"the EMA weights at step {self.step} in {self.output_dir} (the run "
                                                   f"diverged: lower --lr, or clip with --max-grad-norm; {outcome})")

    # ---- samples ---------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, num: int, seed: int = 0, use_ema: bool = True, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``num`` images in [-1, 1] with the EDM Heun sampler from fixed seeds (zero augmentation
        vector; text models: the first captions of the data, with classifier-free guidance)."""
        from edm_sampling.samplers import denoiser_sigmas, sample

        device = self.accelerator.device
        denoiser = self.ema if use_ema else self.unwrapped
        denoiser.eval()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        latents = torch.randn((num, *self.sample_shape), generator=generator).to(device)
        kwargs: dict[str, Any] = {}
        if self.num_classes:
            labels = class_labels if class_labels is not None else torch.arange(num) % self.num_classes
            kwargs["class_labels"] = labels.to(device)
        if self.text is not None:
            captions = [self.captions[i % len(self.captions)] for i in range(num)]
            denoiser = GuidedDenoiser(denoiser, self.text(captions).float(), self.text([""] * num).float(),
                                      self.config.guidance_scale)
        sigmas = denoiser_sigmas(denoiser, self.config.sample_steps)
        out = sample(denoiser, latents, sigmas, model_kwargs=kwargs).sample
        if self.codec is not None:
            return self.codec.decode(out).cpu()
        return out.clamp(-1, 1).cpu()

    def write_sample_grid(self, path: Path, seed: int = 0) -> Path:
        from edm_sampling.images import save_image_grid

        self.check_finite_ema(f"no sample grid {path.name} written")
        images = self.generate(self.config.num_samples, seed=seed)
        return save_image_grid(images, path, max_images=None, scale=4 if images.shape[-1] <= 32 else 1, pad_value=-1.0)


def _log_step(line: str) -> float:
    """The step of a log.jsonl line (a line that is not a record counts as before every step)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -math.inf


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(config: TrainConfig, dataset: ImageDataset | None = None, argv: list[str] | None = None) -> TrainResult:
    """Validate, build and run a training job (see :class:`TrainConfig`); ``argv``: the
    `edm-sampling` arguments that started it, if any (for the resume command)."""
    return Trainer(config, dataset, argv).run()
