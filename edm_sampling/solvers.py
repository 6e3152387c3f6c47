"""Every solver once, as a plan: per model call, the new state is a linear combination of stored
states X and denoiser outputs D, with coefficients computed from the sigma grid once.

The state lives in EDM space (sigma(t) = t, s(t) = 1), where the probability-flow ODE is
dx/dsigma = (x - D(x; sigma)) / sigma. A solver is one pure function from a grid to a
`SolverPlan`; `samplers.execute_plan` (and the diffusers scheduler, one `step` per model call)
executes plans, so no update rule exists twice. Each update is written once below as a scalar
formula (Algorithm 1's `euler_step` / `heun_step`, the Adams-Bashforth sum over `ode_slope`,
DPM-Solver++'s and UniPC's exponential-integrator updates); its coefficients are read off that
formula with unit inputs (`linear_coefficients`), in float64, at set-up.

Solvers (`SOLVERS`): euler, heun (Karras et al. 2022, Algorithms 1 and 2, alpha-generalized),
ipndm / ipndm_v (Zhang & Chen 2023; Zhou et al. 2024), dpmpp_2m / dpmpp_3m (Lu et al. 2022,
DPM-Solver++), unipc (Zhao et al. 2023, bh2), deis (Zhang & Chen 2023, tAB), and ours,
adams_alpha (Adams in the signal fraction alpha) and adams_alpha_adaptive. Churn applies to
euler and heun; the analytical first step (`afs`, Dockhorn et al. 2022 / Zhou et al. 2024: D = 0,
the data mean, at sigma_max instead of a model call) to every one-call-per-step solver but the
adams_alpha ones.

One exception to fixed coefficients: adams_alpha_adaptive fits its interpolation scale to each
sample's own model outputs at every call (`interpolation_scale`), so its steps carry `adapt`, a
function from the outputs' Gram matrices to per-sample coefficients, which both executors call
(`Step.adapt`); everything else about the plan (look-back, scales, parity) is shared.

Pure noise (sigma_0 = inf, where flow-matching pipelines start, t = 1): x_edm / sigma -> n as
sigma -> inf, so a state at sigma = inf is held as x / sigma, the noise itself (X[0] = latents,
init_std = 1), and D is called there on it (`denoisers.Denoiser.infinite_sigma`). The
exponential integrators carry it exactly: their state term (sigma_next / sigma) x becomes
sigma_next n (`exponential_decay`) and h = inf reduces every order to the first-order step
x_1 = sigma_1 n + D_0, which is also Euler's limit. In u = 1 / sigma the ODE reads
d(x / sigma) / du = D, regular at u = 0: UniPC's corrector of x_1 takes its h = inf limit,
x_1 = sigma_1 n + (D_0 + D_1) / 2, the trapezoidal rule in u, and the second-order step after
the start takes D's lambda-slope at lambda_1 from D linear in u (`noise_start_update`). No other
step reaches back to lambda = -inf (the warm start counts from the first finite level). Heun,
iPNDM and DEIS step in sigma (or t) and cannot start there (`SolverInfo.infinite_start`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .safety.inputs import check_kinds
from .schedules import EDM_RHO, TimeMap, check_sigmas, sigma_grid, vp_time_maps

MAX_GAMMA = math.sqrt(2.0) - 1.0
LOWER_ORDER_FINAL_BELOW = 15
"""DPM-Solver++ / UniPC lower the order of the last steps on grids of fewer steps than this
(DPM-Solver++, Lu et al. 2022: it stabilizes sampling with < 15 steps, especially <= 10)."""
GAUSS_LEGENDRE_32 = np.polynomial.legendre.leggauss(32)
"""Nodes and weights of 32-point Gauss-Legendre quadrature on [-1, 1] (DEIS's and adams_alpha's integrals)."""


# --- step rules (Algorithm 1) -----------------------------------------------------------------


def ode_slope(x: Any, denoised: Any, sigma: Any) -> Any:
    """dx/dsigma of the probability-flow ODE with sigma(t) = t, s(t) = 1: (x - D(x; sigma)) / sigma."""
    return (x - denoised) / sigma


def euler_step(x: Any, slope: Any, sigma: Any, sigma_next: Any) -> Any:
    """One Euler step: x + (sigma_next - sigma) slope. Also used in t for the general ODE."""
    return x + (sigma_next - sigma) * slope


def heun_step(x: Any, slope: Any, slope_next: Any, sigma: Any, sigma_next: Any, alpha: float = 1.0) -> Any:
    """The generalized second-order step: x + h ((1 - 1/(2 alpha)) slope + 1/(2 alpha) slope_next),
    h = sigma_next - sigma, with slope_next evaluated at sigma + alpha h; alpha = 1 is Heun's
    trapezoidal rule x + h (slope + slope_next) / 2."""
    weight = 1.0 / (2.0 * alpha)
    return x + (sigma_next - sigma) * ((1.0 - weight) * slope + weight * slope_next)


# --- churn (Algorithm 2) ------------------------------------------------------------------------


def check_churn(s_churn: float, s_tmin: float, s_tmax: float, s_noise: float, solver: str | None = None) -> None:
    """Raise a ValueError naming the parameter for churn settings outside their range, or for
    s_churn > 0 with a ``solver`` that takes no churn."""
    check_kinds(s_churn=(s_churn, "real"), s_tmin=(s_tmin, "real"), s_tmax=(s_tmax, "real"), s_noise=(s_noise, "real"))
    if not (math.isfinite(s_churn) and s_churn >= 0):
        raise ValueError(f"s_churn must be a finite number >= 0, got {s_churn!r}")
    if not s_tmin >= 0:
        raise ValueError(f"s_tmin must be >= 0, got {s_tmin!r}")
    if not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax must be >= s_tmin={s_tmin!r}, got {s_tmax!r}")
    if not (math.isfinite(s_noise) and s_noise > 0):
        raise ValueError(f"s_noise must be a finite number > 0, got {s_noise!r}")
    if solver is not None and s_churn > 0 and not solver_info(solver).churn:
        raise ValueError(f"s_churn applies to the solvers {[n for n, i in SOLVERS.items() if i.churn]} only; "
                         f"solver {solver!r} needs s_churn=0, got {s_churn!r}")


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
    Algorithm 2's first step exactly in distribution, with one noise draw. From sigma_0 = inf
    (pure noise) it is 1: the state there is held as x / sigma, the noise itself."""
    if sigma_0 == math.inf:
        return 1.0
    return math.sqrt(sigma_0**2 + churn_noise_std(sigma_0, sigma_hat_0, s_noise) ** 2)


# --- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Combination:
    """new = sum_k states[k] X[-1-k] + sum_j denoised[j] D[-1-j] + noise_std eps, eps ~ N(0, I).
    A coefficient is a float, or in a data-adaptive step (`Step.adapt`) an array with one entry
    per sample."""

    states: tuple[float | np.ndarray, ...]
    denoised: tuple[float | np.ndarray, ...] = ()
    noise_std: float = 0.0


