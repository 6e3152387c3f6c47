"""`edm-sampling train`: train or fine-tune a UNet with the EDM recipe, export it, write sample grids.

Defaults train a small UNet on the built-in scikit-learn digits (upscaled to 16x16) on CPU;
`--pretrained PATH --data FOLDER` fine-tunes a local diffusers pipeline on your images.
Works under `accelerate launch -m edm_sampling.cli train ...` on one or many GPUs. The
module imports nothing heavy: torch, diffusers and accelerate load when the command runs.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `train` subcommand to the `edm-sampling` parser."""
    import dataclasses

    from .config import TrainConfig, parse_channels

    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a diffusers UNet with the EDM recipe (built-in digits by default)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--output-dir", default=d["output_dir"], help="run folder: checkpoint, log, pipeline/, samples.png (default: %(default)s)")
    data = p.add_argument_group("data")
    data.add_argument("--data", default=d["data"], help="image folder, streamed (PNG/JPEG/WebP; metadata.jsonl captions; class subfolders); default: built-in digits")
    data.add_argument("--dataset", default=d["dataset"], help="a Hugging Face dataset: a save_to_disk folder (or a hub name when online); needs the 'datasets' extra")
    data.add_argument("--image-column", default=d["image_column"], help="image column of --dataset (default: %(default)s)")
    data.add_argument("--caption-column", default=d["caption_column"], help="caption column of --dataset / metadata.jsonl (default: %(default)s)")
    data.add_argument("--resolution", default=d["resolution"], help="training size S or H,W: images are resized and centre-cropped (default: 16 for digits, the model's own size, or the folder's)")
    data.add_argument("--random-flip", action="store_true", help="mirror each image with probability 1/2")
    data.add_argument("--caption-dropout", type=float, default=d["caption_dropout"], help="probability of an empty caption, for classifier-free guidance (default: %(default)s)")
    data.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=d["cache_latents"],
                      help="latent models: encode every image once into the run folder")
    data.add_argument("--num-workers", type=int, default=d["num_workers"], help="DataLoader worker processes (default: %(default)s)")
    model = p.add_argument_group("model")
    model.add_argument("--pretrained", default=d["pretrained"], help="fine-tune a local diffusers pipeline folder (DDPM, DDIM, Stable Diffusion, EDMPipeline) or a bare UNet folder")
    model.add_argument("--scheduler-config", default=d["scheduler_config"], help="scheduler_config.json (or its folder) for a bare --pretrained UNet folder")
    model.add_argument("--loss", default=d["loss"], help="edm (log-normal sigma, EDM weighting), ddpm (uniform timesteps, MSE on the net's output); from scratch also vp, ve (default: edm; with --pretrained the model's own noise levels, balanced weighting)")
    model.add_argument("--noise-distribution", default=d["noise_distribution"], help="override the recipe's noise levels: native (the model's own: ddpm timesteps or EDM's log-normal), lognormal or ddpm")
    model.add_argument("--loss-weighting", default=d["loss_weighting"], help="override the recipe's weighting: native (MSE on the net's own output), edm, or balanced (1 / the model's own loss at each sigma, measured before step 1)")
    model.add_argument("--p-mean", type=float, default=d["p_mean"], help="log-normal noise: mean of ln sigma (default: %(default)s)")
    model.add_argument("--p-std", type=float, default=d["p_std"], help="log-normal noise: std of ln sigma (default: %(default)s)")
    model.add_argument("--sigma-data", type=float, default=d["sigma_data"], help="data std for EDM preconditioning / weighting (default: %(default)s)")
    model.add_argument("--class-conditional", action="store_true", help="condition on class labels (class subfolders / digit labels)")
    model.add_argument("--channels", type=parse_channels, default=d["block_out_channels"],
                       dest="block_out_channels", help="new UNet: block widths, comma separated (default: 16,32,64)")
    model.add_argument("--layers-per-block", type=int, default=d["layers_per_block"], help="new UNet (default: %(default)s)")
    model.add_argument("--attention", action="store_true", help="new UNet: self-attention in the lowest-resolution block")
    model.add_argument("--dropout", type=float, default=d["dropout"], help="new UNet (default: %(default)s)")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps in total (default: %(default)s)")
    opt.add_argument("--batch-size", type=int, default=d["batch_size"], help="images per optimizer step, all processes (default: %(default)s)")
    opt.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="gradient-accumulation rounds per step (default: %(default)s)")
    opt.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate (default: 2e-3 from scratch, 1e-4 fine-tuning)")
    opt.add_argument("--lr-warmup-images", type=int, default=d["lr_warmup_images"], help="linear warm-up length in images (default: %(default)s)")
    opt.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"], help="clip the gradient norm to this (default: no clipping)")
    opt.add_argument("--ema-halflife-images", type=float, default=d["ema_halflife_images"], help="EMA half-life in images (default: %(default)s)")
    opt.add_argument("--ema-rampup-ratio", type=float, default=d["ema_rampup_ratio"], help="EMA half-life at most this x images seen (default: %(default)s)")
    opt.add_argument("--augment-p", type=float, default=d["augment_p"], help="non-leaky augmentation probability, pixel models (default: %(default)s)")
    opt.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=d["gradient_checkpointing"],
                     help="recompute UNet activations in the backward pass (less memory)")
    opt.add_argument("--mixed-precision", default=d["mixed_precision"], help="no, fp16 or bf16 (GPU; default: %(default)s)")
    opt.add_argument("--seed", type=int, default=d["seed"], help="(default: %(default)s)")
    out = p.add_argument_group("output")
    out.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"], help="steps between checkpoints and sample grids (default: %(default)s)")
    out.add_argument("--log-every", type=int, default=d["log_every"], help="steps between log lines (default: %(default)s)")
    out.add_argument("--sample-steps", type=int, default=d["sample_steps"], help="Heun steps for the sample grids (default: %(default)s)")
    out.add_argument("--num-samples", type=int, default=d["num_samples"], help="images in each sample grid, 0 for none (default: %(default)s)")
    out.add_argument("--guidance-scale", type=float, default=d["guidance_scale"], help="classifier-free guidance of text models' sample grids (default: %(default)s)")
    out.add_argument("--export-scheduler", default=d["export_scheduler"], help="scheduler of the exported pipeline: edm or original (default: %(default)s)")
    out.add_argument("--export", action=argparse.BooleanOptionalAction, default=d["export"], help="write the pipeline folder (default: on)")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d["progress"], help="show a progress bar (default: on)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint, with "
                       "its settings: flags typed with --resume replace them (those that change the model or data are refused)")
    group.add_argument("--overwrite", action="store_true", help="start a new run in an existing --output-dir: the old "
                       "files stay until the new run replaces them; files edm_sampling did not write are kept")
    p.set_defaults(func=run)
    return p


