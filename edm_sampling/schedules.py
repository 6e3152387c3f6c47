"""Noise-level grids and noise schedules of the EDM paper (Karras et al. 2022, section 3 and
appendix C), plus the bridge from a DDPM-style beta schedule to sigmas.

Every grid is a float64 CPU tensor, decreasing, with a final 0 appended: N steps need N + 1
noise levels. Nothing here imports diffusers.
"""

from __future__ import annotations

import math
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

Number = float | torch.Tensor

EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0
EDM_RHO = 7.0
VP_BETA_D = 19.9
VP_BETA_MIN = 0.1


def _f64(value: Number | Sequence[float]) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64)


def check_num_steps(num_steps: int, name: str = "num_steps") -> None:
    """Raise a ValueError unless `num_steps` is an integer >= 1."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {num_steps!r}")


def check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    """Raise a ValueError unless 0 < sigma_min < sigma_max < inf."""
    if not (math.isfinite(sigma_min) and sigma_min > 0):
        raise ValueError(f"sigma_min must be a finite number > 0, got {sigma_min!r}")
    if not (math.isfinite(sigma_max) and sigma_max > sigma_min):
        raise ValueError(
            f"sigma_max must be finite and greater than sigma_min={sigma_min!r}, got {sigma_max!r}"
        )


VE_SIGMA_MIN = 0.02
VE_SIGMA_MAX = 100.0
IDDPM_SIGMA_MAX = 81.0
VP_EPSILON_S = 1e-3

TimeMap = Callable[[torch.Tensor], torch.Tensor]


def check_sigmas(sigmas: torch.Tensor, name: str = "sigmas", infinite_start: bool = False) -> None:
    """A sampling grid: 1-D, at least 2 levels, finite, strictly decreasing, last >= 0, others > 0;
    a ValueError naming `name` otherwise. With `infinite_start` the first level may be +inf (a
    start from pure noise, for the solvers and models that allow it)."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"{name} must be a 1-D sequence of at least 2 noise levels, got shape {tuple(sigmas.shape)}")
    finite = sigmas[1:] if infinite_start and float(sigmas[0]) == math.inf else sigmas
    if not bool(torch.isfinite(finite).all()):
        raise ValueError(f"{name} must be finite, got {sigmas.tolist()}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"{name} must be strictly decreasing, got {sigmas.tolist()}")
    if not (float(sigmas[-1]) >= 0 and float(sigmas[-2]) > 0):
        raise ValueError(f"{name} must be > 0 except the last, which may be 0, got {sigmas.tolist()}")


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


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _step_fractions(num_steps: int) -> torch.Tensor:
    """i / (N - 1) for i < N; a single step uses fraction 0 (the grid is just sigma_max)."""
    if num_steps == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)


def _check_rho(rho: float) -> None:
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")


def rho_interpolation(start: float, end: float, num_steps: int, rho: float) -> torch.Tensor:
    """u_i = (start^(1/rho) + i/(N-1) (end^(1/rho) - start^(1/rho)))^rho for i < N, ends exact:
    equal steps in u^(1/rho). rho = 1 is uniform, rho = 2 quadratic, rho = 7 the EDM grid (eq. 5)."""
    inv_rho = 1.0 / rho
    u = (start**inv_rho + _step_fractions(num_steps) * (end**inv_rho - start**inv_rho)) ** rho
    u[0] = start  # exact ends: S_tmin / S_tmax bounds are inclusive
    if num_steps > 1:
        u[-1] = end
    return u


def karras_sigmas(
    num_steps: int,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = EDM_RHO,
) -> torch.Tensor:
    """The EDM time steps (eq. 5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho for i < N, then sigma_N = 0.

    rho = 7 shortens the steps near sigma_min, where the ODE's curvature is largest.
    """
    check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    _check_rho(rho)
    return _append_zero(rho_interpolation(sigma_max, sigma_min, num_steps, rho))


