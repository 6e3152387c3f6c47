"""The core sampling loop: execute a solver plan over any denoiser D(x; sigma).

Every solver is a plan (`solvers`): per model call, a linear combination of stored states and
denoiser outputs with coefficients fixed at set-up. `execute_plan` runs any plan; `sample` builds
the plan of a registered solver on a grid (with Algorithm 2's churn for Euler / Heun) and runs
it. The step and churn rules live in `solvers` and are re-exported here for the callers of the
first API. `sample_ablation` keeps its own loop: it solves the paper's general ODE in t with
sigma(t) and s(t). Nothing here imports diffusers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .safety.errors import NonFiniteOutputError
from .safety.inputs import InvalidArgument, check_kinds
from .schedules import (
    EDM_RHO,
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    SCALINGS,
    SIGMA_SCHEDULES,
    VP_EPSILON_S,
    Scaling,
    SigmaSchedule,
    check_num_steps,
    check_sigmas,
    check_sigmas_in_range,
    clamp_sigma_range,
    default_sigma_range,
    sigma_grid,
    vp_betas_for_range,
    vp_schedule,
)
from .solvers import (
    ADAPTIVE_LOOKBACK,
    MAX_GAMMA,
    SOLVERS as SOLVER_REGISTRY,
    Combination,
    SolverPlan,
    check_churn,
    check_infinite_start,
    churn_gammas,
    churn_noise_std,
    euler_step,
    family_options,
    heun_step,
    initial_noise_std,
    make_plan,
    motion_gram,
    ode_slope,
    sigma_hats,
    solver_info,
)

Generator = torch.Generator | Sequence[torch.Generator] | None
DenoiserFn = Callable[..., torch.Tensor]
SOLVERS = tuple(SOLVER_REGISTRY)
ABLATION_SOLVERS = ("heun", "euler")

__all__ = [
    "MAX_GAMMA", "SOLVERS", "NonFiniteOutputError", "SamplerOutput", "check_churn", "check_generator",
    "check_sigmas", "check_sigmas_in_range", "churn_gammas", "churn_noise_std", "churned_grid",
    "denoiser_sigmas", "euler_step", "execute_plan", "heun_step", "initial_noise_std", "ode_slope",
    "randn", "round_grid", "sample", "sample_ablation", "sample_euler", "sample_heun",
    "sample_stochastic", "sigma_hats",
]


# --- noise ---------------------------------------------------------------------------------------


def check_generator(generator: Generator, batch_size: int) -> None:
    """`InvalidArgument` unless ``generator`` is None, a torch.Generator, or a list of exactly one
    per sample (checked before the first model call, so a wrong list never fails steps later)."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generator):
        raise InvalidArgument("generator", f"must be None, a torch.Generator or a list of one per sample, got {generator!r}")
    if len(generator) != batch_size:
        raise InvalidArgument(
            "generator", f"is a list of {len(generator)} generators but the batch has {batch_size} samples; "
            "pass one generator per sample"
        )


def check_sampling_inputs(denoiser: Any, latents: Any, **callables: Any) -> None:
    """What every sampler takes: a callable denoiser, `latents` a finite floating-point tensor
    with a batch dimension (one host sync), and optional callables (None or callable)."""
    if not callable(denoiser):
        raise InvalidArgument("denoiser", f"must be callable as D(x, sigma), got {denoiser!r}")
    if not (isinstance(latents, torch.Tensor) and latents.is_floating_point() and latents.dim() >= 1):
        raise InvalidArgument("latents", f"must be a floating-point tensor [batch, ...], got {type(latents).__name__}"
                                         f"{' ' + str(tuple(latents.shape)) + ' ' + str(latents.dtype) if isinstance(latents, torch.Tensor) else ''}")
    if not bool(torch.isfinite(latents).all()):
        raise InvalidArgument("latents", "hold NaN or inf; the starting noise must be finite")
    for name, value in callables.items():
        if value is not None and not callable(value):
            raise InvalidArgument(name, f"must be callable or None, got {value!r}")


