"""`edm-sampling tune --schedule`: a sampling grid searched for one model, solver and NFE in the
manner of GITS (Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion
Sampling", ICML 2024, section 4), then refined by the solver's own error. Small pure functions:

1. `candidate_levels`: a fine grid of M noise levels, uniform in log sigma over the sampling
   range (the range `EDMScheduler` samples the model in), then 0.
2. `teacher_trajectory`: from x_0 = sigma_max z on every search seed, the probability-flow ODE
   solution at each candidate (the reference integrator `oracles.solve_probability_flow_ode`,
   Dormand-Prince 5(4) in log sigma, rtol 1e-6, from one candidate to the next; a network's
   last step, from sigma_min to 0, is x = D(x; sigma_min), see `ode_to`) and D there.
3. `cost_matrix`: C[i, j] = mean over seeds of the per-sample RMSE between one step of the
   solver's base rule from the teacher's state at c_i to c_j and the teacher's state at c_j.
4. `best_path`: dynamic programming for the path 0 = p_0 < p_1 < ... < p_K = M (c_M = 0) of
   exactly K steps minimising sum_m coeff^m C[p_m, p_{m+1}]: GITS's cost adjustment, coeff > 1
   weighing the later, low-noise steps more. One path per coeff of `COEFFS`; the solver runs
   each on the search seeds and the one with the lowest typical error is GITS's grid.
5. `refine_grid`: a pattern search that moves each level of the better of GITS's grid and the
   solver's default grid in log sigma while the solver's per-sample errors against the
   teacher's endpoints `improves` (a lower geometric mean, a mean no higher).
6. The result is measured against the solver's default grid on held-out seeds (the seeds
   `edm-sampling bench` samples) and written as a schedule file (`schedules.schedule_file_json`).

What "one step" means in the local cost (`base_step_costs`). GITS costs a step by the base
solver's one-step error, from the teacher's state to the teacher's state. Here that is Heun's
step for heun (one model call per pair of candidates) and, for every other solver, the
first-order step they all share in EDM space: Euler = DDIM = DPM-Solver(++)-1 = iPNDM / DEIS /
UniPC of order 1, x' = D + (c_j / c_i)(x - D) with the teacher's D (no model call); under the
analytical first step the step from c_0 uses D = 0, as the solver does. A multistep step's own
local error depends on where its previous one to three nodes sit, so a DP on it would run over
pairs or triples of nodes (M^3 to M^4 costs, each solver-specific; UniPC's corrector even
rewrites the previous state), and it would still miss how errors carry through the history.
So the multistep solver enters by its global error instead: it chooses GITS's coeff, and steps
5-6 refine and check the grid with it. Measured (benchmarks/schedule_search.py: 256 search and
256 held-out seeds, NFE 5, 9, 17, eight solver configurations, the mixture and the digits):
GITS's grid alone helps the one-step solver (Heun on the mixture at NFE 5: mean error 0.10x the
default grid's) but not the multistep ones (geometric mean over the 48 cells 1.04x the default
grid's, up to 6.6x worse: DPM-Solver++(3M) at NFE 17); the refined grid's mean error is 0.51x
the default grid's (geometric mean, 0.05x to 1.12x), lower in 46 of the 48 cells (the others:
DPM-Solver++(2M) on the mixture at NFE 9 and 17, mean 1.04x and 1.12x, median 0.31x and 0.42x).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..oracles import REFERENCE_RTOL, solve_probability_flow_ode
from ..safety.inputs import InvalidArgument
from ..samplers import randn, sample
from ..schedules import check_sigma_range, logsnr_sigmas
from ..solvers import euler_step, heun_step, ode_slope, solver_info
from .metrics import per_sample_rmse

COEFFS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)
"""The cost adjustments tried (GITS's own list; its default is 1.15)."""
DEFAULT_CANDIDATES = 100
MAX_NFE = 200


# --- 1. candidates -------------------------------------------------------------------------------


def candidate_levels(num_levels: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """`num_levels` noise levels uniform in log sigma from sigma_max to sigma_min, then 0
    (float64, [num_levels + 1]): every searched grid is a path through these."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"--candidates must be an integer >= 2, got {num_levels!r}")
    return logsnr_sigmas(num_levels, sigma_min, sigma_max)


# --- 2. the teacher ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Teacher:
    """The ODE solution on the candidate levels: `states[i]` at `levels[i]` ([M + 1, B, ...],
    the last at sigma = 0), `denoised[i]` = D(states[i]; levels[i]) ([M, B, ...]), and the model
    calls spent."""

    levels: torch.Tensor
    states: torch.Tensor
    denoised: torch.Tensor
    calls: int


def _denoise(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigma: float, model_kwargs: dict) -> torch.Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), **model_kwargs)


def ode_to(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigma_from: float, sigma_to: float,
           rtol: float = REFERENCE_RTOL, model_kwargs: dict | None = None, exact_to_zero: bool = True) -> tuple[torch.Tensor, int]:
    """(x carried down the probability-flow ODE from sigma_from to sigma_to, model calls) by the
    reference integrator (adaptive Dormand-Prince 5(4) in log sigma, float64, tolerance `rtol`).
    To sigma = 0 without `exact_to_zero` (a network, not an exact denoiser) the last step is
    x = D(x; sigma_from), as every data-prediction solver ends and as bench's reference for such
    models ends: a discrete model is never called below its smallest trained sigma."""
    if sigma_to == 0 and not exact_to_zero:
        return _denoise(denoiser, x, sigma_from, dict(model_kwargs or {})).to(torch.float64), 1
    solution = solve_probability_flow_ode(denoiser, x, sigma_from, sigma_to, rtol=rtol, model_kwargs=model_kwargs)
    return solution.solution, solution.calls


def teacher_trajectory(
    denoiser: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    levels: torch.Tensor,
    rtol: float = REFERENCE_RTOL,
    model_kwargs: dict | None = None,
    exact_to_zero: bool = True,
) -> Teacher:
    """The teacher: x0 at levels[0] carried down the ODE (`ode_to`) from each candidate level
    to the next, and D at each positive level."""
    model_kwargs = dict(model_kwargs or {})
    states = [x0.to(torch.float64)]
    calls = 0
    for sigma_from, sigma_to in zip(levels[:-1].tolist(), levels[1:].tolist()):
        x, spent = ode_to(denoiser, states[-1], sigma_from, sigma_to, rtol, model_kwargs, exact_to_zero)
        states.append(x)
        calls += spent
    denoised = [_denoise(denoiser, x, sigma, model_kwargs).to(torch.float64) for x, sigma in zip(states, levels[:-1].tolist())]
    return Teacher(levels, torch.stack(states), torch.stack(denoised), calls + len(denoised))


# --- 3. local costs --------------------------------------------------------------------------------


def base_rule(solver: str) -> str:
    """The one-step rule a solver's local cost uses: "heun" for heun, else "euler" (the
    first-order step every multistep solver here reduces to in EDM space)."""
    return "heun" if solver_info(solver).calls_per_step == 2 else "euler"


def _mean_rmse(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return float(per_sample_rmse(predicted, target).mean())


def base_step_costs(
    teacher: Teacher,
    i: int,
    rule: str,
    analytical: bool = False,
    denoiser: Callable[..., torch.Tensor] | None = None,
    model_kwargs: dict | None = None,
) -> torch.Tensor:
    """C[i, j] for every j > i: the mean per-sample RMSE of one base step from (states[i],
    levels[i]) to levels[j] against states[j] (float64 [M + 1 - i - 1]).

    "euler": x' = euler_step(x, ode_slope(x, D, sigma), sigma, sigma') with the teacher's D
    (D = 0 when `analytical`, the analytical first step). "heun": Algorithm 1's step, its
    second slope evaluated by `denoiser` at the Euler prediction (one call per j); to sigma = 0
    it is the Euler step, as in `solvers.heun_plan`."""
    levels, x = teacher.levels.tolist(), teacher.states[i]
    sigma = levels[i]
    denoised = torch.zeros_like(x) if analytical else teacher.denoised[i]
    slope = ode_slope(x, denoised, sigma)
    costs = []
    for j in range(i + 1, len(levels)):
        x_next = euler_step(x, slope, sigma, levels[j])
        if rule == "heun" and levels[j] > 0:
            slope_next = ode_slope(x_next, _denoise(denoiser, x_next, levels[j], dict(model_kwargs or {})).double(), levels[j])
            x_next = heun_step(x, slope, slope_next, sigma, levels[j])
        costs.append(_mean_rmse(x_next, teacher.states[j]))
    return torch.tensor(costs, dtype=torch.float64)


def cost_matrix(
    teacher: Teacher,
    solver: str,
    afs: bool = False,
    denoiser: Callable[..., torch.Tensor] | None = None,
    model_kwargs: dict | None = None,
) -> torch.Tensor:
    """C ([M + 1, M + 1], float64): C[i, j] = `base_step_costs` for i < j, inf elsewhere (no
    step goes up or stays). With `afs` the steps from the first level use D = 0."""
    size = len(teacher.levels)
    cost = torch.full((size, size), math.inf, dtype=torch.float64)
    rule = base_rule(solver)
    for i in range(size - 1):
        cost[i, i + 1 :] = base_step_costs(teacher, i, rule, analytical=afs and i == 0, denoiser=denoiser,
                                           model_kwargs=model_kwargs)
    return cost


# --- 4. dynamic programming ---------------------------------------------------------------------------


def best_path(cost: torch.Tensor | np.ndarray, num_steps: int, coeff: float = 1.0) -> tuple[list[int], float]:
    """The path 0 = p_0 < p_1 < ... < p_K = n - 1 through the n nodes of `cost` ([n, n], inf
    where no step is allowed) with exactly K = `num_steps` steps minimising

        sum_m coeff^m cost[p_m, p_{m+1}],

    and that minimum. Bellman's recursion from the end: V_1(i) = cost[i, n-1],
    V_k(i) = min_j cost[i, j] + coeff V_{k-1}(j) (the step taken first carries weight 1, each
    later one coeff times more), O(K n^2)."""
    table = np.asarray(cost, dtype=np.float64)
    n = table.shape[0]
    if table.ndim != 2 or table.shape[1] != n:
        raise ValueError(f"cost must be a square matrix, got shape {table.shape}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= n - 1:
        raise ValueError(f"num_steps must be an integer in [1, {n - 1}] for {n} nodes, got {num_steps!r}")
    if not (math.isfinite(coeff) and coeff > 0):
        raise ValueError(f"coeff must be a finite number > 0, got {coeff!r}")
    value = np.full(n, math.inf)
    value[n - 1] = 0.0
    choices = []
    for _ in range(num_steps):
        total = table + coeff * value[None, :]
        choice = np.argmin(total, axis=1)
        value = total[np.arange(n), choice]
        choices.append(choice)
    if not math.isfinite(value[0]):
        raise ValueError(f"no path of {num_steps} steps exists through the allowed steps of cost")
    path = [0]
    for choice in reversed(choices):
        path.append(int(choice[path[-1]]))
    return path, float(value[0])


# --- 5. the solver's own error --------------------------------------------------------------------------


ERROR_FLOOR = 1e-5
"""Per-sample errors below this count as equal in `typical_error`: far below an 8-bit image's
step (2/255), and near the teacher's own accuracy (rtol 1e-6 of the sample's size). Without it
the digits' samples that snap onto their reference's training image (error 1e-9) would outweigh
those that land on another image (error ~0.5)."""


def typical_error(errors: np.ndarray) -> float:
    """exp(mean log max(e, ERROR_FLOOR)) over per-sample errors e: the geometric mean, a
    typical sample's error like the median, but moved by every sample."""
    return float(np.exp(np.mean(np.log(np.maximum(errors, ERROR_FLOOR)))))