@dataclass(frozen=True)
class Step:
    """One entry per model call (or per skipped call): evaluate D(X[-1]; sigma) and append it to D
    (sigma None: no call, append a zero D estimate: the analytical first step), then append each
    update's result to X in order (a later update sees the earlier one as X[-1])."""

    sigma: float | None  # where the model is called (sigma_hat under churn)
    level: float  # the grid level this call belongs to (before churn)
    index: int  # the grid step i
    updates: tuple[Combination, ...]
    adapt: Callable[[np.ndarray], tuple[Combination, ...]] | None = None
    """A data-adaptive step (adams_alpha_adaptive): the executor hands it the Gram matrices of each
    sample's last ADAPTIVE_LOOKBACK model outputs (`motion_gram`, newest first) and uses its
    result instead of `updates`: Combinations whose coefficients are float64 arrays, one entry per
    sample (`updates` holds the same terms at the default scale, so the same look-back)."""


ADAPTIVE_LOOKBACK = 3
"""D outputs a data-adaptive step reads (D_i, D_{i-1}, D_{i-2})."""


@dataclass(frozen=True)
class SolverPlan:
    """A solver on one grid. X[0] = init_std * latents; the sample is the last X. A grid that
    starts at sigma = inf holds X[0] as x / sigma: init_std = 1, X[0] the noise itself.

    `sigma_hats[i]` is where grid step i starts (sigma_hat_i under churn, else sigma_i); `nfe`
    counts the steps that call the model; `state_history` / `denoised_history` are the deepest
    look-back into X / D of any update, so an executor keeps only that window."""

    solver: str
    sigmas: tuple[float, ...]
    init_std: float
    steps: tuple[Step, ...]
    sigma_hats: tuple[float, ...]
    nfe: int = field(init=False)
    state_history: int = field(init=False)
    denoised_history: int = field(init=False)

    def __post_init__(self) -> None:
        updates = [u for step in self.steps for u in step.updates]
        object.__setattr__(self, "nfe", sum(step.sigma is not None for step in self.steps))
        object.__setattr__(self, "state_history", max([1] + [len(u.states) for u in updates]))
        adaptive = [ADAPTIVE_LOOKBACK for step in self.steps if step.adapt is not None]
        object.__setattr__(self, "denoised_history", max([1] + [len(u.denoised) for u in updates] + adaptive))


def linear_coefficients(fn: Callable[..., float], num_inputs: int) -> tuple[float, ...]:
    """Coefficients of a linear map of `num_inputs` scalars, read off unit inputs."""
    return tuple(float(fn(*[1.0 if j == k else 0.0 for j in range(num_inputs)])) for k in range(num_inputs))


def _combination(fn: Callable[..., float], num_states: int, num_denoised: int, noise_std: float = 0.0) -> Combination:
    """The Combination of fn(X[-1], ..., X[-num_states], D[-1], ..., D[-num_denoised]), a linear
    formula; trailing zero coefficients are dropped so the look-back stays minimal."""
    coefficients = linear_coefficients(fn, num_states + num_denoised)

    def trimmed(values: tuple[float, ...]) -> tuple[float, ...]:
        end = len(values)
        while end > 0 and values[end - 1] == 0.0:
            end -= 1
        return values[:end]

    return Combination(trimmed(coefficients[:num_states]), trimmed(coefficients[num_states:]), noise_std)


def _levels(sigmas: Sequence[float] | torch.Tensor, solver: str) -> tuple[float, ...]:
    """The checked grid of `solver`; it may start at sigma = inf if the solver can start there."""
    grid = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().flatten()
    if grid.numel() > 0 and float(grid[0]) == math.inf:
        check_infinite_start(solver)
        check_sigmas(grid, infinite_start=True)
    else:
        check_sigmas(grid)
    return tuple(grid.tolist())


def check_infinite_start(solver: str) -> None:
    """A ValueError unless `solver` can start at sigma = inf (pure noise)."""
    if not solver_info(solver).infinite_start:
        able = [name for name, info in SOLVERS.items() if info.infinite_start]
        raise ValueError(f"sigmas start at inf (pure noise), where solver {solver!r} cannot start (it steps in sigma); "
                         f"start it at a finite sigma_max, or use one of the solvers {able}")


def _check_afs(afs: bool, levels: tuple[float, ...]) -> None:
    if not isinstance(afs, bool):
        raise ValueError(f"afs must be True or False, got {afs!r}")
    if afs and len(levels) < 3:
        raise ValueError("afs=True needs a grid of at least 2 steps: its first step makes no model call")


def _check_order(order: int, highest: int, solver: str) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= highest:
        raise ValueError(f"order must be an integer in [1, {highest}] for solver {solver!r}, got {order!r}")


def _check_lower_order_final(lower_order_final: bool) -> None:
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"lower_order_final must be True or False, got {lower_order_final!r}")


def _step_orders(num_steps: int, order: int, lower_order_final: bool, infinite_start: bool = False) -> list[int]:
    """Order of each multistep step: warm start min(order, i + 1), from sigma = inf min(order, i)
    after the first step (the call at lambda = -inf is no point of a Taylor expansion in lambda);
    with lower_order_final on grids of fewer than LOWER_ORDER_FINAL_BELOW steps also at most
    N - i (the last step first order)."""
    orders = [max(1, min(order, i if infinite_start else i + 1)) for i in range(num_steps)]
    if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
        orders = [min(o, num_steps - i) for i, o in enumerate(orders)]
    return orders


def _multistep_plan(
    solver: str, levels: tuple[float, ...], afs: bool, update: Callable[[int], tuple[Combination, ...]],
    adapt: Callable[[int], Callable[[np.ndarray], tuple[Combination, ...]] | None] = lambda i: None,
) -> SolverPlan:
    """One Step per grid step i, at sigma_i (None for step 0 under afs), with update(i)'s results
    and adapt(i) (`Step.adapt`; None: a fixed step)."""
    steps = tuple(
        Step(None if afs and i == 0 else levels[i], levels[i], i, update(i), adapt(i)) for i in range(len(levels) - 1)
    )
    return SolverPlan(solver, levels, initial_noise_std(levels[0], levels[0]), steps, levels[:-1])


# --- Euler and Heun (Algorithms 1 and 2) -----------------------------------------------------------


def _churned(levels: tuple[float, ...], hats: Sequence[float] | None, s_noise: float) -> tuple[tuple[float, ...], list[float]]:
    """sigma_hat_i (levels[:-1] without churn) and the churn noise std added at the end of step
    i, lifting sigma_{i+1} to sigma_hat_{i+1} (0 after the last step)."""
    hats = tuple(float(h) for h in hats) if hats is not None else levels[:-1]
    if len(hats) != len(levels) - 1 or any(not (h >= s) for h, s in zip(hats, levels)):
        raise ValueError("sigma_hats must hold one level per step, each >= its grid level")
    if not (math.isfinite(s_noise) and s_noise > 0):
        raise ValueError(f"s_noise must be a finite number > 0, got {s_noise!r}")
    after = [churn_noise_std(levels[i + 1], hats[i + 1], s_noise) for i in range(len(hats) - 1)] + [0.0]
    return hats, after


def _euler_update(sigma: float, sigma_next: float, noise_std: float = 0.0) -> Combination:
    """x_next = euler_step(x, ode_slope(x, D, sigma), sigma, sigma_next); from sigma = inf its
    limit, the first-order exponential step it equals (`dpmpp_update`: sigma_next n + D)."""
    if sigma == math.inf:
        return _combination(lambda x, d: dpmpp_update(x, (d,), (sigma,), sigma_next), 1, 1, noise_std)
    return _combination(lambda x, d: euler_step(x, ode_slope(x, d, sigma), sigma, sigma_next), 1, 1, noise_std)