# Fields a resumed run never takes from its checkpoint: where and how this job starts.
JOB_FIELDS = ("output_dir", "resume", "overwrite")


def _train_parser() -> argparse.ArgumentParser:
    """A fresh parser of the `train` subcommand (its flags, defaults and spellings)."""
    return register(argparse.ArgumentParser().add_subparsers())


def _flag_tokens(action: argparse.Action, value) -> list[str]:
    """The arguments that set ``action``'s field to ``value``: a switch's spelling (``--no-X``
    for False), or the flag and its value as text (sequences comma separated)."""
    if isinstance(action, argparse.BooleanOptionalAction):
        return [action.option_strings[0 if value else 1]]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return [action.option_strings[0]]
    return [action.option_strings[0], ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)]


def config_argv(config, names: Collection[str] | None = None) -> list[str]:
    """The `edm-sampling` arguments that give ``config`` (a TrainConfig): every field that differs
    from its default, as its flag (how a run started from Python is resumed from the shell);
    ``names``: only these fields."""
    import dataclasses

    fields = {f.name: f.default for f in dataclasses.fields(config)}
    fields["loss"] = type(config)(pretrained=config.pretrained).loss  # "edm" from scratch, None with --pretrained
    argv = ["train"]
    for action in _train_parser()._actions:
        name = action.dest
        if not action.option_strings or name not in fields or (names is not None and name not in names):
            continue
        value = getattr(config, name)
        if value != fields[name]:
            argv += _flag_tokens(action, value)
    return argv


def typed_fields(argv: Sequence[str]) -> set[str]:
    """The fields the user set on the `edm-sampling` command line ``argv`` (its first word the
    subcommand), whatever the spelling (an abbreviation, ``--no-X``, ``--flag=value``): ``argv``
    parsed again by a copy of the parser whose defaults are all SUPPRESS, so only typed flags
    come back."""
    parser = _train_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    return set(vars(parser.parse_args(list(argv)[1:])))


def take_saved_settings(values: dict[str, Any], saved: Mapping[str, Any], typed: Collection[str]) -> tuple[dict[str, Any], list[str]]:
    """(``values`` with every field the user did not type taken from ``saved``, those fields):
    ``values`` the TrainConfig fields of the parsed flags, ``saved`` the config a checkpoint
    recorded (`TrainConfig.to_json`). A resumed run keeps its own settings; what the user typed
    wins, the `JOB_FIELDS` stay this job's."""
    taken = [name for name in values if name in saved and name not in typed and name not in JOB_FIELDS]
    merged = dict(values)
    for name in taken:
        value = saved[name]
        merged[name] = tuple(value) if isinstance(value, list) else value  # JSON keeps tuples as lists
    return merged, taken


def run(args: argparse.Namespace) -> int:
    """Build the config from the parsed flags, train, and print where the results are. With
    ``--resume`` the flags not typed take the checkpoint's settings (`take_saved_settings`);
    a checkpoint whose header cannot be read is left to the trainer, which says why."""
    import dataclasses

    from .checkpoint import CHECKPOINT_NAME, checkpoint_state
    from .config import TrainConfig
    from .trainer import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    argv = getattr(args, "argv", None)
    saved = checkpoint_state(Path(args.output_dir) / CHECKPOINT_NAME) if args.resume and argv is not None else None
    taken: list[str] = []
    if saved is not None and isinstance(saved.get("config"), dict):
        values, taken = take_saved_settings(values, saved["config"], typed_fields(argv))
    config = TrainConfig(**values)
    shown = config_argv(config, taken)[1:]
    if shown and int(os.environ.get("RANK", "0")) == 0:
        print(f"settings from the checkpoint: {shlex.join(shown)}", flush=True)
    result = train(config, argv=argv)
    if not result.history:
        print(f"nothing to train: the run is at step {result.steps} of {config.steps}")
    else:
        print(f"trained {result.steps} steps ({result.images_seen} images, {result.skipped_steps} skipped) "
              f"in {result.seconds:.1f} s, last loss {result.last_loss:.4f}")
    if result.pipeline_dir:
        print(f"pipeline: {result.pipeline_dir}")
    if result.samples_path:
        print(f"samples:  {result.samples_path}")
    return 0
