"""Peak memory of latent fine-tuning: the EDM trainer vs the plain diffusers loop.

The same small StableDiffusionPipeline and captioned image folder; VAE and text encoder
frozen in both. Each side runs in its own fresh process: set-up (load the pipeline, build the
optimizer and EMA), one warm-up step, then the peak-RSS mark is reset (Linux
``/proc/self/clear_refs``) and ``--steps`` more optimizer steps run. Reported: the resident
memory before the measured steps, its peak during them (weights, optimizer state,
activations, everything the libraries allocated) and the difference, the step's own working
memory; on CUDA also ``torch.cuda.max_memory_allocated`` over the measured steps. The plain side is `finetune_common.plain_step_fn`.

    python benchmarks/finetune_memory.py
    python benchmarks/finetune_memory.py --device cuda --size 256 --channels 128,256,256 --batch-size 8

Target (issue 10): EDM peak / plain peak <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def worker(args) -> None:
    import torch

    from finetune_common import plain_step_fn, use_cpu_if_asked

    torch.set_num_threads(1)
    use_cpu_if_asked(args.device)
    root = Path(args.root)
    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.trainer import Trainer

    config = TrainConfig(output_dir=str(root / f"run-{args.worker}"), pretrained=str(root / "sd"), data=str(root / "data"),
                         batch_size=args.batch_size, lr=1e-4, progress=False, export=False, num_samples=0,
                         overwrite=True)
    if args.worker == "edm":
        step = Trainer(config).train_step
    else:
        from accelerate import Accelerator

        step = plain_step_fn(root / "sd", root / "data", args.size, args.batch_size, Accelerator(), 1e-4, latent=True)
    step()  # warm-up: optimizer state and caches exist from here on
    if torch.cuda.is_available() and args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
    before = _status_mb("VmRSS")
    for _ in range(args.steps):
        step()
    peak = _status_mb("VmHWM")
    result = {"rss_before_steps_mb": before, "peak_rss_mb": peak, "step_rss_mb": peak - before}
    if torch.cuda.is_available() and args.device == "cuda":
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--channels", default="64,128,128")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from finetune_common import save_latent_pipeline, write_images

    results = {}
    with tempfile.TemporaryDirectory(prefix="edm-ft-mem-") as tmp:
        root = Path(tmp)
        write_images(root / "data", args.images, args.size)
        save_latent_pipeline(root / "sd", args.size, tuple(int(c) for c in args.channels.split(",")))
        for side in ("plain", "edm", "plain", "edm"):  # twice each, the smaller peak counts
            command = [sys.executable, __file__, "--worker", side, "--root", tmp, "--device", args.device,
                       "--batch-size", str(args.batch_size), "--size", str(args.size), "--steps", str(args.steps)]
            out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), check=True).stdout
            value = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            for key, v in value.items():
                results[f"{side}_{key}"] = min(v, results.get(f"{side}_{key}", float("inf")))
    results["ratio_rss"] = results["edm_peak_rss_mb"] / results["plain_peak_rss_mb"]
    results["ratio_step_rss"] = results["edm_step_rss_mb"] / results["plain_step_rss_mb"]
    line = (f"peak RSS during the steps: EDM {results['edm_peak_rss_mb']:.0f} MB / plain diffusers "
            f"{results['plain_peak_rss_mb']:.0f} MB = {results['ratio_rss']:.3f}; the steps' own memory: "
            f"EDM {results['edm_step_rss_mb']:.0f} MB / plain {results['plain_step_rss_mb']:.0f} MB = "
            f"{results['ratio_step_rss']:.3f} (target <= 1.0)")
    if "edm_cuda_max_allocated_mb" in results:
        results["ratio_cuda"] = results["edm_cuda_max_allocated_mb"] / results["plain_cuda_max_allocated_mb"]
        line += f"; CUDA max allocated ratio {results['ratio_cuda']:.3f}"
    print(json.dumps({"device": args.device, "batch_size": args.batch_size, "size": args.size,
                      "channels": args.channels, **results}, indent=2))
    print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