def euler_plan(
    sigmas: Sequence[float] | torch.Tensor,
    *,
    sigma_hats: Sequence[float] | None = None,
    s_noise: float = 1.0,
    afs: bool = False,
) -> SolverPlan:
    """Euler (DDIM in EDM space; N calls for N steps), with churn when `sigma_hats` raise the
    levels (Algorithm 2's noise, Euler steps from (x_hat_i, sigma_hat_i))."""
    levels = _levels(sigmas, "euler")
    _check_afs(afs, levels)
    hats, after = _churned(levels, sigma_hats, s_noise)
    steps = tuple(
        Step(None if afs and i == 0 else hats[i], levels[i], i, (_euler_update(hats[i], levels[i + 1], after[i]),))
        for i in range(len(hats))
    )
    return SolverPlan("euler", levels, initial_noise_std(levels[0], hats[0], s_noise), steps, hats)


def heun_plan(
    sigmas: Sequence[float] | torch.Tensor,
    *,
    alpha: float = 1.0,
    sigma_hats: Sequence[float] | None = None,
    s_noise: float = 1.0,
) -> SolverPlan:
    """Algorithm 1 (and 2 with `sigma_hats`): per step an Euler predictor to sigma_hat + alpha h
    and the generalized second-order corrector back from x_hat (two Steps, the second reaching X[-2]);
    a step to sigma = 0 is a plain Euler step. 2N - 1 calls for N steps ending at 0."""
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    levels = _levels(sigmas, "heun")
    hats, after = _churned(levels, sigma_hats, s_noise)
    steps: list[Step] = []
    for i, (sigma, sigma_next) in enumerate(zip(hats, levels[1:])):
        if sigma_next == 0:
            steps.append(Step(sigma, levels[i], i, (_euler_update(sigma, sigma_next, after[i]),)))
            continue
        sigma_mid = sigma + alpha * (sigma_next - sigma)

        def corrector(x_mid: float, x: float, d_mid: float, d: float, sigma=sigma, sigma_next=sigma_next, sigma_mid=sigma_mid) -> float:
            return heun_step(x, ode_slope(x, d, sigma), ode_slope(x_mid, d_mid, sigma_mid), sigma, sigma_next, alpha)

        steps.append(Step(sigma, levels[i], i, (_euler_update(sigma, sigma_mid),)))
        steps.append(Step(sigma_mid, sigma_next, i, (_combination(corrector, 2, 2, after[i]),)))
    return SolverPlan("heun", levels, initial_noise_std(levels[0], hats[0], s_noise), tuple(steps), hats)


# --- Adams-Bashforth on the slope d = (x - D) / sigma: iPNDM, iPNDM_v, DEIS ------------------------

IPNDM_WEIGHTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}
"""The fixed Adams-Bashforth weights of orders 1..4 (equal steps), newest slope first."""


def _slope_update(weights: Sequence[float], sigmas: Sequence[float]) -> Combination:
    """x_{i+1} = x_i + sum_k weights[k] d_{i-k}, d_j = ode_slope(x_j, D_j, sigma_j), where
    sigmas[k] = sigma_{i-k} and X[-1-k] = x_{i-k}."""
    n = len(weights)

    def update(*values: float) -> float:
        xs, ds = values[:n], values[n:]
        return xs[0] + sum(w * ode_slope(x, d, s) for w, x, d, s in zip(weights, xs, ds, sigmas))

    return _combination(update, n, n)


def _lagrange_integrals(nodes: Sequence[float], a: float, b: float, tau: Callable[[np.ndarray], np.ndarray]) -> list[float]:
    """c_k = integral over sigma from a to b of L_k(tau(sigma)), L_k the Lagrange basis polynomial
    on the points tau(nodes[k]): the weights of a variable-step Adams-Bashforth rule that
    interpolates the slope as a polynomial in tau. 32-point Gauss-Legendre in sigma (exact for
    tau = sigma, orders <= 4; near machine precision for a smooth tau)."""
    points, weights = GAUSS_LEGENDRE_32
    sigma = 0.5 * (b - a) * points + 0.5 * (b + a)
    t, t_nodes = tau(sigma), tau(np.asarray(nodes, dtype=np.float64))
    integrals = []
    for k in range(len(nodes)):
        basis = np.ones_like(t)
        for j in range(len(nodes)):
            if j != k:
                basis *= (t - t_nodes[j]) / (t_nodes[k] - t_nodes[j])
        integrals.append(float(0.5 * (b - a) * np.dot(weights, basis)))
    return integrals


def ipndm_plan(
    sigmas: Sequence[float] | torch.Tensor, *, order: int = 3, afs: bool = False, final_step: str = "extrapolate"
) -> SolverPlan:
    """iPNDM: x_{i+1} = x_i + h_i sum_k w_k d_{i-k} with the fixed AB weights of order
    min(order, i + 1) (warm start, no order drop at the end); h_i = sigma_{i+1} - sigma_i.
    Exact AB only on equal steps, so formally first order on other grids. The step to sigma = 0
    is `final_denoised` (final_step "extrapolate" or "denoise"), or the AB step ("published")."""
    levels = _levels(sigmas, "ipndm")
    _check_order(order, 4, "ipndm")
    _check_afs(afs, levels)
    _check_final_step(final_step)

    def update(i: int) -> tuple[Combination, ...]:
        if levels[i + 1] == 0 and final_step != "published":
            return (_final_update(levels, i, afs, final_step),)
        h = levels[i + 1] - levels[i]
        weights = IPNDM_WEIGHTS[min(order, i + 1)]
        return (_slope_update([h * w for w in weights], levels[i::-1][: len(weights)]),)

    return _multistep_plan("ipndm", levels, afs, update)


def _variable_ab_plan(
    solver: str, levels: tuple[float, ...], order: int, afs: bool, tau: Callable, final_step: str
) -> SolverPlan:
    _check_final_step(final_step)

    def update(i: int) -> tuple[Combination, ...]:
        if levels[i + 1] == 0 and final_step != "published":
            return (_final_update(levels, i, afs, final_step),)
        nodes = levels[i::-1][: min(order, i + 1)]
        return (_slope_update(_lagrange_integrals(nodes, levels[i], levels[i + 1], tau), nodes),)

    return _multistep_plan(solver, levels, afs, update)


def ipndm_v_plan(
    sigmas: Sequence[float] | torch.Tensor, *, order: int = 4, afs: bool = False, final_step: str = "extrapolate"
) -> SolverPlan:
    """iPNDM with variable-step AB coefficients: the slope interpolated as a polynomial in sigma
    through the last min(order, i + 1) points and integrated exactly over [sigma_i, sigma_{i+1}]
    (DEIS's rhoAB); order `order` on any grid. The step to sigma = 0 as in `ipndm_plan`."""
    levels = _levels(sigmas, "ipndm_v")
    _check_order(order, 4, "ipndm_v")
    _check_afs(afs, levels)
    return _variable_ab_plan("ipndm_v", levels, order, afs, lambda sigma: sigma, final_step)


