"""What checkpoint integrity costs: `save_checkpoint` / `load_checkpoint` vs the same state
written and read without a checksum.

Peers, same tensors, same folder, same process, rounds alternating so machine load hits all alike:
- save: `atomic_save_safetensors` (temporary file, fsync, os.replace: the save path before
  checksums) vs `save_checkpoint` (that, plus the sha256 content digest, reading the written
  file back to verify it, and the hard link that keeps checkpoint.prev.safetensors);
- load: reading every tensor with `safe_open` into memory (`.clone()`, as loading a state dict
  copies it; safetensors maps the file lazily) vs `load_checkpoint` (size check + checksum).
Reported as median seconds and the ratio checked / unchecked.

    python benchmarks/checkpoint_integrity.py                   # the default run's state and a 100 MB state
    python benchmarks/checkpoint_integrity.py --sizes-mb 100,1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def default_run_state() -> dict:
    """The training state of `edm-sampling train` with its defaults (UNet, EMA, Adam moments, RNG)."""
    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.trainer import build_unet

    unet = build_unet(TrainConfig(), channels=1, resolution=16, num_classes=0)
    return _state_of(unet)


def sized_state(megabytes: float) -> dict:
    """A state of about ``megabytes`` MB in total: a float32 model whose weights, EMA and two Adam
    moments are a quarter each."""
    per_tensor = 1 << 20  # 4 MB of float32
    count = max(1, round(megabytes * 2**20 / 16 / per_tensor))
    model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(per_tensor)) for _ in range(count)])
    return _state_of(model)


def _state_of(model: torch.nn.Module) -> dict:
    optimizer = torch.optim.Adam(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return dict(model=model.state_dict(), ema={k: v.clone() for k, v in model.state_dict().items()},
                optimizer=optimizer.state_dict(), rng={"torch_cpu": torch.get_rng_state()}, state={"step": 1})


def measure(state: dict, folder: Path, rounds: int) -> dict:
    from safetensors import safe_open

    from edm_sampling.training.checkpoint import (
        CHECKPOINT_NAME,
        FORMAT,
        atomic_save_safetensors,
        flatten_optimizer_state,
        load_checkpoint,
        save_checkpoint,
    )

    tensors = {f"model.{k}": v for k, v in state["model"].items()}
    tensors.update({f"ema.{k}": v for k, v in state["ema"].items()})
    optim_tensors, _ = flatten_optimizer_state(state["optimizer"])
    tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
    tensors.update({f"rng.{k}": v for k, v in state["rng"].items()})
    megabytes = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    plain_path, checked_path = folder / "plain.safetensors", folder / CHECKPOINT_NAME

    def plain_save():
        atomic_save_safetensors(tensors, plain_path, {"format": FORMAT})

    def checked_save():
        save_checkpoint(checked_path, **state)

    def plain_load():
        with safe_open(str(plain_path), framework="pt", device="cpu") as handle:
            return {k: handle.get_tensor(k).clone() for k in handle.keys()}

    def checked_load():
        return load_checkpoint(checked_path)

    times: dict[str, list[float]] = {name: [] for name in ("plain_save", "checked_save", "plain_load", "checked_load")}
    for round_ in range(rounds + 1):
        for name, fn in (("plain_save", plain_save), ("checked_save", checked_save),
                         ("plain_load", plain_load), ("checked_load", checked_load)):
            start = time.perf_counter()
            fn()
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values) for name, values in times.items()}
    return {"state_mb": round(megabytes, 1), **{k: round(v, 4) for k, v in med.items()},
            "save_ratio": round(med["checked_save"] / med["plain_save"], 2),
            "save_added_s": round(med["checked_save"] - med["plain_save"], 4),
            "load_ratio": round(med["checked_load"] / med["plain_load"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="100", help="extra synthetic state sizes in MB, comma separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--folder", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: copies stall when "
                        "the CPU is shared and several threads spin)")
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    states = [("default run", default_run_state())]
    states += [(f"{mb} MB", sized_state(float(mb))) for mb in args.sizes_mb.split(",") if mb]
    results = []
    with tempfile.TemporaryDirectory(prefix="edm-ckpt-bench-", dir=args.folder) as folder:
        for label, state in states:
            row = {"state": label, **measure(state, Path(folder), args.rounds)}
            results.append(row)
            print(f"{label:>12} ({row['state_mb']:.1f} MB): save {row['plain_save']:.4f} s -> {row['checked_save']:.4f} s "
                  f"(x{row['save_ratio']}, +{row['save_added_s']:.4f} s); load {row['plain_load']:.4f} s -> "
                  f"{row['checked_load']:.4f} s (x{row['load_ratio']})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
