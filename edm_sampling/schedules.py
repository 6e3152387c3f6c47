"""Noise-level grids and noise schedules of the EDM paper (Karras et al. 2022, section 3 and
appendix C), plus the bridge from a DDPM-style beta schedule to sigmas.

Every grid is a float64 CPU tensor, decreasing, with a final 0 appended: N steps need N + 1
noise levels. Nothing here imports diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

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


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _step_fractions(num_steps: int) -> torch.Tensor:
    """i / (N - 1) for i < N; a single step uses fraction 0 (the grid is just sigma_max)."""
    if num_steps == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)


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
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    inv_rho = 1.0 / rho
    lo, hi = sigma_min**inv_rho, sigma_max**inv_rho
    sigmas = (hi + _step_fractions(num_steps) * (lo - hi)) ** rho
    sigmas[0] = sigma_max  # exact ends: S_tmin / S_tmax bounds are inclusive
    if num_steps > 1:
        sigmas[-1] = sigma_min
    return _append_zero(sigmas)


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


def vp_betas_for_range(sigma_min: float, sigma_max: float, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) with sigma_VP(epsilon_s) = sigma_min and sigma_VP(1) = sigma_max.

    From ln(sigma^2 + 1) = beta_d t^2 / 2 + beta_min t at t = 1 and t = epsilon_s.
    """
    a = math.log1p(sigma_max**2)
    b = math.log1p(sigma_min**2)
    beta_d = 2.0 * (b / epsilon_s - a) / (epsilon_s - 1.0)
    return beta_d, a - 0.5 * beta_d


def vp_sigmas(
    num_steps: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    epsilon_s: float = 1e-3,
    beta_d: float = VP_BETA_D,
    beta_min: float = VP_BETA_MIN,
) -> torch.Tensor:
    """The original VP discretization: t_i = 1 + i/(N-1) (epsilon_s - 1), sigma_i = sigma_VP(t_i).

    With a sigma range given, beta_d and beta_min are refitted so the grid spans exactly it
    (how the paper applies this discretization to other models in its ablations).
    """
    check_num_steps(num_steps)
    if not 0 < epsilon_s < 1:
        raise ValueError(f"epsilon_s must be in (0, 1), got {epsilon_s!r}")
    if (sigma_min is None) != (sigma_max is None):
        raise ValueError("sigma_min and sigma_max must be given together for vp_sigmas")
    if sigma_min is not None:
        check_sigma_range(sigma_min, sigma_max)
        beta_d, beta_min = vp_betas_for_range(sigma_min, sigma_max, epsilon_s)
    t = 1.0 + _step_fractions(num_steps) * (epsilon_s - 1.0)
    return _append_zero(vp_sigma(t, beta_d, beta_min))


# --- VE (Song et al.), the variance-exploding SDE --------------------------------------------


def ve_sigmas(num_steps: int, sigma_min: float = 0.02, sigma_max: float = 100.0) -> torch.Tensor:
    """The original VE discretization: sigma_i^2 = sigma_max^2 (sigma_min^2 / sigma_max^2)^(i/(N-1)),
    a geometric sequence."""
    check_num_steps(num_steps)
    check_sigma_range(sigma_min, sigma_max)
    log_sigmas = math.log(sigma_max) + _step_fractions(num_steps) * (math.log(sigma_min) - math.log(sigma_max))
    return _append_zero(torch.exp(log_sigmas))


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
    sigma_max: float = 81.0,
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


def _karras_discretization(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    return karras_sigmas(num_steps, sigma_min, sigma_max, rho)


def _vp_discretization(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    return vp_sigmas(num_steps, sigma_min, sigma_max)


def _ve_discretization(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    return ve_sigmas(num_steps, sigma_min, sigma_max)


def _iddpm_discretization(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    return iddpm_sigmas(num_steps, sigma_min, sigma_max)


DISCRETIZATIONS: dict[str, Callable[[int, float, float, float], torch.Tensor]] = {
    "karras": _karras_discretization,
    "vp": _vp_discretization,
    "ve": _ve_discretization,
    "iddpm": _iddpm_discretization,
}
"""Name -> grid(num_steps, sigma_min, sigma_max, rho); rho is used by "karras" only."""


def discretization(name: str, num_steps: int, sigma_min: float, sigma_max: float, rho: float = EDM_RHO) -> torch.Tensor:
    """The named grid of DISCRETIZATIONS, with a ValueError listing the names for an unknown one."""
    if name not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {sorted(DISCRETIZATIONS)}, got {name!r}")
    return DISCRETIZATIONS[name](num_steps, sigma_min, sigma_max, rho)


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