def deis_plan(
    sigmas: Sequence[float] | torch.Tensor, *, order: int = 3, afs: bool = False, sigma_to_t: TimeMap | None = None,
    final_step: str = "extrapolate",
) -> SolverPlan:
    """tAB-DEIS: in EDM space the exponential integrator of the eps-parameterized ODE is
    x_{i+1} = x_i + integral of d over sigma, with d interpolated as a polynomial in the model's
    time t(sigma) (default: the continuous VP t) through the last min(order, i + 1) points; the
    weights come from quadrature at set-up. The step to sigma = 0 as in `ipndm_plan`."""
    levels = _levels(sigmas, "deis")
    _check_order(order, 4, "deis")
    _check_afs(afs, levels)
    to_t = sigma_to_t or vp_time_maps()[0]

    def tau(sigma: np.ndarray) -> np.ndarray:
        return np.asarray(to_t(torch.as_tensor(sigma, dtype=torch.float64)), dtype=np.float64)

    return _variable_ab_plan("deis", levels, order, afs, tau, final_step)


# --- the step to sigma = 0 ---------------------------------------------------------------------------

FINAL_STEPS = ("extrapolate", "denoise", "published")
"""The step to sigma = 0: D extrapolated to sigma = 0 (`final_denoised`, the default of every
multistep solver), x = D at the last call, or the solver's own published update (DPM-Solver++ and
UniPC: x = D, the same as "denoise"; iPNDM, iPNDM-v and DEIS: their Adams-Bashforth step to 0,
which does not land on the data where the data are concentrated: on the ideal denoiser of the
digits, 0.25 median RMSE at NFE 5 where x = D is exact)."""


def final_denoised(denoised: Sequence[float], sigmas: Sequence[float]) -> float:
    """The sample at sigma = 0 from the last model calls, D at sigmas[k] = sigma_{i-k}.

    One D: x = D_i, every data-prediction solver's final step (h = inf reduces each order to
    it). Two: Richardson extrapolation of the denoised trajectory in sigma^2,

        x = D_i + sigma_i^2 / (sigma_{i-1}^2 - sigma_i^2) (D_i - D_{i-1}).

    Why: along a probability-flow trajectory of a smooth data density, dx/dsigma =
    -sigma grad log p_sigma(x), so x(sigma) = x(0) + O(sigma^2), and D = x + sigma^2 grad log
    p_sigma(x) = x(0) + O(sigma^2). So x = D_i leaves an O(sigma_min^2) error that no number of
    steps removes (a discrete model cannot be called below its smallest trained sigma), and the
    extrapolation cancels that term. Where the data are concentrated far below sigma (point
    masses, the ideal denoiser of a finite dataset), D is constant along the trajectory and the
    extrapolation leaves it unchanged."""
    if len(denoised) == 1:
        return denoised[0]
    weight = sigmas[0] ** 2 / (sigmas[1] ** 2 - sigmas[0] ** 2)
    return denoised[0] + weight * (denoised[0] - denoised[1])


def _check_final_step(final_step: str) -> None:
    if final_step not in FINAL_STEPS:
        raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")


def _final_update(levels: tuple[float, ...], i: int, afs: bool, final_step: str) -> Combination:
    """The update of step i to sigma = 0: `final_denoised` of D_i alone ("denoise", and where
    there is no earlier model call: the first step, or the step after an analytical first step)
    or of D_i and D_{i-1} ("extrapolate")."""
    n = 2 if final_step == "extrapolate" and i >= (2 if afs else 1) and levels[i - 1] < math.inf else 1
    history = levels[i::-1][:n]
    return _combination(lambda x, *d: final_denoised(d, history), 1, n)


# --- DPM-Solver++ multistep (data prediction, lambda = -log sigma) ----------------------------------


def noise_start_update(x: float, denoised: Sequence[float], sigmas: Sequence[float], sigma_next: float) -> float:
    """The step after a start at sigma = inf, from x at sigmas[0] = sigma_1 to sigma_next, with
    D_1 = denoised[0] and D_0 = denoised[1], the call at sigma = inf (sigmas[1]).

    lambda_0 = -inf is no point of a Taylor expansion in lambda, but u = 1 / sigma = e^lambda is
    regular there (in y = x / sigma the ODE is dy/du = D): with D linear in u on [0, u_1],
    dD/dlambda = u dD/du = D_1 - D_0 at lambda_1. DPM-Solver++(2M)'s second-order step with that
    slope is `dpmpp_update` with D_0 placed one unit of lambda before lambda_1 (at e sigma_1):
    x_2 = r x_1 - phi_1 D_1 - phi_1 h (D_1 - D_0) / 2."""
    return dpmpp_update(x, denoised, (sigmas[0], math.e * sigmas[0]), sigma_next)


def _noise_start_step(levels: tuple[float, ...], i: int, order: int) -> Combination | None:
    """`noise_start_update`'s Combination where step i (of `order` if the call at sigma = inf counted
    as history) is the step after a start at sigma = inf and not to sigma = 0; else None."""
    if not (i == 1 and levels[0] == math.inf and order >= 2 and levels[2] > 0):
        return None
    return _combination(lambda x, *d: noise_start_update(x, d, levels[1::-1], levels[2]), 1, 2)


def exponential_decay(x: float, sigma: float, sigma_next: float) -> float:
    """(sigma_next / sigma) x, the state term of the exact ODE solution from sigma to sigma_next
    (x_next = r x + sigma_next * integral of e^lambda D). From sigma = inf, where the state is held
    as x / sigma (the noise), it is sigma_next x."""
    return sigma_next * x if sigma == math.inf else (sigma_next / sigma) * x


def dpmpp_update(x: float, denoised: Sequence[float], sigmas: Sequence[float], sigma_next: float) -> float:
    """DPM-Solver++ multistep of order len(denoised) (1..3) from x at sigmas[0] to sigma_next, with
    D at sigmas[k] = sigma_{i-k}. In EDM space (alpha = 1, lambda = -log sigma) the exact solution
    is x_next = r x + sigma_next * integral of e^lambda D(lambda), r = sigma_next / sigma_i; with
    D Taylor-expanded in lambda around lambda_i (Lu et al. 2022, DPM-Solver++ eq. 9 / appendix),
    h = log(sigma_i / sigma_next), phi_1 = e^-h - 1, phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2:

        x_next = r x - phi_1 D_i + phi_2 (h D') - phi_3 (h^2 D'')

    order 1 (DDIM) keeps the first two terms. 2M is the paper's Algorithm 2: h D' estimated by
    (D_i - D_{i-1}) / r_0 and phi_2 replaced by -phi_1 / 2 (equal to O(h^2): second order, exact
    for constant D), r_k = (lambda_{i-k} - lambda_{i-k-1}) / h. 3M estimates h D' and h^2 D'' by
    divided differences over three points and is exact for D quadratic in lambda. Note: diffusers'
    and k-diffusion's 3M use half this h^2 D'' estimate, which leaves their update exact for
    linear D only, i.e. second order (measured in tests/test_solvers.py)."""
    if sigma_next == 0:
        return denoised[0]  # h = inf: every order reduces to x = D_i
    h = math.log(sigmas[0] / sigma_next)
    phi_1 = math.expm1(-h)
    result = exponential_decay(x, sigmas[0], sigma_next) - phi_1 * denoised[0]
    if len(denoised) == 1:
        return result
    r0 = math.log(sigmas[1] / sigmas[0]) / h
    d1_0 = (denoised[0] - denoised[1]) / r0
    if len(denoised) == 2:
        return result - 0.5 * phi_1 * d1_0
    r1 = math.log(sigmas[2] / sigmas[1]) / h
    d1_1 = (denoised[1] - denoised[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)  # h D' + O(h^3)
    d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)  # h^2 D'' + O(h^3)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return result + phi_2 * d1 - phi_3 * d2