def improves(new: np.ndarray, old: np.ndarray) -> bool:
    """The search's acceptance rule on per-sample errors: a lower typical (geometric-mean) error
    and a mean no higher. The mean alone is ruled by the few samples that end in another mode
    (UniPC on the mixture at NFE 17: a mean-fitted grid lowered the held-out median 1.5x, this
    rule 3.4x); the typical error alone, or the median, lets such samples grow (a geometric-mean
    fit raised UniPC's held-out mean 1.6x at NFE 9, a median fit 1.7x)."""
    return typical_error(new) < typical_error(old) and float(np.mean(new)) <= float(np.mean(old))


def refine_grid(grid: torch.Tensor, errors_of: Callable[[torch.Tensor], np.ndarray], sigma_min: float,
                min_log_step: float, max_evals: int = 200,
                scales: Sequence[float] = (0.5, 0.25, 0.125, 0.0625)) -> tuple[torch.Tensor, np.ndarray, int]:
    """Pattern search on the solver's own per-sample errors (`errors_of`): each positive level
    after the first moves in log sigma by +- scale times its smaller gap to a neighbour (the last
    positive level: times its gap to the level above, never below `sigma_min`), a move kept when
    it `improves` the errors; sweeps repeat at a scale until none helps, then the scale halves.
    No step between positive levels gets shorter than `min_log_step` in log sigma (a near-zero
    step would turn the final extrapolation into a finite difference of two almost equal model
    outputs). The first level and the final 0 stay. Returns (grid, its errors, evaluations)."""
    levels = grid.to(torch.float64).clone()
    best, evals = errors_of(levels), 1
    last = len(levels) - 2
    for scale in scales:
        improved = True
        while improved and evals < max_evals:
            improved = False
            for m in range(1, last + 1):
                u, upper = math.log(levels[m]), math.log(levels[m - 1])
                lower = math.log(levels[m + 1]) if m < last else math.log(sigma_min)
                gap = upper - u if m == last else min(upper - u, u - lower)
                for direction in (-1.0, 1.0):
                    moved = u + direction * scale * gap
                    room = (upper - moved >= min_log_step and
                            (moved >= lower if m == last else moved - lower >= min_log_step))
                    if not room or evals >= max_evals:
                        continue
                    candidate = levels.clone()
                    candidate[m] = math.exp(moved)
                    errors = errors_of(candidate)
                    evals += 1
                    if improves(errors, best):
                        best, levels, improved = errors, candidate, True
                        break
    return levels, best, evals