def _as_dict(name: str, value: Any) -> dict[str, Any]:
    """``value`` (None or a mapping: the model's extra arguments, a solver's options) as a dict."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(name, f"must be a dict of keyword arguments or None, got {value!r}")
    return dict(value)


def randn(
    shape: Sequence[int], generator: Generator = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Standard normal noise of `shape`, the same numbers as diffusers' randn_tensor.

    A list of generators draws each sample (row along dim 0) from its own generator, so a
    sample depends only on its seed, never on the batch it is in. CPU generators draw on the
    CPU and the result moves to `device`.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    rand_device = torch.device("cpu") if first.device.type == "cpu" else device
    if isinstance(generator, (list, tuple)):
        rows = [torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(rows).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


# --- executing a plan ----------------------------------------------------------------------------


def check_infinite_sigma(denoiser: Any) -> None:
    """A ValueError unless `denoiser` can be called at sigma = inf (`Denoiser.infinite_sigma`)."""
    if not getattr(denoiser, "infinite_sigma", False):
        raise ValueError("sigmas start at inf (pure noise), but this denoiser cannot be called there (only "
                         "flow-matching models can: infinite_sigma is False); start at a finite sigma_max")


@dataclass
class SamplerOutput:
    """The final sample, the number of model evaluations it took, and the grid it used."""

    sample: torch.Tensor
    nfe: int
    sigmas: torch.Tensor
    sigma_hats: list[float] = field(default_factory=list)


def round_grid(sigmas: torch.Tensor, round_sigma: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The grid with every positive level passed through `round_sigma` (the final 0 kept), so
    the ODE is solved at levels a discrete model represents exactly."""
    rounded = sigmas.clone()
    rounded[sigmas > 0] = round_sigma(sigmas[sigmas > 0]).to(torch.float64)
    return rounded


def churned_grid(
    sigmas: torch.Tensor,
    round_sigma: Callable[[torch.Tensor], torch.Tensor],
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    sigma_max: float = math.inf,
) -> tuple[torch.Tensor, list[float]]:
    """The grid with its positive levels rounded, and every step's sigma_hat (capped at the
    model's sigma_max, then rounded): the levels shared by `sample`, `sample_ablation` and the
    diffusers scheduler."""
    grid = round_grid(sigmas, round_sigma)
    positive = grid[grid > 0]
    if bool((positive[1:] >= positive[:-1]).any()):
        raise ValueError(f"{len(grid) - 1} steps put two grid levels on one trained noise level of the model "
                         "(timestep_mapping='round' snaps the grid to the levels the model was trained at): use fewer "
                         "steps, schedule='iddpm', or timestep_mapping='interpolate'")
    gammas = churn_gammas(grid, s_churn, s_tmin, s_tmax)
    hats = round_grid(torch.tensor(sigma_hats(grid, gammas, sigma_max), dtype=torch.float64), round_sigma)
    return grid, hats.tolist()


def _state_dtype(state_dtype: torch.dtype | None, latents: torch.Tensor) -> torch.dtype:
    """The sampler's state dtype: as asked (floating point), else at least float32."""
    if state_dtype is None:
        return torch.promote_types(latents.dtype, torch.float32)
    if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        raise ValueError(f"state_dtype must be a floating-point torch.dtype, got {state_dtype!r}")
    return state_dtype


def _evaluate(
    denoiser: DenoiserFn, x: torch.Tensor, sigma: float, model_kwargs: dict, step: int, check_finite: bool
) -> torch.Tensor:
    denoised = denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), **model_kwargs)
    if check_finite and not bool(torch.isfinite(denoised).all()):
        raise NonFiniteOutputError(f"the model returned NaN or inf at step {step} (sigma = {sigma:.6g})")
    return denoised


def contributes(coefficient: float | np.ndarray) -> bool:
    """Whether a coefficient contributes: an array (one per sample, `Step.adapt`) always does."""
    return isinstance(coefficient, np.ndarray) or coefficient != 0.0


def per_sample(coefficient: float | np.ndarray, like: torch.Tensor) -> float | torch.Tensor:
    """A float as it is; an array of one coefficient per sample as a tensor broadcasting over
    `like`'s sample dimensions, in its dtype and on its device."""
    if not isinstance(coefficient, np.ndarray):
        return coefficient
    values = torch.as_tensor(coefficient, dtype=torch.float64).to(like.dtype)
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)