def _dpmpp_plan(
    solver: str, sigmas: Sequence[float] | torch.Tensor, order: int, afs: bool, lower_order_final: bool, final_step: str
) -> SolverPlan:
    levels = _levels(sigmas, solver)
    _check_afs(afs, levels)
    _check_lower_order_final(lower_order_final)
    _check_final_step(final_step)
    orders = _step_orders(len(levels) - 1, order, lower_order_final, levels[0] == math.inf)
    counting_noise = _step_orders(len(levels) - 1, order, lower_order_final)

    def update(i: int) -> tuple[Combination, ...]:
        if levels[i + 1] == 0:
            return (_final_update(levels, i, afs, final_step),)
        after_noise = _noise_start_step(levels, i, counting_noise[i])
        if after_noise is not None:
            return (after_noise,)
        n = orders[i]
        history = levels[i::-1][:n]
        return (_combination(lambda x, *d: dpmpp_update(x, d, history, levels[i + 1]), 1, n),)

    return _multistep_plan(solver, levels, afs, update)


def dpmpp_2m_plan(
    sigmas: Sequence[float] | torch.Tensor, *, afs: bool = False, lower_order_final: bool = True,
    final_step: str = "extrapolate",
) -> SolverPlan:
    """DPM-Solver++(2M): second order, first order on the first step and (lower_order_final,
    fewer than 15 steps) on the last step; a step to sigma = 0 is `final_denoised` (x = D_i
    with final_step "denoise", the paper's; D extrapolated to sigma = 0 with "extrapolate")."""
    return _dpmpp_plan("dpmpp_2m", sigmas, 2, afs, lower_order_final, final_step)


def dpmpp_3m_plan(
    sigmas: Sequence[float] | torch.Tensor, *, afs: bool = False, lower_order_final: bool = True,
    final_step: str = "extrapolate",
) -> SolverPlan:
    """DPM-Solver++(3M): third order after a two-step warm start; lower_order_final on fewer than
    15 steps makes the last two steps orders 2 and 1; a step to sigma = 0 is `final_denoised`."""
    return _dpmpp_plan("dpmpp_3m", sigmas, 3, afs, lower_order_final, final_step)


# --- UniPC (bh2 / bh1), data prediction ------------------------------------------------------------

UNIPC_VARIANTS = ("bh1", "bh2")


def _unipc_terms(h: float, rks: Sequence[float], variant: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    """phi_1 = e^-h - 1, B(h) (bh1: -h, bh2: e^-h - 1), and the order conditions R rho = b of UniPC
    (Zhao et al. 2023, eq. 8 / Algorithm): R[j][k] = r_k^j, b_j = j! phi_{j+1}(-h) / B(h), where
    phi_{j+1} follows phi_{k+1} = phi_k / hh - 1/k!, hh = -h."""
    hh = -h
    phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else phi_1
    phi_k, factorial = phi_1 / hh - 1.0, 1.0
    rows, b = [], []
    for j in range(1, len(rks) + 1):
        rows.append([rk ** (j - 1) for rk in rks])
        b.append(phi_k * factorial / b_h)
        factorial *= j + 1
        phi_k = phi_k / hh - 1.0 / factorial
    return phi_1, b_h, np.array(rows), np.array(b)


def unipc_update(
    x: float, denoised: Sequence[float], sigmas: Sequence[float], sigma_next: float, variant: str = "bh2", denoised_next: float | None = None
) -> float:
    """UniP (predictor, `denoised_next` None) or UniC (corrector, given D at the predicted
    x_next) of order p = len(denoised) from x at sigmas[0] to sigma_next, D at sigmas[k] =
    sigma_{i-k}, in EDM space:
    x_next = r x - phi_1 D_i - B(h) sum_k rho_k (D_{i-k} - D_i) / r_k,
    r_k = (lambda_{i-k} - lambda_i) / h, with rho solving the first p - 1 order conditions for
    UniP (rho = 1/2 at p = 2) and all p, with r = 1 for D_next, for UniC (rho = 1/2 at p = 1)."""
    if sigma_next == 0:
        return denoised[0]  # h = inf: first order, x = D_i
    p = len(denoised)
    h = math.log(sigmas[0] / sigma_next)
    rks = [math.log(sigmas[0] / sigmas[k]) / h for k in range(1, p)] + [1.0]
    differences = [(denoised[k] - denoised[0]) / rks[k - 1] for k in range(1, p)]
    phi_1, b_h, rows, b = _unipc_terms(h, rks, variant)
    result = exponential_decay(x, sigmas[0], sigma_next) - phi_1 * denoised[0]
    if denoised_next is None:
        if p == 1:
            return result
        rhos = [0.5] if p == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1]).tolist()
        return result - b_h * sum(rho * dk for rho, dk in zip(rhos, differences))
    rhos = [0.5] if p == 1 else np.linalg.solve(rows, b).tolist()
    correction = sum(rho * dk for rho, dk in zip(rhos[:-1], differences)) + rhos[-1] * (denoised_next - denoised[0])
    return result - b_h * correction


def unipc_plan(
    sigmas: Sequence[float] | torch.Tensor,
    *,
    order: int = 2,
    afs: bool = False,
    corrector: bool = True,
    variant: str = "bh2",
    lower_order_final: bool = True,
    final_step: str = "extrapolate",
) -> SolverPlan:
    """UniPC: the UniP predictor of order min(order, i + 1) (lowered on the last steps like
    DPM-Solver++), and the UniC corrector of the same order applied to x_i at the call at
    sigma_i, reusing that call's D (no extra NFE): Step i first corrects x_i from X[-2] (x_{i-1})
    and the D history including the new D_i, then predicts x_{i+1}. No corrector after the last
    call. Order p + 1 with the corrector. A step to sigma = 0 is `final_denoised`."""
    levels = _levels(sigmas, "unipc")
    _check_order(order, 3, "unipc")
    _check_afs(afs, levels)
    _check_lower_order_final(lower_order_final)
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
    if not isinstance(corrector, bool):
        raise ValueError(f"corrector must be True or False, got {corrector!r}")
    if variant == "bh1" and corrector and levels[0] == math.inf:
        raise ValueError("variant 'bh1' cannot correct the first step from sigma = inf (its B(h) = -h is infinite "
                         "there); use variant 'bh2' or corrector=False")
    _check_final_step(final_step)
    orders = _step_orders(len(levels) - 1, order, lower_order_final, levels[0] == math.inf)
    counting_noise = _step_orders(len(levels) - 1, order, lower_order_final)

    def predictor(i: int) -> Combination:
        if levels[i + 1] == 0:
            return _final_update(levels, i, afs, final_step)
        after_noise = _noise_start_step(levels, i, counting_noise[i])
        if after_noise is not None:
            return after_noise
        n = orders[i]
        history = levels[i::-1][:n]
        return _combination(lambda x, *d: unipc_update(x, d, history, levels[i + 1], variant), 1, n)

    def corrected(i: int) -> Combination:
        """x_i from x_{i-1} (X[-2]; X[-1] is the predicted x_i) and D_i (D[-1]), D_{i-1}, ..."""
        n = orders[i - 1]
        history = levels[i - 1 :: -1][:n]

        def update(x_predicted: float, x: float, d_next: float, *d: float) -> float:
            return unipc_update(x, d, history, levels[i], variant, denoised_next=d_next)

        return _combination(update, 2, n + 1)

    def update(i: int) -> tuple[Combination, ...]:
        if corrector and i > 0:
            return corrected(i), predictor(i)
        return (predictor(i),)

    return _multistep_plan("unipc", levels, afs, update)


