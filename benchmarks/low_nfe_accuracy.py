"""Low-NFE accuracy through the diffusers scheduler interface: EDMScheduler's solvers against
diffusers' best schedulers, on discrete-time epsilon VP models with exact ODE truth.

    python benchmarks/low_nfe_accuracy.py [--samples 128] [--nfe 5,7,9,13,17,25,35,63] [--models gaussian,mixture]

The models are the package's built-in exact oracles served as diffusers epsilon UNets
(`OracleUNet2DModel`) with DDPMScheduler's 1000 linear betas (sigma 0.01 .. 157): a stiff
64-d Gaussian (closed-form ODE solution) and a 6-component Gaussian mixture of 3x16x16 images
(ODE solved to ~1e-7 by `oracles.solve_probability_flow_ode`). Every sampler runs in the plain
denoising loop a DDPM / Stable Diffusion pipeline runs (`scale_model_input`, the epsilon
network, `step`) from the same latents; its error is the median over samples of the per-sample
RMSE against the exact ODE solution from the sampler's own first state (diffusers' schedulers
start at sigma 157, ours at 80: each is compared with the ODE it starts). NFE is counted on the
network.

Peers (named, configured for their best low-step behaviour; see
`edm_sampling/evaluation/samplers_registry.py`): diffusers' DDIM, Euler and Heun (Karras),
DPM-Solver++ 2M and 3M (Karras), UniPC bh2 (Karras) and DEIS (Karras). Ours: EDMScheduler with
each solver on its own default grid (and with the analytical first step where it applies),
the rows of README's recommendation table. Printed per model and NFE: the best of ours, the best
of diffusers' and their ratio; the target is ratio <= 0.8 at every NFE on both models.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from edm_sampling.evaluation.models import builtin_model
from edm_sampling.evaluation.samplers_registry import DIFFUSERS, OURS, SAMPLERS, SamplerSpec, run_sampler
from edm_sampling.evaluation.sweep import _latents_and_generators, reference_solution

DIFFUSERS_ROWS = ("ddim", "euler-karras", "heun-karras", "dpmpp-2m-karras", "dpmpp-3m-karras", "unipc-bh2-karras", "deis-karras")


def our_rows() -> list[SamplerSpec]:
    """EDMScheduler configurations through the scheduler loop: each solver on its default grid."""
    configs = {
        "heun": {"solver": "heun"},
        "ipndm": {"solver": "ipndm"},
        "ipndm-afs": {"solver": "ipndm", "afs": True},
        "ipndm_v": {"solver": "ipndm_v"},
        "dpmpp_2m": {"solver": "dpmpp_2m"},
        "dpmpp_3m": {"solver": "dpmpp_3m"},
        "unipc": {"solver": "unipc"},
        "unipc-3": {"solver": "unipc", "solver_order": 3},
        "unipc-3-afs": {"solver": "unipc", "solver_order": 3, "afs": True},
        "deis": {"solver": "deis"},
        "adams_alpha": {"solver": "adams_alpha"},
        "adams_adapt": {"solver": "adams_alpha_adaptive"},  # a short label for the 12-wide columns
    }
    rows = []
    for name, kwargs in configs.items():
        heun = kwargs["solver"] == "heun"
        rows.append(SamplerSpec(f"EDMScheduler({name})", OURS, f"EDMScheduler {kwargs}", runner="scheduler",
                                scheduler_class="EDMScheduler", scheduler_kwargs=kwargs, state_space="vp",
                                calls_per_step=2 if heun else 1, saved_calls=1 if heun else 0))
    return rows


def median_error(spec: SamplerSpec, model, latents, generators, nfe: int, references: dict) -> tuple[float, int]:
    steps = spec.steps_for_nfe(nfe)
    if spec.name.startswith("EDMScheduler") and spec.calls_per_step == 1:
        steps = nfe  # num_inference_steps = N model calls, with afs too
    out = run_sampler(spec, model, latents, steps, generators)
    key = (round(out.start_sigma, 6), round(out.start_scale, 6))
    if key not in references:
        references[key] = reference_solution(model, latents, out.start_sigma, out.start_scale, 0, {})
    per_sample = (out.sample.double() - references[key]).pow(2).flatten(1).mean(1).sqrt()
    return float(per_sample.median()), out.nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--nfe", default="5,7,9,13,17,25,35,63")
    parser.add_argument("--models", default="gaussian,mixture")
    parser.add_argument("--target", type=float, default=0.8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    nfes = [int(n) for n in args.nfe.split(",")]
    ours, theirs = our_rows(), [SAMPLERS[name] for name in DIFFUSERS_ROWS]
    start = time.perf_counter()
    verdicts = []
    for model_name in args.models.split(","):
        model = builtin_model(model_name)
        latents, generators = _latents_and_generators(list(range(args.samples)), model.sample_shape, torch.device("cpu"), torch.float32)
        references: dict = {}
        table: dict[str, dict[int, float]] = {}
        for spec in ours + theirs:
            for nfe in nfes:
                error, calls = median_error(spec, model, latents, generators, nfe, references)
                if calls > nfe:
                    raise RuntimeError(f"{spec.name}: {calls} model calls at target NFE {nfe}")
                table.setdefault(spec.name, {})[nfe] = error if calls == nfe or spec.family == DIFFUSERS else math.nan
        print(f"\n## {model_name}: median per-sample RMSE to the exact ODE solution (lower is better), {args.samples} samples")
        print(f"{'sampler':<28}" + "".join(f"{n:>12}" for n in nfes))
        for name, row in table.items():
            print(f"{name:<28}" + "".join(f"{row[n]:>12.3g}" for n in nfes))
        best_ours = {n: min((row[n], name) for name, row in table.items() if name.startswith("EDMScheduler") and not math.isnan(row[n])) for n in nfes}
        best_theirs = {n: min((row[n], name) for name, row in table.items() if not name.startswith("EDMScheduler")) for n in nfes}
        ratios = [best_ours[n][0] / best_theirs[n][0] for n in nfes]
        print(f"{'best ours / best diffusers':<28}" + "".join(f"{r:>12.3f}" for r in ratios))
        print(f"{'  best ours':<28}" + "".join(f"{best_ours[n][1][13:-1]:>12}" for n in nfes))
        print(f"{'  best diffusers':<28}" + "".join(f"{best_theirs[n][1][:9]:>12}" for n in nfes))
        met = all(r <= args.target for r in ratios)
        verdicts.append(f"{model_name}: ratio {min(ratios):.3f} .. {max(ratios):.3f} (geometric mean "
                        f"{math.exp(np.mean(np.log(ratios))):.3f}); target <= {args.target} at every NFE: {'met' if met else 'NOT met'}")
    print()
    for line in verdicts:
        print(line)
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