def weighted_sum(terms: Sequence[tuple[float | np.ndarray, torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
    """sum_k c_k T_k as one multiply and fused in-place adds (zeros like `like` for no terms);
    a coefficient is a float or an array with one entry per sample (`per_sample`)."""
    if not terms:
        return torch.zeros_like(like)
    result = torch.mul(terms[0][1], per_sample(terms[0][0], terms[0][1]))
    for coefficient, tensor in terms[1:]:
        if isinstance(coefficient, np.ndarray):
            result.addcmul_(tensor, per_sample(coefficient, tensor))
        else:
            result.add_(tensor, alpha=coefficient)
    return result


def combine_update(
    update: Combination,
    states: deque,
    denoised: deque,
    state_scales: Sequence[float] | None = None,
    out_scale: float = 1.0,
) -> torch.Tensor:
    """out_scale (sum_k states[k] X[-1-k] + sum_j denoised[j] D[-1-j]) as one multiply and fused
    in-place adds (D None, the analytical first step's zero estimate, adds nothing).

    States may be stored scaled, X[-1-k] = states[-1-k] / state_scales[-1-k] (the scheduler keeps
    them in the pipeline's scale); every scale is folded into the coefficients."""
    terms = [
        (out_scale * c / (state_scales[-1 - k] if state_scales is not None else 1.0), states[-1 - k])
        for k, c in enumerate(update.states)
        if contributes(c)
    ]
    terms += [(out_scale * c, denoised[-1 - j]) for j, c in enumerate(update.denoised)
              if contributes(c) and denoised[-1 - j] is not None]
    return weighted_sum(terms, states[-1])


@torch.no_grad()
def execute_plan(
    plan: SolverPlan,
    denoiser: DenoiserFn,
    latents: torch.Tensor,
    *,
    generator: Generator = None,
    model_kwargs: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    check_finite: bool = True,
    state_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> SamplerOutput:
    """Run `plan` from `latents` ~ N(0, I): X[0] = init_std * latents; per Step, D(X[-1]; sigma)
    (or no call), then each update appended to X; the sample is the last X.

    Only the plan's look-back window of X and D is kept. Churn noise (an update's noise_std) is
    drawn with `generator` (a list: one per sample) in step order. `callback` gets, after each
    grid step i, {"i", "x" (before the next step's churn noise), "sigma", "sigma_hat",
    "sigma_next", "denoised" (D at the step's first call; None under afs)}. Runs without
    autograd (as diffusers pipelines do): a sampler never needs the graph of its model calls.
    """
    check_generator(generator, latents.shape[0])
    model_kwargs = _as_dict("model_kwargs", model_kwargs)
    dtype = _state_dtype(state_dtype, latents)
    states: deque = deque([latents.to(dtype) * plan.init_std], maxlen=plan.state_history)
    denoised: deque = deque(maxlen=plan.denoised_history)
    first_denoised: torch.Tensor | None = None
    nfe = 0
    for k, step in enumerate(tqdm(plan.steps, disable=not progress, desc="sampling")):
        if step.sigma is None:
            denoised.append(None)
        else:
            denoised.append(_evaluate(denoiser, states[-1], step.sigma, model_kwargs, step.index, check_finite))
            nfe += 1
        if k == 0 or plan.steps[k - 1].index != step.index:
            first_denoised = denoised[-1]
        updates = step.updates
        if step.adapt is not None:
            updates = step.adapt(motion_gram([denoised[-1 - j] for j in range(ADAPTIVE_LOOKBACK)]))
        clean = states[-1]
        for update in updates:
            clean = combine_update(update, states, denoised)
            new = clean
            if update.noise_std > 0:
                new = clean + update.noise_std * randn(clean.shape, generator, clean.device, dtype)
            states.append(new)
        last_of_grid_step = k + 1 == len(plan.steps) or plan.steps[k + 1].index != step.index
        if callback is not None and last_of_grid_step:
            i = step.index
            callback({"i": i, "x": clean, "sigma": plan.sigmas[i], "sigma_hat": plan.sigma_hats[i],
                      "sigma_next": plan.sigmas[i + 1], "denoised": first_denoised})
    return SamplerOutput(sample=states[-1], nfe=nfe, sigmas=torch.tensor(plan.sigmas, dtype=torch.float64),
                         sigma_hats=list(plan.sigma_hats))


@torch.no_grad()
def sample(
    denoiser: DenoiserFn,
    latents: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    solver: str = "heun",
    alpha: float | None = None,
    order: int | None = None,
    afs: bool = False,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generator = None,
    state_dtype: torch.dtype | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
    check_finite: bool = True,
    solver_options: dict[str, Any] | None = None,
) -> SamplerOutput:
    """Solve the probability-flow ODE from pure noise down the grid `sigmas` with any registered
    `solver` (`solvers.SOLVERS`), through its plan.

    `latents` ~ N(0, I). `alpha` (heun), `order` (ipndm, ipndm_v, unipc, deis, adams_alpha(_adaptive)), `afs` (every
    one-call-per-step solver) and `solver_options` (e.g. unipc's corrector / variant) go to the
    solver's plan; an option it does not take is a ValueError. Churn (Algorithm 2: euler and heun
    only; s_churn > 0 with another solver is a ValueError naming s_churn) starts the state at
    latents * initial_noise_std(sigma_0, sigma_hat_0), evaluates the model at (x_hat_i,
    sigma_hat_i) and draws the noise that lifts sigma_{i+1} to sigma_hat_{i+1} with `generator`
    (a list = one per sample). Heun makes 2N - 1 calls for N steps ending at 0, the multistep
    solvers N (N - 1 under afs). The grid and every sigma_hat are passed through `round_sigma`
    (default: the denoiser's) so the ODE is solved at levels the model represents. `sigmas` may
    start at inf (pure noise, `latents` the noise itself) for the solvers that can start there
    (`solvers.SolverInfo.infinite_start`) and denoisers that can be called there (flow matching:
    `Denoiser.infinite_sigma`). Every check runs before the first model call.
    """
    check_sampling_inputs(denoiser, latents, callback=callback, round_sigma=round_sigma)
    sigmas = _as_grid(sigmas)
    info = solver_info(solver)
    from_noise = sigmas.ndim == 1 and sigmas.numel() > 0 and float(sigmas[0]) == math.inf
    if from_noise:
        check_infinite_start(solver)
        check_infinite_sigma(denoiser)
    check_sigmas(sigmas, infinite_start=from_noise)
    check_churn(s_churn, s_tmin, s_tmax, s_noise, solver)
    check_kinds(afs=(afs, "bool"), check_finite=(check_finite, "bool"), progress=(progress, "bool"))
    _as_dict("model_kwargs", model_kwargs)
    check_generator(generator, latents.shape[0])
    _state_dtype(state_dtype, latents)
    round_sigma = round_sigma or getattr(denoiser, "round_sigma", None) or (lambda s: s)
    check_sigmas_in_range(sigmas, getattr(denoiser, "sigma_min", 0.0), getattr(denoiser, "sigma_max", math.inf))
    grid, hats = churned_grid(sigmas, round_sigma, s_churn, s_tmin, s_tmax, getattr(denoiser, "sigma_max", math.inf))
    options = _as_dict("solver_options", solver_options)
    options.update({k: v for k, v in (("alpha", alpha), ("order", order)) if v is not None})
    if afs:
        options["afs"] = afs
    if info.churn and s_churn > 0:
        options.update(sigma_hats=hats, s_noise=s_noise)
    family = getattr(denoiser, "family", None)
    if family is not None:
        options = {**family_options(solver, family.data_std), **options}
    plan = make_plan(solver, grid, **options)
    return execute_plan(plan, denoiser, latents, generator=generator, model_kwargs=model_kwargs, callback=callback,
                        check_finite=check_finite, state_dtype=state_dtype, progress=progress)


def _as_grid(sigmas: Any) -> torch.Tensor:
    """``sigmas`` as a float64 CPU tensor; `InvalidArgument` if it is not numbers."""
    if isinstance(sigmas, (str, bytes)):
        raise InvalidArgument("sigmas", f"must be a sequence of noise levels, got {sigmas!r}")
    try:
        return torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidArgument("sigmas", f"must be a sequence of noise levels, got {sigmas!r} ({error})") from None


def sample_heun(denoiser: DenoiserFn, latents: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, **kwargs: Any) -> SamplerOutput:
    """Algorithm 1: deterministic Heun, 2N - 1 model calls for N steps."""
    return sample(denoiser, latents, sigmas, solver="heun", **kwargs)


def sample_euler(denoiser: DenoiserFn, latents: torch.Tensor, sigmas: Sequence[float] | torch.Tensor, **kwargs: Any) -> SamplerOutput:
    """Deterministic Euler, N model calls for N steps."""
    return sample(denoiser, latents, sigmas, solver="euler", **kwargs)


def sample_stochastic(
    denoiser: DenoiserFn,
    latents: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    s_churn: float = 40.0,
    s_tmin: float = 0.05,
    s_tmax: float = 50.0,
    s_noise: float = 1.003,
    **kwargs: Any,
) -> SamplerOutput:
    """Algorithm 2: Heun with churn; defaults are Table 5's ImageNet-64 EDM-trained setting."""
    return sample(denoiser, latents, sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, **kwargs)


def denoiser_sigmas(
    denoiser: Any,
    num_steps: int,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = EDM_RHO,
    discretization_name: str = "karras",
    **schedule_options: Any,
) -> torch.Tensor:
    """A grid for `denoiser`: the requested range clamped to the model's, then the named
    schedule (`schedules.sigma_grid`; `rho` for "karras")."""
    lo, hi = clamp_sigma_range(
        sigma_min, sigma_max, getattr(denoiser, "sigma_min", 0.0), getattr(denoiser, "sigma_max", math.inf)
    )
    if discretization_name == "karras":
        schedule_options.setdefault("rho", rho)
    return sigma_grid(discretization_name, num_steps, lo, hi, **schedule_options)


# --- the paper's general sampler (sigma(t), s(t)), for ablations ---------------------------------


def general_ode_slope(
    x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_deriv: float, s: float, s_deriv: float
) -> torch.Tensor:
    """dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma D(x/s; sigma) (EDM eq. 4), x in the scaled space."""
    return (sigma_deriv / sigma + s_deriv / s) * x - sigma_deriv * s / sigma * denoised


def _ablation_schedule(schedule: str | SigmaSchedule, sigma_min: float, sigma_max: float, epsilon_s: float) -> SigmaSchedule:
    """The ODE's sigma(t). "vp" is refitted to the sampling range as the paper does: beta_d and
    beta_min with sigma_VP(epsilon_s) = sigma_min and sigma_VP(1) = sigma_max, so t in
    [epsilon_s, 1] spans exactly the range sampled."""
    if isinstance(schedule, SigmaSchedule):
        return schedule
    if schedule == "vp":
        return vp_schedule(*vp_betas_for_range(sigma_min, sigma_max, epsilon_s))
    if schedule not in SIGMA_SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SIGMA_SCHEDULES)}, got {schedule!r}")
    return SIGMA_SCHEDULES[schedule]


@torch.no_grad()
def sample_ablation(
    denoiser: DenoiserFn,
    latents: torch.Tensor,
    num_steps: int,
    *,
    discretization_name: str = "karras",
    schedule: str | SigmaSchedule = "linear",
    scaling: str | Scaling = "none",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = EDM_RHO,
    epsilon_s: float = VP_EPSILON_S,
    solver: str = "heun",
    alpha: float = 1.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generator = None,
    state_dtype: torch.dtype | None = None,
    model_kwargs: dict[str, Any] | None = None,
    check_finite: bool = True,
) -> SamplerOutput:
    """The paper's general deterministic/stochastic sampler: grid `discretization_name`, ODE in t
    with schedule sigma(t) and scaling s(t) (eq. 4), Euler or the alpha-generalized second-order
    step. schedule="linear", scaling="none" is exactly `sample` (sigma(t) = t, s(t) = 1); "vp"/"vp"
    and "ve"/"none" are the original samplers' ODEs.

    The range defaults to the paper's for the discretization (vp [0.0105, 152] with epsilon_s =
    1e-3, ve [0.02, 100], iddpm [0.002, 81], else [0.002, 80]), clamped to the model's; the VP
    schedule's betas are refitted to that range.
    """
    check_sampling_inputs(denoiser, latents)
    check_num_steps(num_steps)
    if solver not in ABLATION_SOLVERS:
        raise ValueError(f"solver must be one of {ABLATION_SOLVERS} for sample_ablation, got {solver!r}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    check_churn(s_churn, s_tmin, s_tmax, s_noise)
    check_generator(generator, latents.shape[0])
    scale = SCALINGS.get(scaling) if isinstance(scaling, str) else scaling
    if not isinstance(scale, Scaling):
        raise ValueError(f"scaling must be one of {sorted(SCALINGS)}, got {scaling!r}")
    options = {"epsilon_s": epsilon_s} if discretization_name == "vp" else {}
    default_lo, default_hi = default_sigma_range(discretization_name, **options)
    lo, hi = clamp_sigma_range(
        default_lo if sigma_min is None else sigma_min,
        default_hi if sigma_max is None else sigma_max,
        getattr(denoiser, "sigma_min", 0.0),
        getattr(denoiser, "sigma_max", math.inf),
    )
    sched = _ablation_schedule(schedule, lo, hi, epsilon_s)
    model_kwargs = _as_dict("model_kwargs", model_kwargs)
    round_sigma = getattr(denoiser, "round_sigma", None) or (lambda s: s)
    grid = denoiser_sigmas(denoiser, num_steps, lo, hi, rho, discretization_name, **options)
    sigmas, hats = churned_grid(grid, round_sigma, s_churn, s_tmin, s_tmax, getattr(denoiser, "sigma_max", math.inf))
    dtype = _state_dtype(state_dtype, latents)

    def at(t: float) -> tuple[float, float, float, float]:
        tt = torch.tensor(t, dtype=torch.float64)
        return (float(sched.sigma(tt)), float(sched.sigma_deriv(tt)), float(scale.s(tt, sched)), float(scale.s_deriv(tt, sched)))

    def slope_at(x: torch.Tensor, t: float, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, sigma_deriv, s, s_deriv = at(t)
        denoised = _evaluate(denoiser, x / s, sigma, model_kwargs, step, check_finite)
        return general_ode_slope(x, denoised, sigma, sigma_deriv, s, s_deriv), denoised

    def t_of(sigma: float) -> float:
        return float(sched.sigma_inv(torch.tensor(sigma, dtype=torch.float64))) if sigma > 0 else 0.0

    levels = sigmas.tolist()
    t_hat = t_of(hats[0])
    x = latents.to(dtype) * initial_noise_std(levels[0], hats[0], s_noise) * at(t_hat)[2]
    nfe = 0
    for i in range(num_steps):
        t_cur, t_next = t_of(levels[i]), t_of(levels[i + 1])
        t_hat = t_of(hats[i])
        if i > 0 and hats[i] > levels[i]:
            s_cur, s_hat = at(t_cur)[2], at(t_hat)[2]
            noise = randn(x.shape, generator, x.device, dtype)
            x = s_hat / s_cur * x + churn_noise_std(levels[i], hats[i], s_noise) * s_hat * noise
        slope, _ = slope_at(x, t_hat, i)
        nfe += 1
        if solver == "euler" or levels[i + 1] == 0:
            x = euler_step(x, slope, t_hat, t_next)
        else:
            t_mid = t_hat + alpha * (t_next - t_hat)
            slope_mid, _ = slope_at(euler_step(x, slope, t_hat, t_mid), t_mid, i)
            nfe += 1
            x = heun_step(x, slope, slope_mid, t_hat, t_next, alpha)
    return SamplerOutput(sample=x / at(t_of(levels[-1]))[2], nfe=nfe, sigmas=sigmas, sigma_hats=hats)