# --- Adams predictor-corrector in the signal fraction alpha ----------------------------------------


def signal_fraction(sigma: float | np.ndarray, sigma_data: float = 1.0) -> float | np.ndarray:
    """alpha = sigma_data / sqrt(sigma_data^2 + sigma^2): 0 at pure noise (sigma = inf), 1 at the
    data (sigma = 0); sqrt(c_skip) of EDM's preconditioning, VP's alpha for sigma_data = 1.
    alpha(sigma) - alpha(inf), `_alpha_difference`, which holds the formula."""
    return _alpha_difference(sigma, math.inf, np.float64(sigma_data))


def _alpha_difference(sigma_a: float | np.ndarray, sigma_b: float, scale: np.ndarray) -> np.ndarray:
    """alpha(sigma_a) - alpha(sigma_b) at sigma_data = scale (`signal_fraction`; alpha(inf) = 0),
    without cancellation where both are near 1: c (sigma_b^2 - sigma_a^2) / (r_a r_b (r_a + r_b)),
    r = sqrt(c^2 + sigma^2); alpha(sigma_a) = c / r_a for sigma_b = inf. sigma_b is one level;
    sigma_a one level or levels (finite, unless sigma_b = inf)."""
    a_inf = np.ndim(sigma_a) == 0 and math.isinf(sigma_a)
    if math.isinf(sigma_b):
        return np.zeros_like(scale) if a_inf else scale / np.sqrt(scale**2 + np.square(sigma_a))
    r_b = np.sqrt(scale**2 + sigma_b**2)
    if a_inf:
        return -scale / r_b
    r_a = np.sqrt(scale**2 + np.square(sigma_a))
    return scale * (sigma_b - sigma_a) * (sigma_b + sigma_a) / (r_a * r_b * (r_a + r_b))


def _alpha_lagrange(nodes: Sequence[float], sigmas: np.ndarray, sigma_data: np.ndarray) -> np.ndarray:
    """L_k(alpha(sigma)) for each sigma_data (rows), k over `nodes`, sigma over `sigmas`: the
    Lagrange basis on the nodes' alphas (`signal_fraction`); shape (len(sigma_data), k, points)."""
    scale = np.asarray(sigma_data, dtype=np.float64).reshape(-1, 1)
    sigmas = np.asarray(sigmas, dtype=np.float64).reshape(1, -1)
    basis = np.ones((scale.shape[0], len(nodes), sigmas.shape[1]))
    for k, node_k in enumerate(nodes):
        for j, node_j in enumerate(nodes):
            if j != k:
                basis[:, k] *= _alpha_difference(sigmas, node_j, scale) / _alpha_difference(node_k, node_j, scale)
    return basis


def adams_alpha_weights(nodes: Sequence[float], sigma: float, sigma_next: float, sigma_data: np.ndarray) -> np.ndarray:
    """W, shape (len(sigma_data), len(nodes)), of one `adams_alpha_update`: x_next =
    exponential_decay(x, sigma, sigma_next) + sum_k W[:, k] D_k (at sigma_next = 0, x = sum_k W D_k)."""
    if sigma_next == 0:
        return _alpha_lagrange(nodes, np.zeros(1), sigma_data)[:, :, 0]
    points, weights = GAUSS_LEGENDRE_32
    u_next = 1.0 / sigma_next
    if sigma == math.inf:
        u = 0.5 * u_next * (points + 1.0)
        du = 0.5 * u_next * weights
    else:
        log_u, log_u_next = -math.log(sigma), math.log(u_next)
        u = np.exp(0.5 * (log_u_next - log_u) * points + 0.5 * (log_u_next + log_u))
        du = 0.5 * (log_u_next - log_u) * weights * u
    return sigma_next * (_alpha_lagrange(nodes, 1.0 / u, sigma_data) @ du)


def adams_alpha_update(
    x: float, denoised: Sequence[float], nodes: Sequence[float], sigma: float, sigma_next: float, sigma_data: float = 1.0
) -> float:
    """One step of the exact ODE solution from x at `sigma` to `sigma_next` with D interpolated as
    a polynomial in alpha = `signal_fraction` through D at `nodes` (denoised[k] at nodes[k]).

    In y = x / sigma and u = 1 / sigma the probability-flow ODE is dy/du = D (the exponential
    integrator's form: exact for the linear part), so

        x_next = (sigma_next / sigma) x + sigma_next sum_k D_k integral_{u}^{u_next} L_k(alpha(u)) du,

    the integrals by 32-point Gauss-Legendre (in log u; in u from pure noise, u = 0)
    (`adams_alpha_weights`). At sigma_next = 0 the limit is x = sum_k L_k(1) D_k: D extrapolated
    to the data. Why alpha and not lambda = -log sigma (DPM-Solver++, UniPC): along the trajectory
    of data of std a, D - E[y] = a alpha_a n with alpha_a the signal fraction at sigma_data = a,
    so D is linear in alpha for data of std sigma_data and smooth in alpha at both ends (D = E[y] +
    O(alpha) at pure noise, D = y + O(1 - alpha) ~ O(sigma^2) at the data), where it is
    exponential in lambda. Exact for D polynomial in alpha of degree < len(nodes); as predictor
    (nodes sigma_i, sigma_{i-1}, ...) an Adams-Bashforth rule, as corrector (nodes sigma_next,
    sigma_i, ...) Adams-Moulton."""
    weights = adams_alpha_weights(nodes, sigma, sigma_next, np.array([sigma_data]))[0]
    combined = float(weights @ np.asarray(denoised, dtype=np.float64))
    return combined if sigma_next == 0 else exponential_decay(x, sigma, sigma_next) + combined


def motion_gram(denoised: Sequence[torch.Tensor]) -> np.ndarray:
    """Per sample, the Gram matrix of the steps between consecutive model outputs (newest first:
    D_i - D_{i-1}, D_{i-1} - D_{i-2}, ...), float64, on the host: all an adaptive step needs of
    them (one device-to-host copy of a few numbers per sample)."""
    flat = [d.detach().to(torch.float64).flatten(1) for d in denoised]
    steps = torch.stack([newer - older for newer, older in zip(flat[:-1], flat[1:])], 1)
    return (steps @ steps.transpose(1, 2)).cpu().numpy()