def logsnr_sigmas(num_steps: int, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX) -> torch.Tensor:
    """Uniform in log sigma (so in logSNR = -2 log sigma, and in DPM-Solver's lambda = -log sigma):
    sigma_i = sigma_max (sigma_min / sigma_max)^(i/(N-1)), then 0. The limit rho -> inf of eq. 5."""
    check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    log_sigmas = math.log(sigma_max) + _step_fractions(num_steps) * (math.log(sigma_min) - math.log(sigma_max))
    sigmas = torch.exp(log_sigmas)
    sigmas[0] = sigma_max
    if num_steps > 1:
        sigmas[-1] = sigma_min
    return _append_zero(sigmas)


def noise_start_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """A grid from pure noise: sigma = inf (flow matching's t = 1), then N - 1 steps equal in
    log sigma from sigma_max down to sigma_min (`logsnr_sigmas`), then 0; one step is [inf, 0],
    two are [inf, sigma_max, 0]. For the solvers that can start at inf (`solvers.SolverInfo`)."""
    check_num_steps(num_steps)
    start = torch.tensor([math.inf], dtype=torch.float64)
    if num_steps <= 2:
        return torch.cat([start, torch.tensor([sigma_max, 0.0][2 - num_steps:], dtype=torch.float64)])
    return torch.cat([start, logsnr_sigmas(num_steps - 1, sigma_min, sigma_max)])


def ve_sigmas(num_steps: int, sigma_min: float = VE_SIGMA_MIN, sigma_max: float = VE_SIGMA_MAX) -> torch.Tensor:
    """The original VE discretization, sigma_i^2 = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)):
    the log-uniform grid on VE's range [0.02, 100]."""
    return logsnr_sigmas(num_steps, sigma_min, sigma_max)


# --- grids uniform in a model's time variable ------------------------------------------------


