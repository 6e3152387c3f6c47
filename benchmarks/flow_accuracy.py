"""Issue 12's flow-matching target: at NFE 5..25 the best of EDMScheduler's multistep solvers has
at most 0.8 x the error of the best of diffusers' flow schedulers, on exact flow-matching models.

    python benchmarks/flow_accuracy.py [--nfe 5,9,15,25] [--samples 128] [--problems latent,stiff,...]

--problems takes the eight spectra of `flow_common.PROBLEMS` (the default), the six
`flow_common.HELD_OUT` ones (unit, small, broad, large, image-latent, mixture-narrow) and the six
`flow_common.HELD_OUT_2` ones (mid, tiny, huge, image-small, mixture-wide, mixture-unit).

Every sampler runs in the SD3 / Flux loop (`flow_common.sd3_loop`: N(0, I) latents, the
transformer at each timestep, `step`) on an exact velocity model (`flow_common`: eight data
spectra x shifts 1 and 3); the error is the median per-sample RMSE against the ODE's solution
from the same noise at t = 1 (pure noise), the trajectory SD3 / Flux sample.

Ours: `EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=s).config, solver=...)`
with `num_inference_steps = NFE` and nothing else: dpmpp_2m, dpmpp_3m, unipc (order 2),
unipc order 3, adams_alpha and adams_alpha_adaptive (order 3), each on its default grid from pure noise. Theirs
(`diffusers_flow_schedulers`): FlowMatchEuler, FlowMatchHeun (odd NFE), DPM-Solver++ 2M / 3M and UniPC-2 / 3 with
use_flow_sigmas. Two ratios per NFE: best ours / best of the issue's four in their default
configuration (FlowMatchEuler, FlowMatchHeun, DPM-Solver++ 2M flow, UniPC-2 flow), and best
ours / best of all six (their order-3 settings too).
"""

from __future__ import annotations

import math
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from flow_common import (HELD_OUT, HELD_OUT_2, NAMED_PEERS, PROBLEMS, SHIFTS, diffusers_flow_schedulers, exact_solution, median_rmse,
                         parse_arguments, sd3_loop, velocity_model)

from edm_sampling.schedulers import EDMScheduler

OURS = {
    "EDM dpmpp_2m": {"solver": "dpmpp_2m"},
    "EDM dpmpp_3m": {"solver": "dpmpp_3m"},
    "EDM unipc": {"solver": "unipc"},
    "EDM unipc-3": {"solver": "unipc", "solver_order": 3},
    "EDM adams_alpha": {"solver": "adams_alpha"},
    "EDM adams_alpha_adaptive": {"solver": "adams_alpha_adaptive"},
}


def our_schedulers(shift: float) -> list[tuple[str, EDMScheduler]]:
    config = FlowMatchEulerDiscreteScheduler(shift=shift).config
    return [(name, EDMScheduler.from_config(config, **kwargs)) for name, kwargs in OURS.items()]


def main() -> None:
    args, nfes = parse_arguments(__doc__, problems=True)
    start = time.perf_counter()
    summary = []
    for problem in args.problems.split(","):
        oracle = {**PROBLEMS, **HELD_OUT, **HELD_OUT_2}[problem]()
        noise = torch.randn((args.samples, *oracle.sample_shape), generator=torch.Generator().manual_seed(1))
        truth, model = exact_solution(oracle, noise), velocity_model(oracle)
        for shift in SHIFTS:
            table: dict[str, dict[int, float]] = {}
            for nfe in nfes:
                rows = [(name, scheduler, nfe) for name, scheduler in our_schedulers(shift)]
                for name, scheduler, steps in rows + diffusers_flow_schedulers(shift, nfe):
                    sample, calls = sd3_loop(scheduler, model, noise, num_inference_steps=steps)
                    if calls != nfe:
                        raise RuntimeError(f"{name}: {calls} model calls, expected {nfe}")
                    table.setdefault(name, {})[nfe] = median_rmse(sample, truth)
            print(f"\n## {problem}, shift {shift:g}: median per-sample RMSE to the ODE from pure noise (lower is better)")
            print(f"{'sampler':<24}" + "".join(f"{n:>10}" for n in nfes))
            for name, row in table.items():
                print(f"{name:<24}" + "".join(f"{row[n]:>10.3g}" if n in row else f"{'-':>10}" for n in nfes))
            for label, peers in (("the four", NAMED_PEERS), ("all six", None)):
                ratios = []
                for n in nfes:
                    ours = min(row[n] for name, row in table.items() if name in OURS)
                    theirs = min(row[n] for name, row in table.items() if name not in OURS and n in row
                                 and (peers is None or name in peers))
                    ratios.append(ours / theirs)
                print(f"{'best ours / ' + label:<24}" + "".join(f"{r:>10.2f}" for r in ratios))
                summary.append((label, problem, shift, ratios))
    print(f"\n## target: best ours / best diffusers <= {args.target} at NFE {nfes}")
    for label in ("the four", "all six"):
        rows = [row for row in summary if row[0] == label]
        ratios = [r for row in rows for r in row[3]]
        misses = [f"{problem}/shift {shift:g} NFE {n}: {r:.2f}" for _, problem, shift, rs in rows for n, r in zip(nfes, rs)
                  if r > args.target]
        print(f"vs {label}: met in {len(ratios) - len(misses)} of {len(ratios)} cells, geometric mean "
              f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}, worst {max(ratios):.2f}")
        for miss in misses:
            print(f"  missed: {miss}")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