ADAPTIVE_SCALE_RANGE = 64.0
"""adams_alpha_adaptive's interpolation scale stays within sigma_data / 64 .. sigma_data * 64."""
_LOG_SCALE_TABLE = np.linspace(-math.log(ADAPTIVE_SCALE_RANGE), math.log(ADAPTIVE_SCALE_RANGE), 2049)


def interpolation_scale(gram: np.ndarray, nodes: Sequence[float], sigma: float, sigma_data: float = 1.0) -> np.ndarray:
    """Per sample, the scale c on which the newest model output is best predicted from the two
    before it: with D_{i-1} at nodes[0], D_{i-2} at nodes[1] and D_i at `sigma`, the line in
    alpha_c = `signal_fraction`(., c) through the first two predicts D_{i-1} - w(c) (D_{i-1} -
    D_{i-2}) at sigma, w(c) its weight of D_{i-2}, and c minimizes the residual |d_1 + w(c) d_2|^2
    (d_1 = D_i - D_{i-1}, d_2 = D_{i-1} - D_{i-2}; `gram` their Gram matrices, `motion_gram`): w(c)
    = -<d_1, d_2> / |d_2|^2. w is monotone in c and the same for every sample: it is tabulated
    once on 2049 log-spaced scales, and each sample's root is bracketed there and refined by
    three false-position steps (to ~1e-12 in log c).

    Leave-one-out calibration of the interpolation variable on the sample's own trajectory: for
    Gaussian data of one std a, D is linear in alpha_a (`adams_alpha_update`), so c = a, whatever
    a; for other data it picks the scale on which D moved most linearly over the last steps (the
    between-mode motion of a mixture included, which no std describes). Within sigma_data / 64 ..
    sigma_data * 64 (a weight out of reach takes the nearer end); sigma_data where D_{i-1} =
    D_{i-2} (nothing to fit)."""
    gram = np.asarray(gram, dtype=np.float64)
    moving = gram[:, 1, 1] > 0
    target = -gram[:, 0, 1] / np.where(moving, gram[:, 1, 1], 1.0)

    def weight(log_scale: np.ndarray) -> np.ndarray:
        scale = np.exp(log_scale)
        return _alpha_difference(sigma, nodes[0], scale) / _alpha_difference(nodes[1], nodes[0], scale)

    logs = math.log(sigma_data) + _LOG_SCALE_TABLE
    table = weight(logs)
    if table[-1] < table[0]:
        logs, table = logs[::-1], table[::-1]
    target = np.clip(np.nan_to_num(target, nan=table[0]), table[0], table[-1])
    upper = np.clip(np.searchsorted(table, target), 1, len(table) - 1)
    low, high = logs[upper - 1], logs[upper]
    below, above = table[upper - 1] - target, table[upper] - target
    estimate = low
    for _ in range(3):
        span = above - below
        estimate = np.where(span != 0, low - below * (high - low) / np.where(span != 0, span, 1.0), 0.5 * (low + high))
        value = weight(estimate) - target
        left = value <= 0
        low, below = np.where(left, estimate, low), np.where(left, value, below)
        high, above = np.where(left, high, estimate), np.where(left, above, value)
    return np.where(moving, np.exp(estimate), float(sigma_data))


def _adams_alpha_updates(
    levels: tuple[float, ...], i: int, order: int, corrector: bool, final_step: str, stds: np.ndarray
) -> tuple[Combination, ...]:
    """Step i's updates with D interpolated in alpha at sigma_data = stds (one per sample): the
    corrector of x_i (x_{i-1} is X[-2]; X[-1] is the predicted x_i), then the predictor of
    x_{i+1}, both through D_i, D_{i-1}, ... (`adams_alpha_weights`)."""
    nodes = levels[i::-1][:order]

    def combination(sigma: float, sigma_next: float, num_states: int) -> Combination:
        weights = adams_alpha_weights(nodes, sigma, sigma_next, stds)
        states = () if sigma_next == 0 else (0.0,) * (num_states - 1) + (exponential_decay(1.0, sigma, sigma_next),)
        return Combination(states, tuple(weights[:, k] for k in range(len(nodes))))

    if levels[i + 1] == 0 and final_step == "denoise":
        predictor = _final_update(levels, i, False, final_step)
    else:
        predictor = combination(levels[i], levels[i + 1], 1)
    return (combination(levels[i - 1], levels[i], 2), predictor) if corrector and i > 0 else (predictor,)


def _as_floats(updates: tuple[Combination, ...]) -> tuple[Combination, ...]:
    """Updates built for one sigma_data with Python-float coefficients."""

    def scalar(values: tuple[float | np.ndarray, ...]) -> tuple[float, ...]:
        return tuple(float(np.asarray(v).reshape(-1)[0]) for v in values)

    return tuple(Combination(scalar(u.states), scalar(u.denoised), u.noise_std) for u in updates)


