"""Which default grid for flow-matching models: the evidence behind EDMScheduler's flow grid
(`EDMScheduler._flow_noise_grid`, `FLOW_GRID_BOTTOM_EXPONENT`).

    python benchmarks/flow_grids.py [--nfe 5,9,15,25] [--samples 128]

Every candidate grid runs with each of our multistep solvers (dpmpp_2m, dpmpp_3m, unipc,
unipc order 3) in the core sampler over the exact flow models of `flow_common` (eight data
spectra x shifts 1 and 3, the truth the ODE from pure noise at t = 1); diffusers' six flow
schedulers (`flow_common.diffusers_flow_schedulers`) run in the SD3 loop. Per grid and cell
(data, shift, NFE): best of our solvers on that grid / best of diffusers. Printed per grid: the
geometric mean of that ratio over all cells, the worst cell, how many cells miss the issue's
0.8, and the worst ratio per data set. N model calls = N grid steps. Grids:

- own from 80: the flow model's own time grid linspace(1, 1/N, N), shifted, scaled so that
  t = 1 lands on sigma_max = 80 (EDMScheduler's flow default before the start from pure noise);
- own: the same from pure noise, t = 1 -> sigma = inf (what Flux passes as `sigmas`);
- logsnr 80: inf, then equal log-sigma steps over EDM's [0.002, 80];
- loguniform b: inf, then equal log-sigma steps from s (N - 1) down to s / (N - 1)^b, s the
  shift: the own grid's first and last levels below pure noise for b = 1, reaching further
  down for b > 1 (EDMScheduler's default: b = FLOW_GRID_BOTTOM_EXPONENT = 1.5).

A last line checks that EDMScheduler's default in the SD3 loop is the core sampler on the
"loguniform 1.5" grid (the same samples but for the float32 rounding of the timesteps).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from flow_common import (PROBLEMS, SHIFTS, diffusers_flow_schedulers, exact_solution, median_rmse, parse_arguments,
                         sd3_loop, velocity_model)

from edm_sampling import samplers
from edm_sampling.denoisers import FlowDenoiser
from edm_sampling.families import flow_sigma, flow_time
from edm_sampling.schedulers import FLOW_GRID_BOTTOM_EXPONENT, EDMScheduler
from edm_sampling.schedules import noise_start_sigmas

SOLVERS = (("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {}), ("unipc", {"order": 3}))
Grid = Callable[[int, float], torch.Tensor]


def own_times(n: int) -> torch.Tensor:
    return torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)


def own_from_80(n: int, shift: float) -> torch.Tensor:
    t_top = flow_time(80.0 / shift)
    return torch.cat([shift * flow_sigma(t_top * own_times(n)), torch.zeros(1, dtype=torch.float64)])


def own_from_noise(n: int, shift: float) -> torch.Tensor:
    return torch.cat([shift * flow_sigma(own_times(n)), torch.zeros(1, dtype=torch.float64)])


def logsnr_80(n: int, shift: float) -> torch.Tensor:
    return noise_start_sigmas(n, 0.002, 80.0)


def loguniform(bottom_exponent: float) -> Grid:
    def grid(n: int, shift: float) -> torch.Tensor:
        k = max(n - 1, 1)
        return noise_start_sigmas(n, shift / k**bottom_exponent, shift * k)

    return grid


GRIDS: dict[str, Grid] = {
    "own from 80": own_from_80,
    "own": own_from_noise,
    "logsnr 80": logsnr_80,
    **{f"loguniform {b:g}": loguniform(b) for b in (1.0, 1.25, 1.5, 1.75, 2.0)},
}


def main() -> None:
    args, nfes = parse_arguments(__doc__)
    start = time.perf_counter()
    ratios: dict[str, dict[tuple[str, float, int], float]] = {name: {} for name in GRIDS}
    scheduler_gap = 0.0
    for problem, make in PROBLEMS.items():
        oracle = make()
        noise = torch.randn((args.samples, *oracle.sample_shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        truth, model = exact_solution(oracle, noise), velocity_model(oracle)
        denoiser = FlowDenoiser(model)
        for shift in SHIFTS:
            for nfe in nfes:
                theirs = min(median_rmse(sd3_loop(scheduler, model, noise.float(), num_inference_steps=steps)[0], truth)
                             for _, scheduler, steps in diffusers_flow_schedulers(shift, nfe))
                for name, grid in GRIDS.items():
                    ours = min(median_rmse(samplers.sample(denoiser, noise, grid(nfe, shift), solver=solver,
                                                           state_dtype=torch.float64, **options).sample, truth)
                               for solver, options in SOLVERS)
                    ratios[name][(problem, shift, nfe)] = ours / theirs
                scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=shift).config, solver="unipc")
                through_scheduler, _ = sd3_loop(scheduler, model, noise, num_inference_steps=nfe)
                core = samplers.sample(denoiser, noise, loguniform(FLOW_GRID_BOTTOM_EXPONENT)(nfe, shift), solver="unipc")
                scheduler_gap = max(scheduler_gap, (through_scheduler.double() - core.sample).abs().max().item())
        print(f"{problem} done ({time.perf_counter() - start:.0f} s)", flush=True)
    problems = list(PROBLEMS)
    print(f"\n## best of our solvers on each grid / best of diffusers' six flow schedulers, NFE {nfes}, shifts {SHIFTS}:"
          f" geometric mean, worst, cells above {args.target}, worst per data set (lower is better)")
    print(f"{'grid':<16}{'gmean':>7}{'worst':>7}{'misses':>7} " + " ".join(f"{p[:10]:>10}" for p in problems))
    for name, cells in ratios.items():
        values = list(cells.values())
        gmean = math.exp(sum(map(math.log, values)) / len(values))
        misses = sum(v > args.target for v in values)
        per_problem = [max(v for (p, _, _), v in cells.items() if p == problem) for problem in problems]
        print(f"{name:<16}{gmean:>7.2f}{max(values):>7.2f}{misses:>7} " + " ".join(f"{v:>10.2f}" for v in per_problem))
    print(f"\nEDMScheduler(unipc) default in the SD3 loop vs the core sampler on 'loguniform {FLOW_GRID_BOTTOM_EXPONENT:g}': "
          f"max abs difference {scheduler_gap:.2g} (float64 states; the transformer's timesteps are float32)")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