# --- 6. the search ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSettings:
    """How a search runs. Held-out seeds are seed .. seed + holdout_samples - 1 (by default the
    seeds `edm-sampling bench` samples, so bench compares grids on seeds the search never saw);
    search seeds follow them. Seeds are processed `batch_size` at a time. `refine`: the pattern
    search on the solver's error (False: GITS's DP grid alone, its coeff chosen by the solver's
    error); `max_evals`: its budget of solver runs per NFE."""

    candidates: int = DEFAULT_CANDIDATES
    coeffs: tuple[float, ...] = COEFFS
    search_samples: int = 256
    holdout_samples: int = 256
    seed: int = 0
    batch_size: int = 256
    teacher_rtol: float = REFERENCE_RTOL
    refine: bool = True
    max_evals: int = 200

    def check(self) -> None:
        """A ValueError naming the flag for a setting out of range."""
        from ..safety.inputs import SEED

        candidate_levels(self.candidates, 1.0, 2.0)
        SEED.check("seed", self.seed)
        if not self.coeffs or any(not (math.isfinite(c) and c > 0) for c in self.coeffs):
            raise ValueError(f"--coeff: give positive numbers, got {list(self.coeffs)}")
        for flag, value, least in (("--num-samples", self.search_samples, 2), ("--holdout-samples", self.holdout_samples, 2),
                                   ("--batch-size", self.batch_size, 1), ("--max-evals", self.max_evals, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{flag} must be an integer >= {least}, got {value!r}")

    def search_seeds(self) -> list[int]:
        start = self.seed + self.holdout_samples
        return list(range(start, start + self.search_samples))

    def holdout_seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.holdout_samples))


