"""`edm-sampling train`: train a UNet with the EDM recipe, export it, write a sample grid.

Defaults train a small UNet on the built-in scikit-learn digits (upscaled to 16x16) on CPU.
Works under `accelerate launch -m edm_sampling.cli train ...` on one or many GPUs. The
module imports nothing heavy: torch, diffusers and accelerate load when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `train` subcommand to the `edm-sampling` parser."""
    import dataclasses

    from .config import TrainConfig

    d = {f.name: f.default for f in dataclasses.fields(TrainConfig)}

    p = subparsers.add_parser(
        "train",
        help="train a diffusers UNet with the EDM recipe (built-in digits by default)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--output-dir", default=d["output_dir"], help="run folder: checkpoint, log, pipeline/, samples.png (default: %(default)s)")
    p.add_argument("--data", default=d["data"], help="image folder (PNG/JPEG, optional class subfolders); default: built-in digits")
    p.add_argument("--resolution", type=int, default=d["resolution"], help="size of the built-in digits (default: %(default)s)")
    p.add_argument("--loss", default=d["loss"], help="edm, vp or ve (default: %(default)s)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps in total (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="images per optimizer step, all processes (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"], help="gradient-accumulation rounds per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d["lr"], help="Adam learning rate (default: %(default)s)")
    p.add_argument("--lr-warmup-images", type=int, default=d["lr_warmup_images"], help="linear warm-up length in images (default: %(default)s)")
    p.add_argument("--ema-halflife-images", type=float, default=d["ema_halflife_images"], help="EMA half-life in images (default: %(default)s)")
    p.add_argument("--ema-rampup-ratio", type=float, default=d["ema_rampup_ratio"], help="EMA half-life at most this x images seen (default: %(default)s)")
    p.add_argument("--augment-p", type=float, default=d["augment_p"], help="non-leaky augmentation probability (default: %(default)s)")
    p.add_argument("--class-conditional", action="store_true", help="condition on class labels (class subfolders / digit labels)")
    p.add_argument("--sigma-data", type=float, default=d["sigma_data"], help="data std for EDM preconditioning (default: %(default)s)")
    p.add_argument("--channels", type=lambda s: tuple(int(c) for c in s.split(",")), default=d["block_out_channels"],
                   dest="block_out_channels", help="UNet block widths, comma separated (default: 16,32,64)")
    p.add_argument("--layers-per-block", type=int, default=d["layers_per_block"], help="(default: %(default)s)")
    p.add_argument("--attention", action="store_true", help="self-attention in the lowest-resolution block")
    p.add_argument("--dropout", type=float, default=d["dropout"], help="(default: %(default)s)")
    p.add_argument("--mixed-precision", default=d["mixed_precision"], help="no, fp16 or bf16 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="(default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"], help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=d["log_every"], help="steps between log lines (default: %(default)s)")
    p.add_argument("--sample-steps", type=int, default=d["sample_steps"], help="Heun steps for the sample grid (default: %(default)s)")
    p.add_argument("--num-samples", type=int, default=d["num_samples"], help="images in the sample grid, 0 for none (default: %(default)s)")
    p.add_argument("--no-export", dest="export", action="store_false", help="do not write the pipeline folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    group.add_argument("--overwrite", action="store_true", help="start over in an existing --output-dir")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Build the config from the parsed flags, train, and print where the results are."""
    import dataclasses

    from .config import TrainConfig
    from .trainer import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    result = train(config)
    print(
        f"trained {result.steps} steps ({result.images_seen} images, {result.skipped_steps} skipped) "
        f"in {result.seconds:.1f} s, last loss {result.last_loss:.4f}"
    )
    if result.pipeline_dir:
        print(f"pipeline: {result.pipeline_dir}")
    if result.samples_path:
        print(f"samples:  {result.samples_path}")
    return 0
