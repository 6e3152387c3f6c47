"""Shared parts of the flow-matching benchmarks (flow_accuracy.py, flow_grids.py): exact
flow-matching models, their exact ODE solution from pure noise, and the SD3 / Flux loop.

A model is the exact velocity of known data served as a flow transformer would be called:
v(x_t, timestep) = E[n - y | x_t] = (x_t - D) / t with D the data's ideal denoiser at
sigma = t / (1 - t) and t = timestep / 1000 (at t = 1, pure noise, D is the data mean). The truth
is the probability-flow ODE from the noise n at t = 1 (SD3 / Flux start there): mu + sqrt(lam) n
for Gaussian data, the reference ODE solver from sigma = 1e4 for mixtures (the start
mean + 1e4 n is off by O(1e-4) there, which the ODE shrinks by std / 1e4 by sigma = 0).

Data (none tuned for; see each builder): Gaussians with per-pixel std log-spaced over "latent"
0.3 .. 1.5 (SD3 / Flux latents after their scaling), "narrow" 0.5 .. 1, "stiff" 0.03 .. 1,
"wide" 0.1 .. 3; image-like Gaussians whose DCT coefficients fall as natural images' 1/f^2
spectrum ("image-mid" std 3 .. 0.1, "image-wide" 8 .. 0.05); Gaussian mixtures of six
image-like modes with latent-like ("mixture-latent") or stiff ("mixture-stiff", the built-in
bench model's) spectra. Each at the flow shifts 1 and 3 (SD3's).
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Callable

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging as diffusers_logging

from edm_sampling.oracles import (
    GaussianMixtureOracle,
    GaussianOracle,
    _mixture_means,
    builtin_mixture,
    dct_variance_spectrum,
)

M = 1000
SHAPE = (3, 8, 8)
SHIFTS = (1.0, 3.0)
TRUTH_SIGMA = 1e4
PIXEL_SPECTRA = {"latent": (0.3, 1.5), "narrow": (0.5, 1.0), "stiff": (0.03, 1.0), "wide": (0.1, 3.0)}


def pixel_gaussian(lo: float, hi: float) -> GaussianOracle:
    """Per-pixel std log-spaced from lo to hi (shuffled), a smooth mean in [-0.5, 0.5]."""
    n = math.prod(SHAPE)
    std = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64)
    std = std[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    mean = 0.5 * torch.sin(torch.arange(n, dtype=torch.float64) * 0.7)
    return GaussianOracle(mean.reshape(SHAPE), (std**2).reshape(SHAPE))


def image_gaussian(std_max: float, std_min: float, corner: float) -> GaussianOracle:
    """DCT coefficients of 2x12x12 images with std falling from std_max as 1 / f past `corner`
    down to std_min (`oracles.dct_variance_spectrum`), in the DCT basis (the RMSE is rotation
    invariant); a random mean of std 0.3."""
    shape = (2, 12, 12)
    mean = 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return GaussianOracle(mean, dct_variance_spectrum(shape, std_max, std_min, corner))


def mixture(spectra: list[tuple[float, float, float]]) -> GaussianMixtureOracle:
    """Six image-like modes (`oracles._mixture_means`) on 3x8x8 with DCT spectra (std_max,
    std_min, corner) per mode and unequal weights, in DCT coordinates."""
    variances = torch.stack([dct_variance_spectrum(SHAPE, *spectrum) for spectrum in spectra])
    weights = torch.tensor([0.25, 0.2, 0.17, 0.15, 0.13, 0.1], dtype=torch.float64)
    return GaussianMixtureOracle(_mixture_means(SHAPE), variances, weights, basis="dct").in_basis_coordinates()


PROBLEMS: dict[str, Callable[[], GaussianOracle | GaussianMixtureOracle]] = {
    **{name: (lambda lo=lo, hi=hi: pixel_gaussian(lo, hi)) for name, (lo, hi) in PIXEL_SPECTRA.items()},
    "image-mid": lambda: image_gaussian(3.0, 0.1, 2.0),
    "image-wide": lambda: image_gaussian(8.0, 0.05, 1.0),
    "mixture-latent": lambda: mixture([(1.2, 0.3, 1.5), (1.0, 0.35, 2.0), (1.1, 0.3, 1.0), (0.9, 0.4, 2.5),
                                       (1.3, 0.3, 1.5), (1.0, 0.35, 3.0)]),
    "mixture-stiff": lambda: builtin_mixture(SHAPE).in_basis_coordinates(),
}

HELD_OUT: dict[str, Callable[[], GaussianOracle | GaussianMixtureOracle]] = {
    "unit": lambda: pixel_gaussian(0.8, 1.2),
    "small": lambda: pixel_gaussian(0.1, 0.4),
    "broad": lambda: pixel_gaussian(0.02, 2.0),
    "large": lambda: pixel_gaussian(1.0, 3.0),
    "image-latent": lambda: image_gaussian(1.5, 0.2, 2.0),
    "mixture-narrow": lambda: mixture([(1.0, 0.5, 2.0), (0.9, 0.5, 1.5), (1.1, 0.6, 2.0), (0.8, 0.5, 3.0), (1.0, 0.45, 1.0),
                                       (1.2, 0.5, 2.5)]),
}
"""Six more spectra, added after the default grids and adams_alpha were chosen on PROBLEMS, to
check them on data they were not chosen on (`--problems unit,small,...`)."""

HELD_OUT_2: dict[str, Callable[[], GaussianOracle | GaussianMixtureOracle]] = {
    "mid": lambda: pixel_gaussian(0.2, 0.8),
    "tiny": lambda: pixel_gaussian(0.05, 0.3),
    "huge": lambda: pixel_gaussian(2.0, 5.0),
    "image-small": lambda: image_gaussian(1.0, 0.05, 1.5),
    "mixture-wide": lambda: mixture([(2.0, 0.1, 1.0), (1.5, 0.2, 2.0), (2.5, 0.1, 1.5), (1.8, 0.15, 1.0), (2.2, 0.1, 2.5),
                                     (1.6, 0.2, 3.0)]),
    "mixture-unit": lambda: mixture([(1.1, 0.9, 2.0), (1.0, 0.8, 1.5), (1.2, 0.9, 2.0), (0.9, 0.85, 3.0), (1.0, 0.9, 1.0),
                                     (1.1, 0.8, 2.5)]),
}
"""Six more, written after adams_alpha_adaptive was built and run on them once, unchanged after
(`--problems mid,tiny,huge,image-small,mixture-wide,mixture-unit`)."""


def data_mean(oracle: GaussianOracle | GaussianMixtureOracle) -> torch.Tensor:
    """E[y]: the ideal denoiser at pure noise."""
    if isinstance(oracle, GaussianOracle):
        return oracle.mean
    weights = oracle.log_weights.exp().reshape(-1, *([1] * (oracle.means.ndim - 1)))
    return (weights * oracle.means).sum(0)


def velocity_model(oracle: GaussianOracle | GaussianMixtureOracle) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact velocity as a flow transformer is called, model(x_t, timestep = t * 1000)."""
    mean = data_mean(oracle)

    def model(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = (torch.as_tensor(timestep, dtype=torch.float64) / M).reshape(-1, *([1] * (x_t.ndim - 1)))
        t = t.expand(x_t.shape[0], *t.shape[1:]).clamp(max=1.0)
        x = x_t.double()
        finite_t = t.clamp(max=1 - 1e-12)
        sigma = finite_t / (1 - finite_t)
        denoised = torch.where(t >= 1, mean.expand_as(x), oracle(x * (1 + sigma), sigma.flatten()))
        return ((x - denoised) / t).to(x_t.dtype)

    return model


def exact_solution(oracle: GaussianOracle | GaussianMixtureOracle, noise: torch.Tensor) -> torch.Tensor:
    """The ODE's solution at t = 0 from the noise at t = 1 (see the module docstring), float64."""
    noise = noise.double()
    if isinstance(oracle, GaussianOracle):
        return oracle.mean + oracle.variance.sqrt() * noise
    return oracle.ode_solution(TRUTH_SIGMA * noise + data_mean(oracle), TRUTH_SIGMA, 0.0, rtol=1e-8)


def median_rmse(sample: torch.Tensor, truth: torch.Tensor) -> float:
    """The median over samples of the per-sample RMSE."""
    return statistics.median((sample.double() - truth).pow(2).flatten(1).mean(1).sqrt().tolist())


def sd3_loop(scheduler, model, noise: torch.Tensor, **set_timesteps_kwargs) -> tuple[torch.Tensor, int]:
    """The SD3 / Flux denoising loop: latents = N(0, I) noise (these pipelines never multiply by
    init_noise_sigma), the transformer at each timestep, `step`; the model calls made."""
    scheduler.set_timesteps(**set_timesteps_kwargs)
    x, calls = noise.clone(), 0
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, return_dict=False)[0]
        calls += 1
    return x, calls