@dataclass(frozen=True)
class SearchProblem:
    """What is searched for: `solver` (with `afs`) on `denoiser` over [sigma_min, sigma_max],
    its `default_grid(nfe)` to compare with, per-seed `model_kwargs(seeds)` (class labels), and
    whether the ODE may be solved below sigma_min (`exact_to_zero`: exact denoisers; see `ode_to`)."""

    denoiser: Callable[..., torch.Tensor]
    sample_shape: tuple[int, ...]
    solver: str
    afs: bool
    sigma_min: float
    sigma_max: float
    default_grid: Callable[[int], torch.Tensor]
    model_kwargs: Callable[[list[int]], dict] = lambda seeds: {}
    exact_to_zero: bool = True


def check_search(solver: str, afs: bool, nfes: Sequence[int], candidates: int) -> dict[int, int]:
    """Check the solver, afs and NFE list before any work; returns {nfe: grid steps}. Errors
    name the flag."""
    from ..solvers import SOLVERS

    if solver not in SOLVERS:
        raise ValueError(f"--solver must be one of {tuple(SOLVERS)}, got {solver!r}")
    info = SOLVERS[solver]
    if afs and not info.afs:
        raise ValueError(f"--afs applies to the solvers {[n for n, i in SOLVERS.items() if i.afs]}, not {solver!r}")
    if not nfes:
        raise ValueError("--nfe: give at least one NFE")
    least = 2 if afs or info.calls_per_step == 2 else 1
    steps = {}
    for nfe in nfes:
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or not least <= nfe <= MAX_NFE:
            raise ValueError(f"--nfe: every NFE must be an integer in [{least}, {MAX_NFE}] for solver {solver!r}"
                             f"{' with --afs' if afs else ''}, got {nfe!r}")
        if info.calls_per_step == 2 and nfe % 2 == 0:
            raise ValueError(f"--nfe: heun makes 2N - 1 model calls for N steps; give odd NFEs, got {nfe}")
        steps[int(nfe)] = info.steps_for_nfe(int(nfe), afs)
    if candidates < max(steps.values()):
        raise ValueError(f"--candidates must be at least the largest step count searched ({max(steps.values())}), got {candidates}")
    return dict(sorted(steps.items()))


