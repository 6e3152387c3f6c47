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

Printed per model, solver and NFE: the mean and the median per-sample RMSE to the exact ODE
solution on held-out seeds (the seeds `edm-sampling bench` samples, never seen by the search)
and each grid's ratio to the default grid's (< 1: better), and the wall time of the teacher and
of each search.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch

from edm_sampling.evaluation.models import load_model
from edm_sampling.evaluation.schedule_search import (
    SearchSettings,
    base_rule,
    model_problem,
    prepare_search,
    search_nfe,
)

SOLVERS = "heun,ipndm,ipndm+afs,ipndm_v,dpmpp_2m,dpmpp_3m,unipc,deis"


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
        print(f"\n## {model_name}: per-sample RMSE to the ODE solution on {args.samples} held-out seeds, mean / median "
              f"(ratio to the solver's default grid; lower is better)")
        print(f"{'solver':<12}{'NFE':>4}  {'default':>19}  {'gits':>31}  {'search':>31}  {'search s':>8}")
        for entry in args.solvers.split(","):
            solver, afs = entry.removesuffix("+afs"), entry.endswith("+afs")
            problem = model_problem(model, solver, afs)
            key = (base_rule(solver), afs)
            if key not in shared:
                start = time.perf_counter()
                shared[key] = prepare_search(problem, settings)
                print(f"  (teacher and {key[0]} costs{' after an analytical first step' if afs else ''}: "
                      f"{time.perf_counter() - start:.1f} s, {shared[key].teacher_calls:.0f} model calls per seed)")
            for nfe in nfes:
                start = time.perf_counter()
                full = search_nfe(problem, shared[key], nfe, settings)
                seconds = time.perf_counter() - start
                dp = search_nfe(problem, shared[key], nfe, gits)
                base = (full["default_holdout_error_mean"], full["default_holdout_error_median"])
                cells = []
                for result, name in ((dp, "gits"), (full, "search")):
                    mean, median = result["holdout_error_mean"], result["holdout_error_median"]
                    summary[name].append(math.log(mean / base[0]))
                    cells.append(f"{mean:.3g} / {median:.3g} ({mean / base[0]:.2f} / {median / base[1]:.2f})")
                print(f"{entry:<12}{nfe:>4}  {base[0]:>9.3g} / {base[1]:<7.3g}  {cells[0]:>31}  {cells[1]:>31}  {seconds:>8.1f}")
    for name, logs in summary.items():
        print(f"{name}: geometric mean of the mean-error ratio to the default grid {math.exp(np.mean(logs)):.3f} "
              f"(best {math.exp(min(logs)):.3f}, worst {math.exp(max(logs)):.3f}) over {len(logs)} solver x NFE x model cells")


if __name__ == "__main__":
    main()
