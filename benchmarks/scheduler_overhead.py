"""Scheduler overhead per model call: time spent in `scale_model_input` + `step`, with a model
that costs nothing (it returns a fixed tensor), for EDMScheduler (Heun, and the multistep
solvers dpmpp_2m, unipc and adams_alpha_adaptive, whose step also reads 4 numbers per sample
back to the host) against diffusers' HeunDiscreteScheduler, EulerDiscreteScheduler,
DPMSolverMultistepScheduler (2M) and UniPCMultistepScheduler on the same latents.

    python benchmarks/scheduler_overhead.py [--device cuda] [--steps 18] [--repeats 7]

Each scheduler runs the whole sampling loop of `--steps` steps `--repeats` times; the median
over repeats of (loop time) / (model calls) is reported. Target: EDMScheduler(heun) at most
0.5x HeunDiscreteScheduler's overhead; also reported: EDMScheduler(dpmpp_2m) against
DPMSolverMultistepScheduler, EDMScheduler(unipc) and EDMScheduler(adams_alpha_adaptive) against
UniPCMultistepScheduler.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from edm_sampling.schedulers import EDMScheduler

SHAPES = ((4, 4, 64, 64), (64, 3, 32, 32))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def overhead_per_call(scheduler, latents: torch.Tensor, output: torch.Tensor, steps: int, repeats: int) -> float:
    """Median seconds per model call of a sampling loop whose model is free: the loop's time is
    all scale_model_input + step (one device synchronisation per loop, none inside)."""
    per_call = []
    for _ in range(repeats + 1):  # the first run warms up
        scheduler.set_timesteps(steps, device=latents.device)
        sample = latents * scheduler.init_noise_sigma
        timesteps = scheduler.timesteps
        _sync(latents.device)
        start = time.perf_counter()
        for t in timesteps:
            scheduler.scale_model_input(sample, t)  # the free model ignores its input
            sample = scheduler.step(output, t, sample, return_dict=False)[0]
        _sync(latents.device)
        per_call.append((time.perf_counter() - start) / len(timesteps))
    return statistics.median(per_call[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    print(f"device={device} steps={args.steps} repeats={args.repeats} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'shape':>16} {'scheduler':>34} {'calls':>5} {'us/call':>9} {'vs Heun':>8} {'vs Euler':>8}")
    for shape in SHAPES:
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(shape, generator=generator).to(device)
        output = torch.randn(shape, generator=generator).to(device)
        schedulers = {
            "EDMScheduler(heun)": EDMScheduler.from_config(config),
            "EDMScheduler(dpmpp_2m)": EDMScheduler.from_config(config, solver="dpmpp_2m"),
            "EDMScheduler(unipc)": EDMScheduler.from_config(config, solver="unipc"),
            "EDMScheduler(adams_alpha_adaptive)": EDMScheduler.from_config(config, solver="adams_alpha_adaptive"),
            "HeunDiscreteScheduler": HeunDiscreteScheduler.from_config(config),
            "EulerDiscreteScheduler": EulerDiscreteScheduler.from_config(config),
            "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler.from_config(config),
            "UniPCMultistepScheduler": UniPCMultistepScheduler.from_config(config),
        }
        results = {}
        for name, scheduler in schedulers.items():
            scheduler.set_timesteps(args.steps, device=device)
            results[name] = (overhead_per_call(scheduler, latents, output, args.steps, args.repeats), len(scheduler.timesteps))
        heun, euler = results["HeunDiscreteScheduler"][0], results["EulerDiscreteScheduler"][0]
        for name, (seconds, calls) in results.items():
            print(f"{'x'.join(map(str, shape)):>16} {name:>34} {calls:>5} {seconds * 1e6:>9.1f} {seconds / heun:>8.2f} {seconds / euler:>8.2f}")
        ratio = results["EDMScheduler(heun)"][0] / heun
        print(f"{'':>16} EDMScheduler(heun) / HeunDiscreteScheduler = {ratio:.2f} (target <= 0.50: {'met' if ratio <= 0.5 else 'NOT met'})")
        for ours, theirs in (("EDMScheduler(dpmpp_2m)", "DPMSolverMultistepScheduler"), ("EDMScheduler(unipc)", "UniPCMultistepScheduler"),
                             ("EDMScheduler(adams_alpha_adaptive)", "UniPCMultistepScheduler")):
            print(f"{'':>16} {ours} / {theirs} = {results[ours][0] / results[theirs][0]:.2f}")


if __name__ == "__main__":
    main()
