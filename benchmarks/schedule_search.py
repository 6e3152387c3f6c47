"""Searched step schedules (`edm-sampling tune --schedule`) against each solver's default grid.

    PYTHONPATH=. python benchmarks/schedule_search.py [--models mixture,digits] [--nfe 5,9,17]
        [--solvers heun,ipndm,ipndm+afs,...] [--samples 256]

For each built-in model and solver (`+afs`: with the analytical first step) the search of
`edm_sampling.evaluation.schedule_search` runs as the command runs it: the teacher on the search
seeds (shared by the solvers whose local cost is the same: Euler, Euler after an analytical first
step, Heun), then per NFE

- default: the solver's default grid, what `EDMScheduler.from_config(config, solver=...)` uses
  on the model (the named peer);
- gits: GITS's dynamic-programming grid alone, its cost adjustment chosen among
  `schedule_search.COEFFS` by the solver's mean error on the search seeds;
- search: the full search, the pattern search on the solver's error from the GITS grid and from
  the default grid, the better kept (what `tune --schedule` writes).

Printed per model, solver and NFE, on held-out seeds (the seeds `edm-sampling bench` samples,
never seen by the search): the mean and the median per-sample RMSE to the exact ODE solution,
each grid's ratio to the default grid's (< 1: better), and for models with modes the share of
samples that end in another mode (mixture component, training image) than their solution. On
the digits the median is the error of a sample that snapped onto its solution's training image
(~1e-9 at every grid from NFE ~9 on): there the mean and the mode share tell grids apart. Also
the wall time of the teacher and of each search.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch

from edm_sampling.evaluation.models import load_model
from edm_sampling.evaluation.metrics import per_sample_rmse
from edm_sampling.evaluation.schedule_search import (
    SearchSettings,
    base_rule,
    model_problem,
    prepare_search,
    search_nfe,
    solver_samples,
)

SOLVERS = "heun,ipndm,ipndm+afs,ipndm_v,dpmpp_2m,dpmpp_3m,unipc,deis"


def held_out(problem, model, grid: torch.Tensor, runs: list) -> tuple[float, float, float]:
    """(mean, median per-sample RMSE, share of samples in another mode) of `problem.solver` on
    `grid` over the held-out runs (the mode share NaN for models without modes)."""
    samples = solver_samples(problem, grid, runs)
    errors = np.concatenate([per_sample_rmse(x, run[1]) for x, run in zip(samples, runs)])
    other = math.nan
    if model.assign is not None:
        with torch.no_grad():
            other = float(np.mean(np.concatenate([(model.assign(x) != model.assign(run[1])).numpy() for x, run in zip(samples, runs)])))
    return float(errors.mean()), float(np.median(errors)), other


def _cell(values: tuple[float, float, float], base: tuple[float, float, float] | None) -> str:
    mean, median, other = values
    text = f"{mean:.3g} {median:.2g} {100 * other:.1f}%" if not math.isnan(other) else f"{mean:.3g} {median:.2g} -"
    return text if base is None else f"{text} ({mean / base[0]:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mixture,digits")
    parser.add_argument("--solvers", default=SOLVERS)
    parser.add_argument("--nfe", default="5,9,17")
    parser.add_argument("--samples", type=int, default=256, help="search seeds, and as many held-out seeds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    nfes = [int(n) for n in args.nfe.split(",")]
    settings = SearchSettings(search_samples=args.samples, holdout_samples=args.samples, batch_size=args.samples)
    gits = dataclasses.replace(settings, refine=False)
    summary: dict[str, list[float]] = {"gits": [], "search": []}
    for model_name in args.models.split(","):
        model = load_model(model_name)
        shared: dict[tuple[str, bool], object] = {}
        print(f"\n## {model_name}, {args.samples} held-out seeds: mean and median per-sample RMSE to the ODE solution, "
              "share of samples in another mode (lower is better); (ratio of the mean to the default grid's)")
        print(f"{'solver':<10}{'NFE':>4}  {'default':<24}{'gits':<33}{'search':<33}{'search s':>8}")
        for entry in args.solvers.split(","):
            solver, afs = entry.removesuffix("+afs"), entry.endswith("+afs")
            problem = model_problem(model, solver, afs)
            key = (base_rule(solver), afs)
            if key not in shared:
                start = time.perf_counter()
                shared[key] = prepare_search(problem, settings)
                print(f"  (teacher and {key[0]} costs{' after an analytical first step' if afs else ''}: "
                      f"{time.perf_counter() - start:.1f} s, {shared[key].teacher_calls:.0f} model calls per seed)")
            data = shared[key]
            for nfe in nfes:
                start = time.perf_counter()
                full = search_nfe(problem, data, nfe, settings)
                seconds = time.perf_counter() - start
                dp = search_nfe(problem, data, nfe, gits)
                base = held_out(problem, model, torch.tensor(full["default_grid"]), data.holdout_runs)
                cells = []
                for result, name in ((dp, "gits"), (full, "search")):
                    values = held_out(problem, model, torch.tensor(result["grid"]), data.holdout_runs)
                    summary[name].append(math.log(values[0] / base[0]))
                    cells.append(_cell(values, base))
                print(f"{entry:<10}{nfe:>4}  {_cell(base, None):<24}{cells[0]:<33}{cells[1]:<33}{seconds:>8.1f}")
    for name, logs in summary.items():
        print(f"{name}: geometric mean of the mean-error ratio to the default grid {math.exp(np.mean(logs)):.3f} "
              f"(best {math.exp(min(logs)):.3f}, worst {math.exp(max(logs)):.3f}) over {len(logs)} solver x NFE x model cells")


if __name__ == "__main__":
    main()