def _latents(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Per-seed N(0, I) noise, float64: the numbers bench draws for these seeds."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return randn((len(seeds), *shape), generators, device, torch.float32).to(torch.float64)


def solver_samples(problem: SearchProblem, grid: torch.Tensor, runs: Sequence[tuple]) -> list[torch.Tensor]:
    """`problem.solver` on `grid` from x_0 = grid[0] latents, in float64, per run of `runs`
    (latents, ODE solution, model_kwargs)."""
    samples = []
    for latents, _, kwargs in runs:
        with torch.no_grad():
            samples.append(sample(problem.denoiser, latents, grid, solver=problem.solver, afs=problem.afs,
                                  state_dtype=torch.float64, model_kwargs=kwargs).sample)
    return samples


def solver_errors(problem: SearchProblem, grid: torch.Tensor, runs: Sequence[tuple]) -> np.ndarray:
    """Per-sample RMSE of `solver_samples` to the runs' ODE solutions."""
    return np.concatenate([per_sample_rmse(x, run[1]) for x, run in zip(solver_samples(problem, grid, runs), runs)])


def _batches(seeds: list[int], size: int) -> list[list[int]]:
    return [seeds[k : k + size] for k in range(0, len(seeds), size)]


def search_grid(cost: torch.Tensor, levels: torch.Tensor, num_steps: int, default: torch.Tensor,
                errors_of: Callable[[torch.Tensor], np.ndarray], settings: SearchSettings) -> dict[str, Any]:
    """One NFE: GITS's DP grid for each coeff, the one the solver runs best (the lowest
    `typical_error` of `errors_of`); with `settings.refine`, the pattern search from the better
    of that grid and the solver's default grid (measured: the better start also refines to the
    better grid; e.g. DPM-Solver++(3M)'s default grid beats every DP grid on the mixture at NFE
    9 and 17). Returns the grid, its typical and mean error on the search seeds, the start
    ("dp" or "default"), the coeffs of the DP grid and the solver runs spent."""
    paths: dict[tuple[int, ...], list[float]] = {}
    for coeff in settings.coeffs:
        paths.setdefault(tuple(best_path(cost, num_steps, coeff)[0]), []).append(coeff)
    scored = [(errors_of(levels[list(path)]), path) for path in paths]
    dp_errors, dp_path = min(scored, key=lambda item: typical_error(item[0]))
    starts = {"dp": (levels[list(dp_path)], dp_errors)}
    runs = len(paths)
    if settings.refine:
        starts["default"] = (default, errors_of(default))
        start = min(starts, key=lambda name: typical_error(starts[name][1]))
        min_log_step = 0.5 * math.log(float(levels[0]) / float(levels[1]))  # half a candidate spacing
        grid, errors, spent = refine_grid(starts[start][0], errors_of, float(levels[-2]), min_log_step, settings.max_evals)
        runs += spent + 1
    else:
        start, (grid, errors) = "dp", starts["dp"]
    return {"grid": grid, "search_error_typical": typical_error(errors), "search_error_mean": float(np.mean(errors)),
            "start": start, "coeffs": paths[dp_path], "dp_grid": levels[list(dp_path)].tolist(),
            "dp_search_error_typical": typical_error(dp_errors), "solver_runs": runs}


@dataclass
class SearchData:
    """What every NFE's search shares: the candidate `levels`, the mean local `cost` matrix, the
    search seeds' runs and the held-out seeds' runs, each a list of (latents, ODE solution at 0,
    model_kwargs) per batch, and the teacher's model calls per seed and time."""

    levels: torch.Tensor
    cost: torch.Tensor
    search_runs: list
    holdout_runs: list
    teacher_calls: float
    teacher_seconds: float


def prepare_search(problem: SearchProblem, settings: SearchSettings, device: torch.device | str = "cpu",
                   log: Callable[[str], None] = lambda text: None) -> SearchData:
    """The teacher on the search seeds (batch by batch: its states are summed into the cost
    matrix, then dropped) and the ODE solutions of the held-out seeds."""
    start = time.perf_counter()
    device = torch.device(device)
    levels = candidate_levels(settings.candidates, problem.sigma_min, problem.sigma_max)
    seeds = settings.search_seeds()
    cost = torch.zeros(len(levels), len(levels), dtype=torch.float64)
    search_runs, calls = [], 0
    for batch in _batches(seeds, settings.batch_size):
        log(f"teacher trajectories and local costs, seeds {batch[0]}..{batch[-1]}")
        latents, kwargs = _latents(batch, problem.sample_shape, device), problem.model_kwargs(batch)
        with torch.no_grad():
            teacher = teacher_trajectory(problem.denoiser, latents * problem.sigma_max, levels, settings.teacher_rtol, kwargs,
                                         problem.exact_to_zero)
            cost += cost_matrix(teacher, problem.solver, problem.afs, problem.denoiser, kwargs) * len(batch)
        calls += teacher.calls
        search_runs.append((latents, teacher.states[-1], kwargs))
    teacher_seconds = time.perf_counter() - start
    holdout_runs = []
    for batch in _batches(settings.holdout_seeds(), settings.batch_size):
        latents, kwargs = _latents(batch, problem.sample_shape, device), problem.model_kwargs(batch)
        with torch.no_grad():
            lowest, _ = ode_to(problem.denoiser, latents * problem.sigma_max, problem.sigma_max, problem.sigma_min,
                               settings.teacher_rtol, kwargs)
            truth, _ = ode_to(problem.denoiser, lowest, problem.sigma_min, 0.0, settings.teacher_rtol, kwargs,
                              problem.exact_to_zero)
        holdout_runs.append((latents, truth, kwargs))
    return SearchData(levels, cost / len(seeds), search_runs, holdout_runs, calls / len(search_runs), teacher_seconds)


def search_nfe(problem: SearchProblem, data: SearchData, nfe: int, settings: SearchSettings) -> dict[str, Any]:
    """One NFE's grid (`search_grid`) with the median and mean per-sample error on the held-out
    seeds of it and of the solver's default grid."""
    num_steps = solver_info(problem.solver).steps_for_nfe(nfe, problem.afs)
    default = problem.default_grid(nfe)
    found = search_grid(data.cost, data.levels, num_steps, default,
                        lambda grid: solver_errors(problem, grid, data.search_runs), settings)
    searched, baseline = solver_errors(problem, found["grid"], data.holdout_runs), solver_errors(problem, default, data.holdout_runs)
    return {"nfe": nfe, "steps": num_steps, **found, "grid": found["grid"].tolist(), "default_grid": default.tolist(),
            "holdout_error_median": float(np.median(searched)), "holdout_error_mean": float(searched.mean()),
            "default_holdout_error_median": float(np.median(baseline)), "default_holdout_error_mean": float(baseline.mean())}


def search_schedules(problem: SearchProblem, nfes: Sequence[int], settings: SearchSettings = SearchSettings(),
                     device: torch.device | str = "cpu", log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Search one grid per NFE (the module docstring's steps), every check first. Returns
    {"results": `search_nfe` per NFE, "settings", "teacher", "seconds"}."""
    settings.check()
    check_search(problem.solver, problem.afs, list(nfes), settings.candidates)
    check_sigma_range(problem.sigma_min, problem.sigma_max)
    log = log or (lambda text: None)
    start = time.perf_counter()
    data = prepare_search(problem, settings, device, log)
    results = []
    for nfe in sorted(set(int(n) for n in nfes)):
        log(f"NFE {nfe}: dynamic programming{' and pattern search' if settings.refine else ''}")
        results.append(search_nfe(problem, data, nfe, settings))
        log(f"NFE {nfe}: median error on held-out seeds, searched / default grid: "
            f"{results[-1]['holdout_error_median']:.3g} / {results[-1]['default_holdout_error_median']:.3g}")
    return {
        "results": results,
        "settings": {**asdict(settings), "candidate_grid": "logsnr", "local_cost": f"{base_rule(problem.solver)} step",
                     "objective": "per-sample RMSE of the solver to the teacher's endpoint on the search seeds: a move is "
                                  "kept when it lowers the geometric mean and does not raise the mean"},
        "teacher": {"integrator": "Dormand-Prince 5(4) in log sigma, from each candidate level to the next"
                    + ("" if problem.exact_to_zero else "; from sigma_min to 0: x = D(x; sigma_min)"),
                    "rtol": settings.teacher_rtol, "model_calls_per_seed": data.teacher_calls, "seconds": data.teacher_seconds},
        "seconds": time.perf_counter() - start,
    }


# --- the command: `edm-sampling tune --schedule` and bench's `--schedule-file` ---------------------


def model_problem(model: Any, solver: str, afs: bool, device: torch.device | str = "cpu") -> SearchProblem:
    """The search problem of a bench model (`models.BenchModel`): its denoiser, and the range
    and default grid `EDMScheduler.from_config(model's scheduler config, solver=..., afs=...)`
    samples with, so the file serves that scheduler; models without a DDPM-family scheduler
    config (VE, EDM folders) use their sampling range and `solvers.solver_sigmas`. Class labels
    are made on `device`, where the model runs."""
    from ..solvers import solver_sigmas
    from .samplers_registry import build_scheduler, edm_scheduler_row

    info = solver_info(solver)
    if model.scheduler_config is not None:
        options = {"afs": True} if afs else {}
        scheduler = build_scheduler(edm_scheduler_row("search", "", solver, **options), model.scheduler_config)
        lo, hi = scheduler.sigma_range

        def default_grid(nfe: int) -> torch.Tensor:
            scheduler.set_timesteps(nfe if info.calls_per_step == 1 else info.steps_for_nfe(nfe))
            return torch.tensor(scheduler.plan.sigmas, dtype=torch.float64)
    else:
        lo, hi = model.sigma_min, model.sigma_max

        def default_grid(nfe: int) -> torch.Tensor:
            return solver_sigmas(solver, nfe, lo, hi, afs=afs)

    return SearchProblem(model.denoiser, tuple(model.sample_shape), solver, afs, lo, hi, default_grid,
                         lambda seeds: model.class_labels(seeds, torch.device(device)), model.exact_solution is not None)


def schedule_file_name(solver: str, afs: bool) -> str:
    """The file `tune --schedule` writes in its output folder."""
    return f"schedule_{solver}{'_afs' if afs else ''}.json"


def is_schedule_file_name(name: str) -> bool:
    """Whether `name` (relative to an output folder) is a file `tune --schedule` writes there:
    one per solver, side by side (`schedule_file_name`)."""
    return "/" not in name and name.startswith("schedule_") and name.endswith(".json")


def run_schedule_search(model: str, solver: str, afs: bool, nfes: Sequence[int], settings: SearchSettings,
                        output: str, overwrite: bool = False, prompt: str | None = None, guidance_scale: float = 7.5,
                        dtype: str = "float32", progress: bool = True) -> dict[str, Any]:
    """Check everything, search, and write the schedule file into `output`; returns the search
    result with "path" (the file) and "meta" (what the file records besides its grids)."""
    from pathlib import Path

    from ..safety import RunFolder
    from ..schedules import schedule_file_json
    from .models import BUILTIN_MODELS, check_model_dependencies, check_model_folder
    from .report import check_output_dir, write_json
    from .sweep import DTYPES, _versions

    settings.check()
    check_search(solver, afs, list(nfes), settings.candidates)
    if str(model) not in BUILTIN_MODELS:
        check_model_folder(model)
    check_model_dependencies(model)
    check_output_dir(output, overwrite)
    with RunFolder(output) as folder:  # one job per folder; a user's file at the output is refused, never replaced
        check_output_dir(output, overwrite)
        folder.check_replaceable([folder.root / schedule_file_name(solver, afs)])
        result, meta = _search(model, solver, afs, nfes, settings, prompt, guidance_scale, DTYPES[dtype], progress)
        meta["versions"] = _versions()
        path = Path(output) / schedule_file_name(solver, afs)
        write_json(schedule_file_json([r["grid"] for r in result["results"]], **meta), path)
        folder.keep(name for name in folder.own_files() if is_schedule_file_name(name))  # other solvers' files stay
        folder.commit()
    return {**result, "path": str(path), "meta": meta}


def _search(model: str, solver: str, afs: bool, nfes: Sequence[int], settings: SearchSettings, prompt: str | None,
            guidance_scale: float, dtype: torch.dtype, progress: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load the model and search: the result, and what the schedule file records besides its grids."""
    from .models import BUILTIN_MODELS, load_model

    threads = torch.get_num_threads()
    if str(model) in BUILTIN_MODELS:
        torch.set_num_threads(1)  # the oracles' tensors are small: threads do not pay off
    try:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        bench_model = load_model(model, prompt=prompt, guidance_scale=guidance_scale, device=device, dtype=dtype)
        problem = model_problem(bench_model, solver, afs, device)
        log = (lambda text: print(f"tune --schedule: {text}", flush=True)) if progress else None
        result = search_schedules(problem, nfes, settings, device=device, log=log)
    finally:
        torch.set_num_threads(threads)
    meta = {
        "solver": solver, "afs": afs, "model": str(model), "model_info": bench_model.info,
        "nfe": [r["nfe"] for r in result["results"]], "steps": [r["steps"] for r in result["results"]],
        "sigma_min": problem.sigma_min, "sigma_max": problem.sigma_max, "teacher": result["teacher"],
        "search": result["settings"], "seconds": result["seconds"],
        "results": [{k: v for k, v in r.items() if k != "grid"} for r in result["results"]],
    }
    return result, meta


def format_search_report(result: dict[str, Any]) -> str:
    """What `tune --schedule` prints: per NFE the searched grid's error against the default
    grid's on the held-out seeds, the grids, and how to use the file."""
    from .report import format_table

    meta = result["meta"]
    rows = [{"nfe": r["nfe"], "steps": r["steps"], "start": r["start"],
             "searched_median": r["holdout_error_median"], "default_median": r["default_holdout_error_median"],
             "ratio_median": r["holdout_error_median"] / r["default_holdout_error_median"],
             "searched_mean": r["holdout_error_mean"], "default_mean": r["default_holdout_error_mean"],
             "ratio_mean": r["holdout_error_mean"] / r["default_holdout_error_mean"]} for r in result["results"]]
    search = meta["search"]
    lines = [f"step schedule for solver {meta['solver']}{' with afs' if meta['afs'] else ''} on {meta['model']}, sigma "
             f"{meta['sigma_min']:.4g}..{meta['sigma_max']:.4g}: per-sample RMSE to the ODE solution on "
             f"{search['holdout_samples']} held-out seeds (lower is better; ratio < 1: the searched grid is better)",
             format_table(rows, list(rows[0])), ""]
    for r in result["results"]:
        lines.append(f"NFE {r['nfe']} searched: [{', '.join(f'{s:.4g}' for s in r['grid'])}]")
        lines.append(f"NFE {r['nfe']} default:  [{', '.join(f'{s:.4g}' for s in r['default_grid'])}]")
    worse = [r["nfe"] for r in rows if r["ratio_median"] > 1 or r["ratio_mean"] > 1]
    if worse:
        lines.append(f"at NFE {worse} the searched grid is worse than the default grid on the held-out seeds in the median "
                     "or the mean: keep the default there, or search with more --num-samples")
    lines += ["", f"start: 'dp' = GITS's dynamic-programming grid, 'default' = the solver's default grid, then refined by "
                  f"the pattern search on the solver's errors over {search['search_samples']} search seeds",
              f"teacher: {meta['teacher']['integrator']}, rtol {meta['teacher']['rtol']:g}, "
              f"{meta['teacher']['model_calls_per_seed']:.0f} model calls per seed; search time {meta['seconds']:.1f} s",
              f"schedule file: {result['path']}",
              f"use it: EDMScheduler.from_config(pipe.scheduler.config, solver={meta['solver']!r}"
              f"{', afs=True' if meta['afs'] else ''}, schedule_file={result['path']!r}) and num_inference_steps in "
              f"{[r['nfe'] if solver_info(meta['solver']).calls_per_step == 1 else r['steps'] for r in result['results']]}",
              f"compare it: edm-sampling bench --model {meta['model']} --schedule-file {result['path']}"]
    return "\n".join(lines)


def schedule_file_nfes(path: str) -> tuple[str, bool, list[int]]:
    """(solver, afs, the NFEs its grids serve) of a schedule file, for `bench --schedule-file`;
    a ValueError naming the flag for a missing or malformed file, or one that does not say
    which solver its grids are for."""
    from ..schedules import read_schedule_file
    from ..solvers import SOLVERS

    schedule = read_schedule_file(path, "schedule_file")
    solver, afs = schedule.meta.get("solver"), schedule.meta.get("afs", False)
    if solver not in SOLVERS or not isinstance(afs, bool):
        raise InvalidArgument("schedule_file", f"{path!r} does not name the solver its grids are for (meta 'solver' one "
                                               f"of {tuple(SOLVERS)}, 'afs' true or false), got solver={solver!r}, afs={afs!r}")
    info = SOLVERS[solver]
    steps = [len(grid) - 1 for grid in schedule.grids]
    nfes = [info.calls_per_step * n - (1 if info.calls_per_step == 2 else 0) - (1 if afs else 0) for n in steps]
    return solver, afs, sorted(nfes)


def schedule_file_specs(path: str, nfes: Sequence[int], scheduler_loop: bool) -> list:
    """Bench rows for a schedule file: its solver on its default grid, and on the file's grids
    through `EDMScheduler(schedule_file=path)` in the diffusers loop (`scheduler_loop`; else the
    same solver and grids on the core runner). Every target NFE must have a grid."""
    from .samplers_registry import SAMPLERS, core_equivalent, edm_scheduler_row

    solver, afs, held = schedule_file_nfes(path)
    missing = [n for n in nfes if n not in held]
    if missing:
        raise ValueError(f"--nfe {','.join(map(str, missing))}: --schedule-file {path} holds grids for NFE {held} only "
                         f"(solver {solver}{' with afs' if afs else ''}); search others with edm-sampling tune --schedule")
    name = "edm-" + solver.replace("_", "-") + ("-afs" if afs else "")
    options = {"afs": True} if afs else {}
    default = SAMPLERS.get(f"{name}-scheduler") or edm_scheduler_row(f"{name}-scheduler", f"EDMScheduler(solver={solver!r}) "
                                                                       "on its default grid", solver, **options)
    searched = edm_scheduler_row(f"{name}-searched-scheduler", f"EDMScheduler(solver={solver!r}, schedule_file={path!r})",
                                 solver, schedule_file=str(path), **options)
    rows = [default, searched]
    return rows if scheduler_loop else [core_equivalent(row) for row in rows]


def with_schedule_file_rows(specs: list, path: str, nfes: Sequence[int], scheduler_loop: bool) -> tuple[list, list[str]]:
    """`specs` with the schedule file's rows (`schedule_file_specs`): the searched row right
    after its default-grid row when that already runs, else both at the end. Returns (rows, the
    names added)."""
    default, searched = schedule_file_specs(path, nfes, scheduler_loop)
    names = [s.name for s in specs]
    if default.name in names:
        at = names.index(default.name) + 1
        return specs[:at] + [searched] + specs[at:], [searched.name]
    return specs + [default, searched], [default.name, searched.name]