def vp_time_maps(beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> tuple[TimeMap, TimeMap]:
    """(sigma -> t, t -> sigma) of the continuous VP SDE (EDM_SPEC section 2)."""
    return (lambda sigma: vp_sigma_inv(sigma, beta_d, beta_min)), (lambda t: vp_sigma(t, beta_d, beta_min))


def discrete_time_maps(train_sigmas: torch.Tensor) -> tuple[TimeMap, TimeMap]:
    """(sigma -> fractional train timestep, timestep -> sigma) of a discrete VP model trained at
    `train_sigmas` (increasing): log-sigma interpolation between trained levels."""
    train = _f64(train_sigmas)
    return (lambda sigma: sigma_to_timestep(sigma, train)), (lambda t: timestep_to_sigma(t, train))


def time_sigmas(
    num_steps: int,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = 1.0,
    sigma_to_t: TimeMap | None = None,
    t_to_sigma: TimeMap | None = None,
) -> torch.Tensor:
    """Equal steps in t^(1/rho) of the model's time variable t(sigma): t_i = rho_interpolation(t(sigma_max),
    t(sigma_min)), sigma_i = sigma(t_i), then 0. The maps default to the continuous VP t; pass
    `discrete_time_maps(train_sigmas)` for a DDPM model (t = its train timestep)."""
    check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    _check_rho(rho)
    if (sigma_to_t is None) != (t_to_sigma is None):
        raise ValueError("sigma_to_t and t_to_sigma must be given together")
    if sigma_to_t is None:
        sigma_to_t, t_to_sigma = vp_time_maps()
    t_max, t_min = float(sigma_to_t(_f64(sigma_max))), float(sigma_to_t(_f64(sigma_min)))
    if not (math.isfinite(t_max) and t_max > t_min >= 0):
        raise ValueError(f"sigma_to_t must be increasing and >= 0 on [sigma_min, sigma_max], got t = {t_min!r}..{t_max!r}")
    sigmas = _f64(t_to_sigma(rho_interpolation(t_max, t_min, num_steps, rho))).clone()
    sigmas[0] = sigma_max
    if num_steps > 1:
        sigmas[-1] = sigma_min
    return _append_zero(sigmas)


time_uniform_sigmas = functools.partial(time_sigmas, rho=1.0)
"""Uniform in the model's time variable (diffusers' "linspace" spacing, in continuous t)."""
time_quadratic_sigmas = functools.partial(time_sigmas, rho=2.0)
"""Uniform in sqrt(t) (DPM-Solver's "time_quadratic", DDIM's "quad" skip): short steps near t = 0."""


# --- VP (Song et al.), the continuous variance-preserving SDE -------------------------------


def vp_sigma(t: Number, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """sigma_VP(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = _f64(t)
    return torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_sigma_deriv(t: Number, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """sigma_VP'(t) = (beta_min + beta_d t) (sigma + 1/sigma) / 2."""
    t = _f64(t)
    sigma = vp_sigma(t, beta_d, beta_min)
    return 0.5 * (beta_min + beta_d * t) * (sigma + 1.0 / sigma)


def vp_sigma_inv(sigma: Number, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> torch.Tensor:
    """t = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d."""
    sigma = _f64(sigma)
    return (torch.sqrt(beta_min**2 + 2.0 * beta_d * torch.log1p(sigma**2)) - beta_min) / beta_d


def vp_betas_for_range(sigma_min: float, sigma_max: float, epsilon_s: float = VP_EPSILON_S) -> tuple[float, float]:
    """(beta_d, beta_min) with sigma_VP(epsilon_s) = sigma_min and sigma_VP(1) = sigma_max.

    ln(sigma^2 + 1) = beta_d t^2 / 2 + beta_min t at t = 1 and t = epsilon_s is linear in the betas:
    beta_d = 2 (ln(sigma_min^2 + 1) / epsilon_s - ln(sigma_max^2 + 1)) / (epsilon_s - 1),
    beta_min = ln(sigma_max^2 + 1) - beta_d / 2. For [0.002, 80], 1e-3: 17.5380, -0.00478.
    """
    a = math.log1p(sigma_max**2)
    b = math.log1p(sigma_min**2)
    beta_d = 2.0 * (b / epsilon_s - a) / (epsilon_s - 1.0)
    return beta_d, a - 0.5 * beta_d


def _check_epsilon_s(epsilon_s: float) -> None:
    if not 0 < epsilon_s < 1:
        raise ValueError(f"epsilon_s must be in (0, 1), got {epsilon_s!r}")


def vp_sigmas(
    num_steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    epsilon_s: float = VP_EPSILON_S,
    beta_d: float = VP_BETA_D,
    beta_min: float = VP_BETA_MIN,
) -> torch.Tensor:
    """The original VP discretization: t_i = 1 + i/(N-1) (epsilon_s - 1), sigma_i = sigma_VP(t_i).

    Without a range: the given betas' [sigma_VP(epsilon_s), sigma_VP(1)] = [0.0105, 152.17].
    With a sigma range, beta_d and beta_min are refitted so the grid spans exactly it
    (how the paper applies this discretization to other models in its ablations).
    """
    check_num_steps(num_steps)
    _check_epsilon_s(epsilon_s)
    if (sigma_min is None) != (sigma_max is None):
        raise ValueError("sigma_min and sigma_max must be given together for vp_sigmas")
    if sigma_min is not None:
        check_sigma_range(sigma_min, sigma_max)
        beta_d, beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
    t = 1.0 + _step_fractions(num_steps) * (epsilon_s - 1.0)
    return _append_zero(vp_sigma(t, beta_d, beta_min))


# --- iDDPM / DDIM (Nichol and Dhariwal; ADM) --------------------------------------------------


def iddpm_u_table(num_train_timesteps: int = 1000, c1: float = 0.001, c2: float = 0.008) -> torch.Tensor:
    """The noise levels u_0 > u_1 > ... > u_{M-1} of the improved-DDPM cosine schedule:
    u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), c1) - 1),
    abar(j) = sin^2(pi j / (2 M (c2 + 1))).
    """
    check_num_steps(num_train_timesteps, "num_train_timesteps")
    m = num_train_timesteps

    def alpha_bar(j: int) -> float:
        return math.sin(0.5 * math.pi * j / (m * (c2 + 1.0))) ** 2

    u = [0.0] * (m + 1)
    for j in range(m, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1.0) / max(alpha_bar(j - 1) / alpha_bar(j), c1) - 1.0)
    return _f64(u[:m])


def iddpm_sigmas(
    num_steps: int,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = IDDPM_SIGMA_MAX,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """The iDDPM/DDIM discretization: of the u_j inside [sigma_min, sigma_max], indices j0..j1,
    sigma_i = u_{floor(j0 + (j1 - j0) i/(N-1) + 1/2)} (EDM_SPEC section 4, j0 = 8 for the
    default range)."""
    check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    u = iddpm_u_table() if u is None else _f64(u)
    inside = torch.nonzero((u >= sigma_min) & (u <= sigma_max)).flatten()
    if inside.numel() == 0:
        raise ValueError(f"no iDDPM noise level lies in [sigma_min, sigma_max] = [{sigma_min}, {sigma_max}]")
    j0, j1 = int(inside[0]), int(inside[-1])
    index = torch.floor(j0 + (j1 - j0) * _step_fractions(num_steps) + 0.5).long()
    return _append_zero(u[index])


# --- published optimized lists: Align Your Steps, GITS -----------------------------------------

AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    # Sabour, Fidler, Kreis 2024, "Align Your Steps": the 10-step noise levels published on the
    # project page (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), each list
    # ending at its model's sigma_min. diffusers' AysSchedules holds the same first ten numbers.
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}
GITS_SIGMAS: dict[tuple[str, int], tuple[float, ...]] = {
    # Chen et al. 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling" (GITS):
    # the schedule published in github.com/zju-pi/diff-sampler, gits-main/README.md, for the EDM
    # CIFAR-10 model with iPNDM (max order 4), 6 steps (NFE 6), searched with coeff 1.15.
    ("cifar10", 6): (80.0, 10.9836, 3.8811, 1.584, 0.5666, 0.1698, 0.002),
}


def _published_levels(schedule: str, options: dict[str, Any]) -> tuple[float, ...]:
    """The published list an "ays" (option model) or "gits" (option dataset) schedule starts from."""
    if schedule == "ays":
        model = options.get("model", "sd15")
        if model not in AYS_SIGMAS:
            raise ValueError(f"model must be one of {sorted(AYS_SIGMAS)} for schedule 'ays', got {model!r}")
        return AYS_SIGMAS[model]
    dataset = options.get("dataset", "cifar10")
    lists = [levels for (d, _), levels in sorted(GITS_SIGMAS.items()) if d == dataset]
    if not lists:
        raise ValueError(f"dataset must be one of {sorted({d for d, _ in GITS_SIGMAS})} for schedule 'gits', got {dataset!r}")
    return lists[0]


def published_sigmas(
    levels: Sequence[float], num_steps: int, sigma_min: float | None = None, sigma_max: float | None = None
) -> torch.Tensor:
    """A published list of noise levels (decreasing, ending at its model's sigma_min) as an N-step grid.

    log sigma is interpolated linearly in the list's index to N + 1 levels (AYS's loglinear_interp;
    the list itself when N + 1 = its length); on a model of another range [sigma_min, sigma_max]
    log sigma is mapped affinely from the list's range onto it, which keeps where the steps sit
    relative to the two ends; the last level is then replaced by 0, as these lists are used (the
    final step denoises fully).
    """
    check_num_steps(num_steps)
    logs = torch.log(_f64(levels))
    lo, hi = float(logs[-1]), float(logs[0])
    sigma_min = math.exp(lo) if sigma_min is None else sigma_min
    sigma_max = math.exp(hi) if sigma_max is None else sigma_max
    check_sigma_range(sigma_min, sigma_max)
    position = torch.linspace(0, len(levels) - 1, num_steps + 1, dtype=torch.float64)
    left = position.floor().long().clamp(max=len(levels) - 2)
    frac = position - left
    interpolated = (1 - frac) * logs[left] + frac * logs[left + 1]
    mapped = math.log(sigma_min) + (interpolated - lo) * (math.log(sigma_max) - math.log(sigma_min)) / (hi - lo)
    sigmas = torch.exp(mapped)
    sigmas[0], sigmas[-1] = sigma_max, 0.0
    return sigmas


def ays_sigmas(
    num_steps: int, sigma_min: float | None = None, sigma_max: float | None = None, model: str = "sd15"
) -> torch.Tensor:
    """Align Your Steps: the published 10-step list of `model` ("sd15", "sdxl", "svd"),
    log-linearly interpolated to `num_steps` and mapped onto [sigma_min, sigma_max] (default:
    the list's own range) by `published_sigmas`."""
    return published_sigmas(_published_levels("ays", {"model": model}), num_steps, sigma_min, sigma_max)


def gits_sigmas(
    num_steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    dataset: str = "cifar10",
    interpolate: bool = False,
) -> torch.Tensor:
    """A published GITS schedule of `dataset` for `num_steps`, mapped onto [sigma_min, sigma_max]
    (default: its own range) by `published_sigmas`. Only the published step counts exist (GITS
    searches one schedule per count); `interpolate=True` resamples the nearest published list
    log-linearly to other counts, which is no longer a searched schedule."""
    _published_levels("gits", {"dataset": dataset})
    counts = sorted(n for d, n in GITS_SIGMAS if d == dataset)
    check_num_steps(num_steps)
    if num_steps not in counts and not interpolate:
        raise ValueError(
            f"num_steps={num_steps}: GITS published schedules for {dataset} have num_steps in {counts}; "
            "pass interpolate=True to resample one log-linearly"
        )
    nearest = min(counts, key=lambda n: abs(n - num_steps))
    return published_sigmas(GITS_SIGMAS[(dataset, nearest)], num_steps, sigma_min, sigma_max)


# --- one entry point ---------------------------------------------------------------------------

GRIDS: dict[str, Callable[..., torch.Tensor]] = {
    "karras": karras_sigmas,
    "logsnr": logsnr_sigmas,
    "time_uniform": time_uniform_sigmas,
    "time_quadratic": time_quadratic_sigmas,
    "vp": vp_sigmas,
    "ve": ve_sigmas,
    "iddpm": iddpm_sigmas,
    "ays": ays_sigmas,
    "gits": gits_sigmas,
}
"""Name -> grid(num_steps, sigma_min, sigma_max, **options): the named schedules of `sigma_grid`."""
SCHEDULES = tuple(GRIDS)


def schedule_options(schedule: str) -> tuple[str, ...]:
    """The options (beyond num_steps, sigma_min, sigma_max) a named schedule takes."""
    parameters = inspect.signature(GRIDS[schedule]).parameters
    return tuple(name for name in parameters if name not in ("num_steps", "sigma_min", "sigma_max"))


def default_sigma_range(schedule: str, **options: Any) -> tuple[float, float]:
    """The range a named schedule spans when none is given: the paper's for its ablation grids
    (vp [sigma_VP(epsilon_s), sigma_VP(1)] = [0.0105, 152], ve [0.02, 100], iddpm [0.002, 81]),
    the published list's for ays / gits, EDM's [0.002, 80] otherwise."""
    if schedule == "vp":
        epsilon_s = options.get("epsilon_s", VP_EPSILON_S)
        _check_epsilon_s(epsilon_s)
        betas = (options.get("beta_d", VP_BETA_D), options.get("beta_min", VP_BETA_MIN))
        return float(vp_sigma(epsilon_s, *betas)), float(vp_sigma(1.0, *betas))
    if schedule in ("ays", "gits"):
        levels = _published_levels(schedule, options)
        return levels[-1], levels[0]
    return {"ve": (VE_SIGMA_MIN, VE_SIGMA_MAX), "iddpm": (EDM_SIGMA_MIN, IDDPM_SIGMA_MAX)}.get(
        schedule, (EDM_SIGMA_MIN, EDM_SIGMA_MAX)
    )


def _check_schedule_name(schedule: Any, options: dict[str, Any]) -> None:
    if not (isinstance(schedule, str) and schedule in GRIDS):
        raise ValueError(f"schedule must be one of {SCHEDULES} or a decreasing sequence of noise levels, got {schedule!r}")
    unknown = sorted(set(options) - set(schedule_options(schedule)))
    if unknown:
        raise ValueError(f"schedule {schedule!r} takes the options {schedule_options(schedule)}, got {unknown}")


def sigma_grid(
    schedule: str | Sequence[float] | torch.Tensor,
    num_steps: int | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    **options: Any,
) -> torch.Tensor:
    """The sampling grid (float64, decreasing) of a named schedule or a user's list of sigmas.

    Named (`SCHEDULES`): `num_steps` steps spanning [sigma_min, sigma_max] (default:
    `default_sigma_range`), then a final 0; `options` are the schedule's own (karras: rho;
    time_uniform / time_quadratic: sigma_to_t, t_to_sigma; vp: epsilon_s, beta_d, beta_min; iddpm:
    u; ays: model; gits: dataset, interpolate). A user grid is returned as given (a final 0 is not
    added) after checks: finite, strictly decreasing, positive but for the last, and inside
    [sigma_min, sigma_max] where those are given. Any violation is a ValueError naming `schedule`
    (or the option) before any work is done.
    """
    if isinstance(schedule, str):
        _check_schedule_name(schedule, options)
        check_num_steps(num_steps)
        ends = {key: value for key, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)) if value is not None}
        return GRIDS[schedule](num_steps, **ends, **options)
    if options:
        raise ValueError(f"a user schedule (a list of sigmas) takes no options, got {sorted(options)}")
    try:
        grid = torch.as_tensor(schedule, dtype=torch.float64).detach().cpu().flatten().clone()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a decreasing sequence of noise levels, got {schedule!r}") from error
    check_sigmas(grid, "schedule")
    if num_steps is not None and num_steps != len(grid) - 1:
        raise ValueError(f"num_steps={num_steps!r} does not match the user schedule's {len(grid) - 1} steps")
    check_sigmas_in_range(grid, sigma_min or 0.0, sigma_max or math.inf, "schedule")
    return grid


