"""EDM samplers over any denoiser D(x; sigma) (Karras et al. 2022, Algorithms 1 and 2).

The step rules (`ode_slope`, `euler_step`, `heun_step`) and the churn rules (`churn_gammas`,
`sigma_hats`, `churn_noise_std`, `initial_noise_std`) are written here once; the sampling
loops below and the diffusers schedulers call them. Nothing here imports diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .schedules import (
    EDM_RHO,
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    SCALINGS,
    SIGMA_SCHEDULES,
    Scaling,
    SigmaSchedule,
    check_num_steps,
    clamp_sigma_range,
    discretization,
)

Generator = torch.Generator | Sequence[torch.Generator] | None
DenoiserFn = Callable[..., torch.Tensor]
SOLVERS = ("heun", "euler")
MAX_GAMMA = math.sqrt(2.0) - 1.0


class NonFiniteOutputError(RuntimeError):
    """The model returned NaN or inf during sampling."""


# --- step rules ----------------------------------------------------------------------------------


def ode_slope(x: torch.Tensor, denoised: torch.Tensor, sigma: Any) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE with sigma(t) = t, s(t) = 1: (x - D(x; sigma)) / sigma."""
    return (x - denoised) / sigma


def euler_step(x: torch.Tensor, slope: torch.Tensor, sigma: Any, sigma_next: Any) -> torch.Tensor:
    """One Euler step: x + (sigma_next - sigma) slope. Also used in t for the general ODE."""
    return x + (sigma_next - sigma) * slope


def heun_step(
    x: torch.Tensor, slope: torch.Tensor, slope_next: torch.Tensor, sigma: Any, sigma_next: Any, alpha: float = 1.0
) -> torch.Tensor:
    """The generalized second-order step: x + h ((1 - 1/(2 alpha)) slope + 1/(2 alpha) slope_next),
    h = sigma_next - sigma, with slope_next evaluated at sigma + alpha h; alpha = 1 is Heun's
    trapezoidal rule x + h (slope + slope_next) / 2."""
    weight = 1.0 / (2.0 * alpha)
    return x + (sigma_next - sigma) * ((1.0 - weight) * slope + weight * slope_next)


# --- churn (Algorithm 2) -------------------------------------------------------------------------


def check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> None:
    """Raise a ValueError naming the parameter for churn settings outside their range."""
    if not (math.isfinite(s_churn) and s_churn >= 0):
        raise ValueError(f"s_churn must be a finite number >= 0, got {s_churn!r}")
    if not s_tmin >= 0:
        raise ValueError(f"s_tmin must be >= 0, got {s_tmin!r}")
    if not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax must be >= s_tmin={s_tmin!r}, got {s_tmax!r}")
    if not (math.isfinite(s_noise) and s_noise > 0):
        raise ValueError(f"s_noise must be a finite number > 0, got {s_noise!r}")


def churn_gammas(
    sigmas: Sequence[float] | torch.Tensor, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf
) -> list[float]:
    """gamma_i = min(S_churn / N, sqrt(2) - 1) where S_tmin <= sigma_i <= S_tmax, else 0, for the
    N = len(sigmas) - 1 steps. Known before sampling starts."""
    levels = [float(s) for s in sigmas[:-1]]
    gamma = min(s_churn / len(levels), MAX_GAMMA) if levels else 0.0
    return [gamma if s_tmin <= s <= s_tmax else 0.0 for s in levels]


def sigma_hats(sigmas: Sequence[float] | torch.Tensor, gammas: Sequence[float], sigma_max: float = math.inf) -> list[float]:
    """sigma_hat_i = sigma_i (1 + gamma_i), the raised noise level the model is evaluated at,
    capped at the model's sigma_max (it cannot be evaluated above it) but never below sigma_i."""
    return [max(min(float(s) * (1.0 + g), sigma_max), float(s)) for s, g in zip(sigmas[:-1], gammas)]


def churn_noise_std(sigma: float, sigma_hat: float, s_noise: float = 1.0) -> float:
    """The std of the noise that lifts x from sigma to sigma_hat: sqrt(sigma_hat^2 - sigma^2) S_noise."""
    return math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * s_noise