def diffusers_flow_schedulers(shift: float, nfe: int) -> list[tuple[str, object, int]]:
    """diffusers' flow schedulers at `nfe` model calls: (name, scheduler, num_inference_steps).
    FlowMatchEuler / FlowMatchHeun (odd NFE only: N steps cost 2N - 1 calls) on their own grids;
    DPM-Solver++ and UniPC (bh2) with use_flow_sigmas, orders 2 (their default) and 3."""
    rows: list[tuple[str, object, int]] = [("FlowMatchEuler", FlowMatchEulerDiscreteScheduler(shift=shift), nfe)]
    if nfe % 2 == 1:
        rows.append(("FlowMatchHeun", FlowMatchHeunDiscreteScheduler(shift=shift), (nfe + 1) // 2))
    flow = dict(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
    for order in (2, 3):
        rows.append((f"DPM-Solver++ {order}M flow", DPMSolverMultistepScheduler(solver_order=order, **flow), nfe))
        rows.append((f"UniPC-{order} flow", UniPCMultistepScheduler(solver_order=order, **flow), nfe))
    return rows


NAMED_PEERS = ("FlowMatchEuler", "FlowMatchHeun", "DPM-Solver++ 2M flow", "UniPC-2 flow")
"""The issue's four in their default configurations (DPM-Solver++ and UniPC at order 2)."""


def parse_arguments(description: str, problems: bool = False) -> tuple[argparse.Namespace, list[int]]:
    """The benchmarks' options (--nfe, --samples, --target, and --problems if asked) and the NFE
    list; one torch thread, diffusers' per-scheduler notices silenced."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nfe", default="5,9,15,25")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.8)
    if problems:
        parser.add_argument("--problems", default=",".join(PROBLEMS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    diffusers_logging.set_verbosity_error()
    return args, [int(n) for n in args.nfe.split(",")]