def discretization(name: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float = EDM_RHO) -> torch.Tensor:
    """`sigma_grid(name, ...)` with `rho` passed to "karras": the first API's entry point, whose
    ValueError names `discretization`."""
    if not (isinstance(name, str) and name in GRIDS):
        raise ValueError(f"discretization must be one of {SCHEDULES}, got {name!r}")
    return sigma_grid(name, num_steps, sigma_min, sigma_max, **({"rho": rho} if name == "karras" else {}))


def clamp_sigma_range(
    sigma_min: float, sigma_max: float, model_sigma_min: float, model_sigma_max: float
) -> tuple[float, float]:
    """Clamp a requested sampling range to the model's supported range (both ends)."""
    check_sigma_range(sigma_min, sigma_max)
    lo = min(max(sigma_min, model_sigma_min), model_sigma_max)
    hi = max(min(sigma_max, model_sigma_max), model_sigma_min)
    if not lo < hi:
        raise ValueError(
            f"the sampling range [sigma_min, sigma_max] = [{sigma_min}, {sigma_max}] does not overlap "
            f"the model's range [{model_sigma_min}, {model_sigma_max}]"
        )
    return lo, hi


# --- sigma(t) and s(t) families, for the paper's general ODE (eq. 4) ---------------------------


@dataclass(frozen=True)
class SigmaSchedule:
    """A noise schedule sigma(t) with its derivative and inverse."""

    name: str
    sigma: Callable[[torch.Tensor], torch.Tensor]
    sigma_deriv: Callable[[torch.Tensor], torch.Tensor]
    sigma_inv: Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Scaling:
    """A signal scaling s(t) with its derivative, expressed through the schedule's sigma(t)."""

    name: str
    s: Callable[[torch.Tensor, SigmaSchedule], torch.Tensor]
    s_deriv: Callable[[torch.Tensor, SigmaSchedule], torch.Tensor]