def initial_noise_std(sigma_0: float, sigma_hat_0: float, s_noise: float = 1.0) -> float:
    """The std of x_hat_0 when x_0 = sigma_0 z is churned to sigma_hat_0:
    sqrt(sigma_0^2 + (sigma_hat_0^2 - sigma_0^2) S_noise^2). Starting from z times this is
    Algorithm 2's first step exactly in distribution, with one noise draw."""
    return math.sqrt(sigma_0**2 + churn_noise_std(sigma_0, sigma_hat_0, s_noise) ** 2)


# --- noise ---------------------------------------------------------------------------------------


def check_generator(generator: Generator, batch_size: int) -> None:
    """A list of generators must hold exactly one per sample."""
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise ValueError(
            f"generator is a list of {len(generator)} generators but the batch has {batch_size} samples; "
            "pass one generator per sample"
        )


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


# --- sampling loops ------------------------------------------------------------------------------


@dataclass
class SamplerOutput:
    """The final sample, the number of model evaluations it took, and the grid it used."""

    sample: torch.Tensor
    nfe: int
    sigmas: torch.Tensor
    sigma_hats: list[float] = field(default_factory=list)


def check_sigmas(sigmas: torch.Tensor) -> None:
    """A sampling grid: 1-D, at least 2 levels, finite, strictly decreasing, last >= 0, others > 0."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D sequence of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    if not bool(torch.isfinite(sigmas).all()):
        raise ValueError("sigmas must be finite")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas.tolist()}")
    if not (float(sigmas[-1]) >= 0 and float(sigmas[-2]) > 0):
        raise ValueError("sigmas must be > 0 except the last, which may be 0")


def _check_solver(solver: str, alpha: float) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")


def round_grid(sigmas: torch.Tensor, round_sigma: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The grid with every positive level passed through `round_sigma` (the final 0 kept), so
    the ODE is solved at levels a discrete model represents exactly."""
    rounded = sigmas.clone()
    rounded[sigmas > 0] = round_sigma(sigmas[sigmas > 0]).to(torch.float64)
    return rounded


def check_sigmas_in_range(sigmas: torch.Tensor, sigma_min: float, sigma_max: float, name: str = "sigmas") -> None:
    """Every positive level must lie in the model's range [sigma_min, sigma_max] (a relative
    1e-3 of slack for rounded values such as 0.01); outside it a model is evaluated where it
    was not trained."""
    positive = sigmas[sigmas > 0]
    lo, hi = float(positive.min()), float(positive.max())
    if hi > sigma_max * (1 + 1e-3) or lo < sigma_min * (1 - 1e-3):
        raise ValueError(
            f"{name} span [{lo:.6g}, {hi:.6g}] but the model supports [{sigma_min:.6g}, {sigma_max:.6g}]; "
            "clamp the grid to the model's range (denoiser_sigmas does)"
        )


def churned_grid(
    sigmas: torch.Tensor,
    round_sigma: Callable[[torch.Tensor], torch.Tensor],
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    sigma_max: float = math.inf,
) -> tuple[torch.Tensor, list[float]]:
    """The grid with its positive levels rounded, and every step's sigma_hat (capped at the
    model's sigma_max, then rounded): the plan shared by `sample`, `sample_ablation` and the
    diffusers scheduler."""
    grid = round_grid(sigmas, round_sigma)
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


