"""Fine-tuning step time: the EDM trainer vs a plain diffusers fine-tuning step, pixel and latent.

Both start from the same saved pipeline (a DDPMPipeline UNet2DModel; a StableDiffusionPipeline
with UNet2DConditionModel, AutoencoderKL and CLIP text encoder), read the same image folder
through a DataLoader, and use Adam and an EMA on the same accelerate `Accelerator`, in the same
process. Blocks of steps of the two alternate so machine load hits both alike; the median
per-step times are compared. The EDM step is `Trainer.train_step` with `--pretrained`
(per-step seeding; the default --pretrained recipe: the model's own timesteps and
preconditioning, the balanced weighting interpolated per sample; sigma buckets, the non-finite
check, warm-up, EMA; latent: VAE encode + posterior sample, caption tokenization and encoding
every step). The plain step is `finetune_common.plain_step_fn`.

    python benchmarks/finetune_step_time.py                       # CPU
    python benchmarks/finetune_step_time.py --device cuda --batch-size 32 --size 64

Target (issue 10): EDM / plain <= 1.05 for both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_common import plain_step_fn, save_latent_pipeline, save_pixel_pipeline, use_cpu_if_asked, write_images  # noqa: E402


def alternate_timings(first, second, rounds: int, block: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Seconds per call of ``first`` and ``second``: blocks of ``block`` calls alternate (who goes
    first swaps every round) after one warm-up block each."""
    times: dict = {first: [], second: []}
    schedule = [first, second] + [fn for r in range(rounds) for fn in ((first, second), (second, first))[r % 2]]
    for k, fn in enumerate(schedule):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(block):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if k >= 2:
            times[fn].append((time.perf_counter() - start) / block)
    return times[first], times[second]


def measure(kind: str, args, root: Path) -> dict:
    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.trainer import Trainer

    channels = tuple(int(c) for c in args.channels.split(","))
    data = write_images(root / "data", args.images, args.size)
    save = save_pixel_pipeline if kind == "pixel" else save_latent_pipeline
    pipeline = save(root / kind, args.size, channels)
    config = TrainConfig(output_dir=str(root / f"run-{kind}"), pretrained=str(pipeline), data=str(data),
                         batch_size=args.batch_size, lr=1e-4, progress=False, export=False, num_samples=0,
                         mixed_precision=args.mixed_precision, num_workers=args.workers)
    trainer = Trainer(config)
    plain = plain_step_fn(pipeline, data, args.size, args.batch_size, trainer.accelerator, 1e-4, kind == "latent")
    edm, base = alternate_timings(trainer.train_step, plain, args.rounds, args.block, trainer.accelerator.device)
    trainer.feed.close()
    result = {"kind": kind, "edm_step_s": statistics.median(edm), "plain_step_s": statistics.median(base)}
    result["ratio"] = result["edm_step_s"] / result["plain_step_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--channels", default="32,64,64", help="UNet block widths")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the EDM trainer")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=3, help="steps per timed block")
    parser.add_argument("--kinds", default="pixel,latent")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cpu_if_asked(args.device)
    results = []
    with tempfile.TemporaryDirectory(prefix="edm-ft-bench-") as tmp:
        for kind in args.kinds.split(","):
            results.append(measure(kind, args, Path(tmp)))
            r = results[-1]
            print(f"{kind}: EDM fine-tune step {r['edm_step_s'] * 1e3:.1f} ms / plain diffusers step "
                  f"{r['plain_step_s'] * 1e3:.1f} ms = {r['ratio']:.3f} (target <= 1.05)")
    summary = {"device": args.device, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
               "size": args.size, "channels": args.channels, "results": results}
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