def vp_schedule(beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> SigmaSchedule:
    """sigma(t) = sigma_VP(t) for the given betas."""
    return SigmaSchedule(
        "vp",
        lambda t: vp_sigma(t, beta_d, beta_min),
        lambda t: vp_sigma_deriv(t, beta_d, beta_min),
        lambda s: vp_sigma_inv(s, beta_d, beta_min),
    )


VP_SCHEDULE = vp_schedule()
VE_SCHEDULE = SigmaSchedule("ve", lambda t: torch.sqrt(_f64(t)), lambda t: 0.5 / torch.sqrt(_f64(t)), lambda s: _f64(s) ** 2)
LINEAR_SCHEDULE = SigmaSchedule("linear", _f64, torch.ones_like, _f64)


def _vp_s(t: torch.Tensor, schedule: SigmaSchedule) -> torch.Tensor:
    return 1.0 / torch.sqrt(1.0 + schedule.sigma(t) ** 2)


def _vp_s_deriv(t: torch.Tensor, schedule: SigmaSchedule) -> torch.Tensor:
    sigma = schedule.sigma(t)
    return -sigma * schedule.sigma_deriv(t) * (1.0 + sigma**2) ** -1.5


VP_SCALING = Scaling("vp", _vp_s, _vp_s_deriv)
"""s(t) = 1 / sqrt(1 + sigma(t)^2), s'(t) = -sigma sigma' / (1 + sigma^2)^(3/2)."""
NO_SCALING = Scaling("none", lambda t, schedule: torch.ones_like(_f64(t)), lambda t, schedule: torch.zeros_like(_f64(t)))

SIGMA_SCHEDULES = {"vp": VP_SCHEDULE, "ve": VE_SCHEDULE, "linear": LINEAR_SCHEDULE}
SCALINGS = {"vp": VP_SCALING, "none": NO_SCALING}


# --- DDPM-style discrete models ----------------------------------------------------------------


def betas_from_config(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The betas a diffusers DDPM-family scheduler config describes, in float64.

    linear: linspace(beta_start, beta_end); scaled_linear: linspace(sqrt(beta_start),
    sqrt(beta_end))^2; squaredcos_cap_v2: beta_j = min(1 - abar((j+1)/M) / abar(j/M), 0.999)
    with abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2).
    """
    if trained_betas is not None:
        betas, name = _f64(trained_betas).flatten(), "trained_betas"
    else:
        check_num_steps(num_train_timesteps, "num_train_timesteps")
        betas, name = _betas_of_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule), "beta_start / beta_end"
    if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"{name} must give at least 2 betas, each in (0, 1)")
    return betas


def _betas_of_schedule(m: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, m, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, m, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return _f64([min(1.0 - alpha_bar((j + 1) / m) / alpha_bar(j / m), 0.999) for j in range(m)])
    raise ValueError(
        f"beta_schedule must be 'linear', 'scaled_linear' or 'squaredcos_cap_v2' (or give trained_betas), "
        f"got {beta_schedule!r}"
    )


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """abar_j = prod_{k <= j} (1 - beta_k)."""
    return torch.cumprod(1.0 - _f64(betas), dim=0)


def alphas_cumprod_to_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_j = sqrt((1 - abar_j) / abar_j): the EDM noise level of DDPM timestep j (increasing in j)."""
    abar = _f64(alphas_cumprod)
    return torch.sqrt((1.0 - abar) / abar)


def sigma_to_timestep(sigma: Number, train_sigmas: torch.Tensor, mode: str = "interpolate") -> torch.Tensor:
    """The DDPM timestep of noise level `sigma` for a model trained at `train_sigmas` (increasing).

    "interpolate": fractional timestep, linear in log sigma between the two neighbouring trained
    levels (clamped to [0, M-1]). "round": index of the nearest trained level (the iDDPM rule
    c_noise = M - 1 - argmin_j |u_j - sigma|, with timesteps counted upwards).
    """
    sigma = torch.as_tensor(sigma, dtype=train_sigmas.dtype, device=train_sigmas.device)
    if mode == "round":
        return torch.argmin(torch.abs(sigma.reshape(-1, 1) - train_sigmas), dim=1).reshape(sigma.shape).to(train_sigmas.dtype)
    if mode != "interpolate":
        raise ValueError(f"timestep_mapping must be 'interpolate' or 'round', got {mode!r}")
    log_train = torch.log(train_sigmas)
    log_sigma = torch.log(sigma).clamp(log_train[0], log_train[-1])
    high = torch.searchsorted(log_train, log_sigma.reshape(-1).contiguous()).clamp(1, len(log_train) - 1)
    low = high - 1
    frac = (log_sigma.reshape(-1) - log_train[low]) / (log_train[high] - log_train[low])
    return (low + frac).reshape(sigma.shape)


def timestep_to_sigma(timestep: Number, train_sigmas: torch.Tensor) -> torch.Tensor:
    """The noise level of a (possibly fractional) DDPM timestep: log-sigma interpolation of
    `train_sigmas`, the inverse of sigma_to_timestep(mode="interpolate")."""
    t = torch.as_tensor(timestep, dtype=train_sigmas.dtype, device=train_sigmas.device).clamp(0, len(train_sigmas) - 1)
    low = torch.floor(t).long().clamp(max=len(train_sigmas) - 2)
    frac = t - low
    log_train = torch.log(train_sigmas)
    return torch.exp((1 - frac) * log_train[low] + frac * log_train[low + 1])


def snap_sigma(sigma: Number, table: torch.Tensor) -> torch.Tensor:
    """The entry of `table` nearest to each sigma (round_sigma of discrete models)."""
    sigma_t = torch.as_tensor(sigma, dtype=table.dtype, device=table.device)
    index = torch.argmin(torch.abs(sigma_t.reshape(-1, 1) - table), dim=1)
    return table[index].reshape(sigma_t.shape)


# --- schedule files (written by `edm-sampling tune --schedule`, read by EDMScheduler) ---------

SCHEDULE_FILE_FORMAT = "edm_sampling.schedule/1"


@dataclass(frozen=True)
class ScheduleFile:
    """Searched sampling grids, one per step count, and how they were found (`meta`: solver,
    afs, model, ...). Each grid is decreasing and ends at 0."""

    grids: tuple[tuple[float, ...], ...]
    meta: dict

    def grid_for_steps(self, num_steps: int, name: str = "schedule_file") -> torch.Tensor:
        """The grid of `num_steps` steps; a ValueError naming `name` and the step counts held."""
        for grid in self.grids:
            if len(grid) - 1 == num_steps:
                return _f64(grid)
        from .safety.inputs import InvalidArgument

        held = sorted(len(g) - 1 for g in self.grids)
        raise InvalidArgument(name, f"holds grids of {held} steps, none of {num_steps} steps; "
                                    f"search one with `edm-sampling tune --schedule` or pick a step count it holds")


def schedule_file_json(grids: Sequence[Sequence[float]], **meta: Any) -> dict:
    """The JSON object of a schedule file: {"format", "grids": [[sigma_0, ..., 0], ...], **meta}.
    Every grid is checked as a sampling grid ending at 0."""
    checked = []
    for grid in grids:
        levels = _f64(list(grid)).flatten()
        check_sigmas(levels, "grids")
        if float(levels[-1]) != 0.0:
            raise ValueError(f"grids must end at sigma = 0, got {levels.tolist()}")
        checked.append([float(s) for s in levels])
    return {"format": SCHEDULE_FILE_FORMAT, **meta, "grids": checked}


def read_schedule_file(path: str, name: str = "schedule_file") -> ScheduleFile:
    """Read and check a schedule file; any problem is an `InvalidArgument` (a ValueError) naming
    `name` and the path."""
    import json
    from pathlib import Path

    from .safety.inputs import InvalidArgument

    if not isinstance(path, (str, Path)) or str(path) == "":
        raise InvalidArgument(name, f"must be the path of a schedule file, got {path!r}")
    file = Path(path)
    if not file.is_file():
        raise InvalidArgument(name, f"no such file {str(path)!r}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidArgument(name, f"{str(path)!r} is not a readable JSON file: {error}") from error
    if not isinstance(data, dict) or data.get("format") != SCHEDULE_FILE_FORMAT:
        raise InvalidArgument(name, f"{str(path)!r} is not an edm_sampling schedule file (format {SCHEDULE_FILE_FORMAT!r})")
    grids = data.get("grids")
    if not isinstance(grids, list) or not grids:
        raise InvalidArgument(name, f"{str(path)!r} holds no grids")
    try:
        checked = schedule_file_json(grids)["grids"]
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidArgument(name, f"{str(path)!r} holds a bad grid: {error}") from error
    meta = {k: v for k, v in data.items() if k not in ("format", "grids")}
    return ScheduleFile(tuple(tuple(g) for g in checked), meta)