def sample(
    denoiser: DenoiserFn,
    latents: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    solver: str = "heun",
    alpha: float = 1.0,
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
) -> SamplerOutput:
    """Solve the probability-flow ODE from pure noise down the grid `sigmas` (Algorithm 1), with
    optional churn (Algorithm 2).

    `latents` ~ N(0, I); the state starts at latents * initial_noise_std(sigma_0, sigma_hat_0)
    and the model is first evaluated at sigma_hat_0. Before step i >= 1 the state is lifted from
    sigma_i to sigma_hat_i with fresh noise (drawn with `generator`; a list = one per sample) and
    the model is evaluated at (x_hat, sigma_hat). Heun makes 2N - 1 calls for N steps (the last,
    to sigma = 0, is an Euler step), Euler N. The grid and every sigma_hat are passed through
    `round_sigma` (default: the denoiser's) so the ODE is solved at levels the model represents.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    check_sigmas(sigmas)
    _check_solver(solver, alpha)
    check_churn(s_churn, s_tmin, s_tmax, s_noise)
    check_generator(generator, latents.shape[0])
    model_kwargs = dict(model_kwargs or {})
    round_sigma = round_sigma or getattr(denoiser, "round_sigma", None) or (lambda s: s)

    check_sigmas_in_range(sigmas, getattr(denoiser, "sigma_min", 0.0), getattr(denoiser, "sigma_max", math.inf))
    sigmas, hats = churned_grid(sigmas, round_sigma, s_churn, s_tmin, s_tmax, getattr(denoiser, "sigma_max", math.inf))
    levels = sigmas.tolist()
    dtype = _state_dtype(state_dtype, latents)

    x = latents.to(dtype) * initial_noise_std(levels[0], hats[0], s_noise)
    nfe = 0
    for i in tqdm(range(len(levels) - 1), disable=not progress, desc="sampling"):
        sigma, sigma_hat, sigma_next = levels[i], hats[i], levels[i + 1]
        if i > 0 and sigma_hat > sigma:
            x = x + churn_noise_std(sigma, sigma_hat, s_noise) * randn(x.shape, generator, x.device, dtype)
        denoised = _evaluate(denoiser, x, sigma_hat, model_kwargs, i, check_finite)
        nfe += 1
        slope = ode_slope(x, denoised, sigma_hat)
        if solver == "euler" or sigma_next == 0:
            x_next = euler_step(x, slope, sigma_hat, sigma_next)
        else:
            sigma_mid = sigma_hat + alpha * (sigma_next - sigma_hat)
            x_mid = euler_step(x, slope, sigma_hat, sigma_mid)
            denoised_mid = _evaluate(denoiser, x_mid, sigma_mid, model_kwargs, i, check_finite)
            nfe += 1
            x_next = heun_step(x, slope, ode_slope(x_mid, denoised_mid, sigma_mid), sigma_hat, sigma_next, alpha)
        if callback is not None:
            callback({"i": i, "x": x_next, "sigma": sigma, "sigma_hat": sigma_hat, "sigma_next": sigma_next, "denoised": denoised})
        x = x_next
    return SamplerOutput(sample=x, nfe=nfe, sigmas=sigmas, sigma_hats=hats)


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
) -> torch.Tensor:
    """A grid for `denoiser`: the requested range clamped to the model's, then discretized."""
    lo, hi = clamp_sigma_range(
        sigma_min, sigma_max, getattr(denoiser, "sigma_min", 0.0), getattr(denoiser, "sigma_max", math.inf)
    )
    return discretization(discretization_name, num_steps, lo, hi, rho)


# --- the paper's general sampler (sigma(t), s(t)), for ablations ---------------------------------


def general_ode_slope(
    x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_deriv: float, s: float, s_deriv: float
) -> torch.Tensor:
    """dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma D(x/s; sigma) (EDM eq. 4), x in the scaled space."""
    return (sigma_deriv / sigma + s_deriv / s) * x - sigma_deriv * s / sigma * denoised


def sample_ablation(
    denoiser: DenoiserFn,
    latents: torch.Tensor,
    num_steps: int,
    *,
    discretization_name: str = "karras",
    schedule: str | SigmaSchedule = "linear",
    scaling: str | Scaling = "none",
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = EDM_RHO,
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
    and "ve"/"none" are the original samplers' ODEs."""
    check_num_steps(num_steps)
    _check_solver(solver, alpha)
    check_churn(s_churn, s_tmin, s_tmax, s_noise)
    check_generator(generator, latents.shape[0])
    sched = SIGMA_SCHEDULES.get(schedule) if isinstance(schedule, str) else schedule
    scale = SCALINGS.get(scaling) if isinstance(scaling, str) else scaling
    if not isinstance(sched, SigmaSchedule):
        raise ValueError(f"schedule must be one of {sorted(SIGMA_SCHEDULES)}, got {schedule!r}")
    if not isinstance(scale, Scaling):
        raise ValueError(f"scaling must be one of {sorted(SCALINGS)}, got {scaling!r}")
    model_kwargs = dict(model_kwargs or {})
    round_sigma = getattr(denoiser, "round_sigma", None) or (lambda s: s)
    grid = denoiser_sigmas(denoiser, num_steps, sigma_min, sigma_max, rho, discretization_name)
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
