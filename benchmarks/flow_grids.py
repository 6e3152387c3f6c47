"""Flow-matching models through EDMScheduler: which grid, and how we compare with diffusers' flow
schedulers, on an exact flow-matching model (Gaussian data, exact velocity).

    python benchmarks/flow_grids.py [--nfe 5,9,15,25,35] [--samples 256]

The model: data y ~ N(mu, diag(lam)) in 3x8x8, flow x_t = (1 - t) y + t n, and the exact velocity
v = E[n - y | x_t] = (x_t - D) / t with D the Gaussian oracle's ideal denoiser at
sigma = t / (1 - t). Every sampler runs through the diffusers scheduler interface in the loop an
SD3 / Flux pipeline runs: start from N(0, I) noise (these pipelines never multiply by
init_noise_sigma), call the model at each timestep, `step`. The truth is the exact ODE solution
from that pure noise at t = 1: y = mu + sqrt(lam) n. Reported: median over samples of the
per-sample RMSE.

Data spectra (none tuned for): "latent" (std log-spaced 0.3 .. 1.5, like SD3/Flux latents after
their scaling), "stiff" (std 0.03 .. 1, the built-in Gaussian's), "wide" (std 0.1 .. 3).
Shifts: 1 (no shift) and 3 (SD3's). Rows:

- edm-heun: EDMScheduler's default for flow models: the model's own grid (Flux's time-uniform
  flow times linspace(1, 1/N, N), scaled so that t = 1 lands on sigma_max = 80 after the shift,
  then shifted like diffusers' flow schedulers shift them);
- edm-heun capped: Flux's flow times as a pipeline passes them (set_timesteps(sigmas=...)):
  shifted, each level clamped to sigma_max = 80 (levels the clamp makes equal are merged);
- edm-heun t=1->2997: the same, but t = 1 taken to the shifted t = 1 - 1/1000 (where diffusers'
  flow DPM-Solver starts) instead of 80;
- edm-heun rho: the EDM rho = 7 grid on 0.002 .. 80 (the other families' default);
- edm-heun rho x shift: that grid times the model's shift;
- flow-euler / flow-heun: diffusers' FlowMatchEuler / FlowMatchHeun on their own grids;
- dpmpp-2m-flow / unipc-flow: DPM-Solver++ 2M and UniPC (bh2) with use_flow_sigmas,
  flow_shift, prediction_type flow_prediction.

At the end: best EDMScheduler row / best diffusers row per NFE (the issue's target is <= 0.8 at
NFE 5..25; EDMScheduler has only Heun and Euler today, the multistep solvers come with the plan
executor).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from edm_sampling.families import flow_sigma, flow_time
from edm_sampling.oracles import GaussianOracle
from edm_sampling.schedulers import EDMScheduler
from edm_sampling.schedules import karras_sigmas

SHAPE = (3, 8, 8)
SPECTRA = {"latent": (0.3, 1.5), "stiff": (0.03, 1.0), "wide": (0.1, 3.0)}


def gaussian(spectrum: str) -> GaussianOracle:
    lo, hi = SPECTRA[spectrum]
    n = math.prod(SHAPE)
    std = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    mean = 0.5 * torch.sin(torch.arange(n, dtype=torch.float64) * 0.7)
    return GaussianOracle(mean.reshape(SHAPE), (std**2).reshape(SHAPE))


def velocity_model(oracle: GaussianOracle, num_train_timesteps: int = 1000):
    """The exact velocity as a network of the flow pipeline's signature: v = (x_t - D) / t."""

    def model(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = (torch.as_tensor(timestep, dtype=torch.float64) / num_train_timesteps).reshape(-1, *([1] * (x_t.ndim - 1)))
        t = t.expand(x_t.shape[0], *t.shape[1:]).clamp(max=1.0)
        x = x_t.double()
        # at t = 1 exactly (FlowMatch schedulers start there) D is the data mean
        sigma = flow_sigma(t.clamp(max=1 - 1e-12))
        denoised = torch.where(t >= 1, oracle.mean.expand_as(x), oracle(x * (1 + sigma), sigma.flatten()))
        return ((x - denoised) / t).to(x_t.dtype)

    return model


def run(scheduler, model, noise: torch.Tensor, **set_kwargs) -> tuple[torch.Tensor, int]:
    scheduler.set_timesteps(**set_kwargs)
    x = noise.clone()
    calls = 0
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x  # SD3 never scales
        output = model(model_input, t)
        calls += 1
        x = scheduler.step(output, t, x, return_dict=False)[0]
    return x, calls


def rmse(x: torch.Tensor, truth: torch.Tensor) -> float:
    per_sample = (x.double() - truth).pow(2).flatten(1).mean(1).sqrt()
    return statistics.median(per_sample.tolist())


def samplers(shift: float, nfe: int):
    """(name, scheduler, set_timesteps kwargs) at `nfe` model calls, or None where the NFE does not fit."""
    flow_config = FlowMatchEulerDiscreteScheduler(shift=shift).config
    heun_steps = (nfe + 1) // 2 if nfe % 2 == 1 else None
    rows = []
    if heun_steps:
        plain = FlowMatchEulerDiscreteScheduler(shift=1.0).config  # takes flow times as they are
        rho = karras_sigmas(heun_steps, 0.002, 80.0)[:-1]
        capped = torch.linspace(1.0, 1.0 / heun_steps, heun_steps, dtype=torch.float64)
        capped = flow_time(shift * flow_sigma(capped.clamp(max=1 - 1e-3)))
        rows += [
            ("edm-heun", EDMScheduler.from_config(flow_config), {"num_inference_steps": heun_steps}),
            ("edm-heun capped", EDMScheduler.from_config(flow_config),
             {"sigmas": torch.linspace(1.0, 1.0 / heun_steps, heun_steps).tolist()}),
            ("edm-heun t=1->2997", EDMScheduler.from_config(plain, sigma_max=1e4), {"sigmas": capped.tolist()}),
            ("edm-heun rho", EDMScheduler.from_config(plain), {"sigmas": flow_time(rho).tolist()}),
            ("edm-heun rho x shift", EDMScheduler.from_config(plain, sigma_max=1e4), {"sigmas": flow_time(rho * shift).tolist()}),
            ("flow-heun", FlowMatchHeunDiscreteScheduler(shift=shift), {"num_inference_steps": heun_steps}),
        ]
    rows += [
        ("edm-euler", EDMScheduler.from_config(flow_config, solver="euler"), {"num_inference_steps": nfe}),
        ("flow-euler", FlowMatchEulerDiscreteScheduler(shift=shift), {"num_inference_steps": nfe}),
        ("dpmpp-2m-flow", DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction"),
         {"num_inference_steps": nfe}),
        ("unipc-flow", UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction"),
         {"num_inference_steps": nfe}),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nfe", default="5,9,15,25,35")
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    nfes = [int(n) for n in args.nfe.split(",")]
    noise = torch.randn((args.samples, *SHAPE), generator=torch.Generator().manual_seed(1))
    for spectrum in SPECTRA:
        oracle = gaussian(spectrum)
        truth = oracle.mean + oracle.variance.sqrt() * noise.double()
        model = velocity_model(oracle)
        for shift in (1.0, 3.0):
            table: dict[str, dict[int, float]] = {}
            for nfe in nfes:
                for name, scheduler, kwargs in samplers(shift, nfe):
                    sample, calls = run(scheduler, model, noise, **kwargs)
                    if calls != nfe and name != "edm-heun capped":
                        raise RuntimeError(f"{name}: {calls} model calls, expected {nfe}")
                    table.setdefault(name, {})[nfe] = rmse(sample, truth)
            print(f"\n## data {spectrum} (std {SPECTRA[spectrum][0]} .. {SPECTRA[spectrum][1]}), shift {shift:g}: "
                  "median per-sample RMSE vs the exact ODE solution (lower is better)")
            print(f"{'sampler':<24}" + "".join(f"{n:>10}" for n in nfes))
            for name, row in table.items():
                print(f"{name:<24}" + "".join(f"{row[n]:>10.4g}" if n in row else f"{'-':>10}" for n in nfes))
            ratios = []
            for n in nfes:
                ours = min(row[n] for name, row in table.items() if name.startswith("edm-") and n in row)
                theirs = min(row[n] for name, row in table.items() if not name.startswith("edm-") and n in row)
                ratios.append(ours / theirs)
            print(f"{'best edm / best diffusers':<24}" + "".join(f"{r:>10.2f}" for r in ratios))


if __name__ == "__main__":
    main()