def _adams_alpha(
    solver: str, sigmas: Sequence[float] | torch.Tensor, order: int, corrector: bool, sigma_data: float, final_step: str,
    adaptive: bool,
) -> SolverPlan:
    levels = _levels(sigmas, solver)
    _check_order(order, 4, solver)
    if not isinstance(corrector, bool):
        raise ValueError(f"corrector must be True or False, got {corrector!r}")
    check_kinds(sigma_data=(sigma_data, "real"))
    if not (math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
    _check_final_step(final_step)
    default = np.array([float(sigma_data)])

    def adapt_of(i: int) -> Callable[[np.ndarray], tuple[Combination, ...]] | None:
        """From the third call (three outputs to fit on); none where the scale cannot matter."""
        if not adaptive or order == 1 or i < 2:
            return None

        def adapt(gram: np.ndarray) -> tuple[Combination, ...]:
            scales = interpolation_scale(gram, (levels[i - 1], levels[i - 2]), levels[i], sigma_data)
            return _adams_alpha_updates(levels, i, order, corrector, final_step, scales)

        return adapt

    return _multistep_plan(solver, levels, False,
                           lambda i: _as_floats(_adams_alpha_updates(levels, i, order, corrector, final_step, default)),
                           adapt_of)


def adams_alpha_plan(
    sigmas: Sequence[float] | torch.Tensor, *, order: int = 3, corrector: bool = True, sigma_data: float = 1.0,
    final_step: str = "extrapolate",
) -> SolverPlan:
    """Adams predictor-corrector in alpha (`adams_alpha_update`): the predictor through the last
    min(order, i + 1) calls (the call at pure noise, alpha = 0, is a regular node), the corrector
    of x_i through D_i and the order - 1 calls before it, reusing call i (no extra NFE; UniPC's
    scheme, Zhao et al. 2023). The step to sigma = 0 ("extrapolate" or "published") is the
    predictor's limit: D extrapolated to alpha = 1 through the last `order` calls; "denoise":
    x = D. `sigma_data`: the data's std in x / s units (1 for VP and flow models' unit-variance
    data, 0.5 for EDM's pixels; the scheduler and `samplers.sample` pass the family's
    `data_std`). Order `order` (the corrector lowers the constant, not the order); each step
    from order 2 on is exact for Gaussian data of std sigma_data, the first (one node) is not."""
    return _adams_alpha("adams_alpha", sigmas, order, corrector, sigma_data, final_step, adaptive=False)


def adams_alpha_adaptive_plan(
    sigmas: Sequence[float] | torch.Tensor, *, order: int = 3, corrector: bool = True, sigma_data: float = 1.0,
    final_step: str = "extrapolate",
) -> SolverPlan:
    """`adams_alpha_plan` with the interpolation scale chosen per sample at every call from the
    third on (`interpolation_scale`: the scale on which the sample's last three model outputs lie
    most nearly on a line in alpha) and used for the corrector into and the predictor out of that
    call (`Step.adapt`); the first two calls use `sigma_data`. Each step from the third call on is
    then exact for Gaussian data of any one std, not only sigma_data's. Not a linear plan: the
    executors hand it the Gram matrices of the last two steps between model outputs per sample
    at each call (`motion_gram`: one device-to-host copy of 4 numbers per sample)."""
    return _adams_alpha("adams_alpha_adaptive", sigmas, order, corrector, sigma_data, final_step, adaptive=True)


# --- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver: its plan function and what a caller needs to drive it.

    calls_per_step: 2 for Heun (N steps cost 2N - 1 calls on a grid ending at 0), else 1.
    schedule / schedule_options: its default grid (`schedules.sigma_grid`).
    churn: Algorithm 2's churn applies. afs: the analytical first step applies.
    orders: the allowed `order` range, None when the solver has no order option.
    infinite_start: its plans may start at sigma = inf (pure noise; see the module docstring).
    flow_bottom_exponent: b of its default grid for flow models from pure noise, which ends at
    s / (N - 1)^b (`EDMScheduler._flow_noise_grid`); None: the scheduler's default.
    """

    plan: Callable[..., SolverPlan]
    description: str
    schedule: str
    schedule_options: dict[str, Any] = field(default_factory=dict)
    calls_per_step: int = 1
    churn: bool = False
    afs: bool = True
    orders: tuple[int, int] | None = None
    infinite_start: bool = False
    flow_bottom_exponent: float | None = None

    def steps_for_nfe(self, nfe: int, afs: bool = False) -> int:
        """The grid step count (grid ending at 0) whose model calls are the most not above `nfe`."""
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
        if self.calls_per_step == 2:
            return (nfe + 1) // 2
        return nfe + 1 if afs else nfe


SOLVERS: dict[str, SolverInfo] = {
    # Default grids, one rule per family (benchmarks/low_nfe_core.py: geometric mean of the error
    # ratio to the best configuration over a Gaussian and two Gaussian mixtures at NFE 5..63):
    # - heun keeps the paper's rho = 7 grid (EDM's sampler as published; time_quadratic measured better);
    # - the data-prediction exponential integrators (dpmpp_*, unipc) step in lambda = -log sigma:
    #   equal steps in lambda (logsnr) measured best for each, on every oracle;
    # - fixed-weight iPNDM assumes equal steps: logsnr (best with afs, and in the study);
    # - the variable-step AB solvers (ipndm_v, deis) and Euler: time_quadratic (DEIS's and DDIM's
    #   quadratic-in-t grid), best for each on average.
    "heun": SolverInfo(heun_plan, "EDM Heun (Algorithm 1, alpha-generalized; Algorithm 2 with churn)",
                       "karras", {"rho": EDM_RHO}, calls_per_step=2, churn=True, afs=False),
    "euler": SolverInfo(euler_plan, "Euler = DDIM = DPM-Solver-1 in EDM space; churn allowed",
                        "time_quadratic", churn=True, infinite_start=True),
    "ipndm": SolverInfo(ipndm_plan, "iPNDM: fixed-weight Adams-Bashforth on d = (x - D)/sigma, orders 1..4 (default 3)",
                        "logsnr", orders=(1, 4)),
    "ipndm_v": SolverInfo(ipndm_v_plan, "iPNDM with variable-step Adams-Bashforth weights, orders 1..4 (default 4)",
                          "time_quadratic", orders=(1, 4)),
    "dpmpp_2m": SolverInfo(dpmpp_2m_plan, "DPM-Solver++(2M), data prediction", "logsnr", infinite_start=True),
    "dpmpp_3m": SolverInfo(dpmpp_3m_plan, "DPM-Solver++(3M), data prediction, third order", "logsnr",
                           infinite_start=True),
    "unipc": SolverInfo(unipc_plan, "UniPC bh2: UniP of order 1..3 (default 2) + UniC reusing the next call",
                        "logsnr", orders=(1, 3), infinite_start=True),
    "deis": SolverInfo(deis_plan, "tAB-DEIS: Adams-Bashforth in the VP time t, orders 1..4 (default 3)",
                       "time_quadratic", orders=(1, 4)),
    "adams_alpha": SolverInfo(adams_alpha_plan, "Adams predictor-corrector with D interpolated in the signal fraction "
                              "alpha = 1 / sqrt(1 + sigma^2), orders 1..4 (default 3)", "logsnr", afs=False,
                              orders=(1, 4), infinite_start=True, flow_bottom_exponent=1.0),
    "adams_alpha_adaptive": SolverInfo(adams_alpha_adaptive_plan, "adams_alpha with the interpolation scale fitted per "
                                       "sample to its last three model outputs at every call, orders 1..4 (default 3)",
                                       "logsnr", afs=False, orders=(1, 4), infinite_start=True, flow_bottom_exponent=1.0),
}


def solver_info(solver: str) -> SolverInfo:
    """The registry entry of `solver`, with a ValueError listing the names for an unknown one."""
    if not (isinstance(solver, str) and solver in SOLVERS):
        raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {solver!r}")
    return SOLVERS[solver]


def family_options(solver: str, data_std: float) -> dict[str, Any]:
    """The options `solver` takes from the model family: `sigma_data` = the family's data std
    (`Family.data_std`) for the solvers that interpolate in alpha (adams_alpha); else none."""
    return {"sigma_data": data_std} if "sigma_data" in (solver_info(solver).plan.__kwdefaults__ or {}) else {}


def make_plan(solver: str, sigmas: Sequence[float] | torch.Tensor, **options: Any) -> SolverPlan:
    """The plan of registered `solver` on `sigmas` with the solver's own `options` (order, afs,
    alpha, sigma_hats, ...); an option the solver does not take is a ValueError naming it."""
    info = solver_info(solver)
    accepted = info.plan.__kwdefaults__ or {}
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"solver {solver!r} takes the options {sorted(accepted)}, got {unknown}")
    return info.plan(sigmas, **options)


def solver_sigmas(
    solver: str,
    nfe: int,
    sigma_min: float,
    sigma_max: float,
    *,
    afs: bool = False,
    schedule: str | None = None,
    **schedule_options: Any,
) -> torch.Tensor:
    """The grid on which `solver` makes at most `nfe` model calls (exactly `nfe` except Heun at
    even nfe): its default schedule (or `schedule` with `schedule_options`) over
    [sigma_min, sigma_max], one step more under afs."""
    info = solver_info(solver)
    if schedule is None:
        schedule, schedule_options = info.schedule, {**info.schedule_options, **schedule_options}
    return sigma_grid(schedule, info.steps_for_nfe(nfe, afs), sigma_min, sigma_max, **schedule_options)
