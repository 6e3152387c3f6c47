"""Solver plans against exact answers: convergence orders on the Gaussian oracle, polynomial
exactness of every multistep update, parity with diffusers' DDIM / DPM-Solver++ / UniPC on the
same grid and noise, Algorithms 1 and 2 re-implemented here, counted NFE, and bad input."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from scipy.integrate import quad

from edm_sampling import samplers as SM
from edm_sampling import solvers as V
from edm_sampling.denoisers import DiscreteVPDenoiser
from edm_sampling.oracle_unet import OracleUNet2DModel
from edm_sampling.oracles import FiniteDataOracle, builtin_gaussian
from edm_sampling.schedules import karras_sigmas, logsnr_sigmas, sigma_grid, vp_sigma, vp_sigma_inv

ORACLE = builtin_gaussian()
MULTISTEP = ("ipndm", "ipndm_v", "dpmpp_2m", "dpmpp_3m", "unipc", "deis")


class Recorder:
    """Counts and records every call of a denoiser."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []
        self.sigma_min, self.sigma_max = getattr(denoiser, "sigma_min", 0.0), getattr(denoiser, "sigma_max", math.inf)

    def __call__(self, x, sigma, **kwargs):
        self.calls.append((x.clone(), sigma.clone()))
        return self.denoiser(x, sigma, **kwargs)


def latents(batch=4, seed=0):
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- convergence orders --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver, options, order",
    [
        ("euler", {}, 1),
        ("heun", {}, 2),
        ("ipndm", {"order": 1}, 1),
        ("ipndm_v", {"order": 2}, 2),
        ("ipndm_v", {"order": 3}, 3),
        ("ipndm_v", {"order": 4}, 4),
        ("dpmpp_2m", {}, 2),
        ("dpmpp_3m", {}, 3),
        ("unipc", {"order": 1}, 2),
        ("unipc", {"order": 2}, 3),
        ("unipc", {"order": 3}, 4),
        ("unipc", {"order": 2, "solver_options": {"corrector": False}}, 2),
        ("deis", {"order": 2}, 2),
        ("deis", {"order": 3}, 3),
    ],
)
def test_convergence_order_on_the_gaussian_oracle(solver, options, order):
    """Slope of log max-error vs log N against the closed-form ODE solution, on Karras grids
    over [0.01, 80] without the final step to 0 (where every solver's order would be masked by
    the final denoise): UniPC of order p converges at p + 1 with its corrector, p without."""
    z = latents()
    exact = ORACLE.ode_solution(z * 80.0, 80.0, 0.01)
    steps = (48, 64, 96, 128)
    errors = [(SM.sample(ORACLE, z, karras_sigmas(n, 0.01, 80.0)[:-1], solver=solver, **options).sample - exact).abs().max().item()
              for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, (slope, errors)


# --- exactness -----------------------------------------------------------------------------------


def _apply(update: V.Combination, states: list[float], denoised: list[float]) -> float:
    """An update on scalar histories, newest first (what execute_plan does on tensors)."""
    return sum(c * x for c, x in zip(update.states, states)) + sum(c * d for c, d in zip(update.denoised, denoised))


@pytest.mark.parametrize("solver", ["euler", "heun", *MULTISTEP])
def test_every_solver_is_exact_for_a_constant_denoiser(solver):
    """D = c: the exact solution is x(sigma) = c + sigma / sigma_0 (x_0 - c); every solver's
    slope (x - c) / sigma is constant along it, so every plan must reproduce it to rounding."""
    c = 0.3
    grid = karras_sigmas(7, 0.05, 80.0)[:-1]
    z = latents(2)
    out = SM.sample(lambda x, sigma: torch.full_like(x, c), z, grid, solver=solver)
    torch.testing.assert_close(out.sample, c + 0.05 / 80.0 * (80.0 * z - c), rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver", MULTISTEP)
def test_analytical_first_step_is_exact_for_zero_mean_constant_data(solver):
    """afs replaces the first call by D = 0: exact when D is 0, and it saves that call."""
    model = Recorder(lambda x, sigma: torch.zeros_like(x))
    grid = karras_sigmas(6, 0.05, 80.0)[:-1]
    z = latents(2)
    out = SM.sample(model, z, grid, solver=solver, afs=True)
    assert out.nfe == len(model.calls) == 4 and model.calls[0][1][0].item() == pytest.approx(float(grid[1]))
    torch.testing.assert_close(out.sample, 0.05 * z, rtol=0, atol=1e-12)


def _exponential_integral(g, sigma_from: float, sigma_to: float) -> float:
    """sigma_to * integral over lambda = -log sigma of e^lambda g(lambda): the exact solution's
    D-part when D(x; sigma) = g(-log sigma) does not depend on x."""
    return sigma_to * quad(lambda lam: math.exp(lam) * g(lam), -math.log(sigma_from), -math.log(sigma_to), epsabs=1e-14, epsrel=1e-13)[0]


@pytest.mark.parametrize(
    "solver, order, predictor_exact, corrector_exact",
    [("dpmpp_2m", 2, 0, None), ("dpmpp_3m", 3, 2, None), ("unipc", 1, 0, 0), ("unipc", 2, 0, 2), ("unipc", 3, 2, 3)],
)
def test_data_prediction_updates_are_exact_for_polynomial_denoisers(solver, order, predictor_exact, corrector_exact):
    """With D(x; sigma) = g(lambda), lambda = -log sigma, x(s_next) = s_next / s x(s) + the
    exponential integral of g. On a full-order step an update whose coefficients solve the order
    conditions over m stored D's is exact for g of degree < m, and not for degree m (so the check
    can fail): DPM-Solver++(3M), UniP-3, UniC-2 and UniC-3 (which also uses the new D). The fixed
    1/2 weights of DPM-Solver++(2M) (Algorithm 2), UniP-2 and UniC-1 keep the order but are exact
    for constant D only."""
    levels = logsnr_sigmas(9, 0.05, 80.0).tolist()
    options = {"order": order} if solver == "unipc" else {}
    plan = V.make_plan(solver, levels, **options)
    k = 5  # a grid step of full order
    step = next(s for s in plan.steps if s.index == k)
    x0 = 0.7
    for degree in range(order + 2):
        def g(lam):
            return (lam + 0.3) ** degree

        def x_at(i):
            return levels[i] / levels[0] * x0 + _exponential_integral(g, levels[0], levels[i])

        history = [g(-math.log(levels[k - j])) for j in range(5)]  # D_k, D_{k-1}, ...
        predictor = step.updates[-1]
        error = abs(_apply(predictor, [x_at(k)], history) - x_at(k + 1))
        assert (error < 1e-10) == (degree <= predictor_exact), (degree, error)
        if corrector_exact is not None:  # the corrector at call k: x_k from x_{k-1} (X[-2]), D_k the "D_next"
            corrector = step.updates[0]
            assert corrector.states[0] == 0.0  # the predicted x_k only fed the model
            error = abs(_apply(corrector, [0.0, x_at(k - 1)], history) - x_at(k))
            assert (error < 1e-10) == (degree <= corrector_exact), (degree, error)


@pytest.mark.parametrize("solver, order", [("ipndm_v", 2), ("ipndm_v", 3), ("ipndm_v", 4), ("deis", 2), ("deis", 3)])
def test_adams_bashforth_updates_are_exact_for_polynomial_slopes(solver, order):
    """With D(x; sigma) = x - sigma q, the slope is d = q and x(sigma) = x_0 + integral of q.
    Variable-step AB of order p (ipndm_v: polynomial in sigma; tAB-DEIS: in the VP time t) is
    exact for q of degree < p in its variable, and not for degree p."""
    levels = karras_sigmas(10, 0.05, 80.0).tolist()
    plan = V.make_plan(solver, levels, order=order)
    k = 6
    (update,) = next(s for s in plan.steps if s.index == k).updates
    variable = (lambda s: s) if solver == "ipndm_v" else (lambda s: float(vp_sigma_inv(s)))
    x0 = 0.4
    for degree in range(order + 1):
        def q(s):
            return (variable(s) - 0.2) ** degree

        def x_at(i):
            return x0 + quad(q, levels[0], levels[i], epsabs=1e-13, epsrel=1e-13)[0]

        states = [x_at(k - j) for j in range(order)]
        denoised = [x_at(k - j) - levels[k - j] * q(levels[k - j]) for j in range(order)]
        error = abs(_apply(update, states, denoised) - x_at(k + 1))
        assert (error < 1e-8 * (1 + abs(x_at(k + 1)))) == (degree < order), (degree, error)


def test_first_order_solvers_agree_and_dpmpp_3m_is_third_order_where_the_common_form_is_not():
    """Euler = DPM-Solver++ order 1 = UniP-1 = iPNDM-1 in EDM space; and the 3M update differs
    from the widely used form (half the second-difference term) exactly on quadratic D."""
    grid = logsnr_sigmas(8, 0.05, 80.0)
    z = latents(2)
    euler = SM.sample(ORACLE, z, grid, solver="euler").sample
    for solver, options in (("ipndm", {"order": 1, "solver_options": {"final_step": "denoise"}}),
                            ("unipc", {"order": 1, "solver_options": {"corrector": False, "final_step": "denoise"}})):
        torch.testing.assert_close(SM.sample(ORACLE, z, grid, solver=solver, **options).sample, euler, rtol=0, atol=1e-12)
    sigmas, nxt = [1.0, 1.3, 1.8], 0.8
    denoised = [(-math.log(s)) ** 2 for s in sigmas]
    exact = nxt / sigmas[0] * 0.7 + _exponential_integral(lambda lam: lam**2, sigmas[0], nxt)
    assert V.dpmpp_update(0.7, denoised, sigmas, nxt) == pytest.approx(exact, abs=1e-12)


# --- a second path: diffusers' own schedulers on the same grid and noise ---------------------------


def _diffusers_loop(scheduler, unet, noise):
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize(
    "scheduler_class, kwargs, solver, options, steps",
    [
        (DDIMScheduler, {"clip_sample": False}, "euler", {}, 10),
        (DPMSolverMultistepScheduler, {"solver_order": 2, "final_sigmas_type": "zero"}, "dpmpp_2m",
         {"solver_options": {"final_step": "denoise"}}, 12),
        (UniPCMultistepScheduler, {"solver_order": 2, "final_sigmas_type": "zero"}, "unipc",
         {"order": 2, "solver_options": {"final_step": "denoise"}}, 12),
        (UniPCMultistepScheduler, {"solver_order": 3, "final_sigmas_type": "zero"}, "unipc",
         {"order": 3, "solver_options": {"final_step": "denoise"}}, 9),
    ],
)
def test_parity_with_diffusers_schedulers(scheduler_class, kwargs, solver, options, steps):
    """On an epsilon VP model (the exact Gaussian oracle as a UNet), our plan on diffusers' grid
    from the same noise gives diffusers' sample: DDIM is Euler in EDM space, DPM-Solver++(2M) and
    UniPC-bh2 (diffusers lowers the final orders like our rule below 15 steps), with the published
    final step x = D (final_step "denoise")."""
    unet = OracleUNet2DModel(dataset="gaussian").double()
    scheduler = scheduler_class(timestep_spacing="trailing", **kwargs)
    scheduler.set_timesteps(steps)
    noise = latents(3)
    theirs = _diffusers_loop(scheduler, unet, noise)
    if scheduler_class is DDIMScheduler:
        abar = scheduler.alphas_cumprod[scheduler.timesteps].double()
        grid = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    else:
        grid = scheduler.sigmas.double()
    denoiser = DiscreteVPDenoiser.from_scheduler_config(unet, scheduler.config)
    start = math.sqrt(float(grid[0]) ** 2 + 1) / float(grid[0])  # x_edm = x_vp sqrt(sigma^2 + 1)
    ours = SM.sample(denoiser, noise * start, grid, solver=solver, state_dtype=torch.float64, **options).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


# --- Algorithms 1 and 2 as plans -------------------------------------------------------------------


def algorithm_2(denoiser, z, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, generator=None, alpha=1.0):
    """The paper's Algorithm 2 (Algorithm 1 at s_churn = 0, alpha-generalized), written out."""
    levels = [float(s) for s in sigmas]
    n = len(levels) - 1
    x = z * levels[0]
    for i in range(n):
        sigma, sigma_next = levels[i], levels[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        d = (x - denoiser(x, torch.full((x.shape[0],), sigma_hat, dtype=x.dtype))) / sigma_hat
        if sigma_next == 0:
            x = x + (sigma_next - sigma_hat) * d
            continue
        sigma_mid = sigma_hat + alpha * (sigma_next - sigma_hat)
        x_mid = x + (sigma_mid - sigma_hat) * d
        d_mid = (x_mid - denoiser(x_mid, torch.full((x.shape[0],), sigma_mid, dtype=x.dtype))) / sigma_mid
        x = x + (sigma_next - sigma_hat) * ((1 - 1 / (2 * alpha)) * d + 1 / (2 * alpha) * d_mid)
    return x


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_heun_plan_is_algorithm_1(alpha):
    z, sigmas = latents(3), karras_sigmas(9)
    ours = SM.sample(ORACLE, z, sigmas, solver="heun", alpha=alpha)
    torch.testing.assert_close(ours.sample, algorithm_2(ORACLE, z, sigmas, alpha=alpha), rtol=1e-12, atol=1e-12)
    assert ours.nfe == 17


def test_churn_plan_is_algorithm_2_with_the_same_noise_draws():
    """Step 0's churn is folded into the start noise by `sample` (one draw, same distribution), so
    the comparison starts past it: S_tmax below sigma_0 leaves step 0 unchurned."""
    z, sigmas = latents(3), karras_sigmas(10)
    churn = {"s_churn": 30.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.007}
    ours = SM.sample(ORACLE, z, sigmas, generator=torch.Generator().manual_seed(4), **churn)
    reference = algorithm_2(ORACLE, z, sigmas, generator=torch.Generator().manual_seed(4), **churn)
    torch.testing.assert_close(ours.sample, reference, rtol=1e-12, atol=1e-12)
    assert ours.sigma_hats[1] > float(sigmas[1])


def test_plans_keep_a_bounded_history():
    grid = karras_sigmas(12)
    assert V.make_plan("heun", grid).state_history == 2
    assert V.make_plan("dpmpp_3m", grid).state_history == 1 and V.make_plan("dpmpp_3m", grid).denoised_history == 3
    unipc = V.make_plan("unipc", grid, order=3)
    assert unipc.state_history == 2 and unipc.denoised_history == 4
    assert V.make_plan("ipndm", grid, order=4).state_history == 4


# --- NFE -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", list(V.SOLVERS))
@pytest.mark.parametrize("nfe", [5, 8])
def test_counted_nfe_matches_the_plan_and_the_budget(solver, nfe):
    """The grid `solver_sigmas` builds for a budget costs exactly nfe calls (Heun: the largest
    2N - 1 not above it), counted by wrapping the model; afs buys one more step for free."""
    for afs in (False, True) if V.SOLVERS[solver].afs else (False,):
        model = Recorder(ORACLE)
        grid = V.solver_sigmas(solver, nfe, 0.01, 80.0, afs=afs)
        out = SM.sample(model, latents(1), grid, solver=solver, afs=afs)
        expected = nfe - (nfe + 1) % 2 if solver == "heun" else nfe
        assert out.nfe == len(model.calls) == expected == V.make_plan(solver, grid, **({"afs": True} if afs else {})).nfe
        assert len(grid) - 1 == (expected + 1) // 2 if solver == "heun" else len(grid) - 1 == nfe + afs


def test_default_grids_are_registered_schedules():
    for name, info in V.SOLVERS.items():
        grid = V.solver_sigmas(name, 9, 0.01, 80.0)
        assert float(grid[0]) == pytest.approx(80.0) and float(grid[-1]) == 0.0, name
    assert V.SOLVERS["heun"].schedule == "karras" and V.SOLVERS["heun"].schedule_options == {"rho": 7.0}
    torch.testing.assert_close(V.solver_sigmas("heun", 35, 0.002, 80.0), karras_sigmas(18))


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"solver": "rk4"}, "solver"),
        ({"solver": "dpmpp_2m", "sigmas": [80.0, 90.0, 0.0]}, "decreasing"),
        ({"solver": "unipc", "sigmas": [80.0, float("nan"), 0.0]}, "finite"),
        ({"solver": "ipndm", "s_churn": 10.0}, "s_churn"),
        ({"solver": "ipndm", "order": 5}, "order"),
        ({"solver": "unipc", "order": 0}, "order"),
        ({"solver": "deis", "order": 2.5}, "order"),
        ({"solver": "dpmpp_2m", "order": 2}, "order"),
        ({"solver": "heun", "afs": True}, "afs"),
        ({"solver": "heun", "alpha": 1.5}, "alpha"),
        ({"solver": "euler", "alpha": 0.5}, "alpha"),
        ({"solver": "unipc", "solver_options": {"variant": "bh3"}}, "variant"),
        ({"solver": "unipc", "solver_options": {"predictor": 2}}, "predictor"),
        ({"solver": "dpmpp_3m", "afs": True, "sigmas": [80.0, 0.0]}, "afs"),
    ],
)
def test_bad_input_is_rejected_before_any_model_call(kwargs, name):
    model = Recorder(ORACLE)
    kwargs = {"sigmas": karras_sigmas(4), **kwargs}
    with pytest.raises(ValueError, match=name):
        SM.sample(model, latents(2), **kwargs)
    assert model.calls == []


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: V.make_plan("lms", [1.0, 0.0]), "solver"),
        (lambda: V.solver_sigmas("unipc", 0, 0.01, 80.0), "nfe"),
        (lambda: V.solver_sigmas("unipc", 5, 0.01, 80.0, schedule="cosine"), "schedule"),
        (lambda: sigma_grid("logsnr", 5, 0.01, 80.0, rho=7.0), "rho"),
    ],
)
def test_bad_plan_and_grid_requests_name_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_vp_time_of_the_default_deis_variable_is_the_spec_one():
    """deis interpolates in the continuous VP t of EDM_SPEC: sigma_VP(t(sigma)) = sigma."""
    s = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(vp_sigma(vp_sigma_inv(s)), s)


# --- the step to sigma = 0 ---------------------------------------------------------------------------


def test_final_denoised_is_exact_for_d_linear_in_sigma_squared_and_keeps_constant_d():
    sigmas = [0.01, 0.03]
    a, b = 0.4, -7.0
    assert V.final_denoised([a + b * s**2 for s in sigmas], sigmas) == pytest.approx(a, abs=1e-12)
    assert V.final_denoised([0.25, 0.25], sigmas) == 0.25
    assert V.final_denoised([0.25], sigmas[:1]) == 0.25


@pytest.mark.parametrize("solver, options", [("dpmpp_3m", {}), ("unipc", {"order": 3})])
def test_extrapolated_final_step_removes_the_sigma_min_floor(solver, options):
    """With many steps of a third-order solver the ODE error vanishes and what is left is the
    final step's: x = D at sigma_min is off by O(sigma_min^2) (slope 2 in sigma_min; the
    built-in Gaussian's smallest std is 0.03), the extrapolation by O(sigma_min^4)."""
    z = latents(4)
    errors = {"denoise": [], "extrapolate": []}
    sigma_mins = [0.01, 0.005, 0.0025]
    exact = ORACLE.ode_solution(z * 80.0, 80.0, 0.0)
    for sigma_min in sigma_mins:
        grid = logsnr_sigmas(300, sigma_min, 80.0)
        for final_step in errors:
            out = SM.sample(ORACLE, z, grid, solver=solver, solver_options={"final_step": final_step}, **options).sample
            errors[final_step].append(float((out - exact).pow(2).mean().sqrt()))
    slope = {k: np.polyfit(np.log(sigma_mins), np.log(v), 1)[0] for k, v in errors.items()}
    assert 1.8 < slope["denoise"] < 2.2
    assert slope["extrapolate"] > 3.0
    assert errors["extrapolate"][0] < errors["denoise"][0] / 10


def test_final_step_option_bad_value_and_scheduler_round_trip(tmp_path):
    from edm_sampling.schedulers import EDMScheduler

    with pytest.raises(ValueError, match="final_step"):
        SM.sample(ORACLE, latents(1), logsnr_sigmas(4, 0.01, 80.0), solver="unipc", solver_options={"final_step": "midpoint"})
    with pytest.raises(ValueError, match="final_step"):
        EDMScheduler(solver="heun", final_step="extrapolate")
    scheduler = EDMScheduler(solver="dpmpp_2m", final_step="denoise")
    scheduler.save_config(tmp_path)
    assert EDMScheduler.from_pretrained(tmp_path).config.final_step == "denoise"
    scheduler.set_timesteps(6)
    last = scheduler.plan.steps[-1].updates[-1]
    assert last.denoised == (1.0,) and not any(last.states)
    extrapolating = EDMScheduler(solver="dpmpp_2m")
    extrapolating.set_timesteps(6)
    assert len(extrapolating.plan.steps[-1].updates[-1].denoised) == 2


@pytest.mark.parametrize("solver", ["ipndm", "ipndm_v", "deis"])
def test_adams_bashforth_final_step_lands_on_concentrated_data(solver):
    """Data concentrated far below sigma_min (point masses: D constant near the end of each
    trajectory): the AB step to sigma = 0 ("published") misses the points, the final step on D
    lands on one of them exactly."""
    points = 0.5 * torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    oracle = FiniteDataOracle(points)
    z = latents(8)
    grid = logsnr_sigmas(6, 0.01, 80.0)

    def off_the_data(mode: str) -> float:
        out = SM.sample(oracle, z, grid, solver=solver, solver_options={"final_step": mode}).sample
        return float(torch.cdist(out.flatten(1), points.flatten(1)).min(dim=1).values.max())

    errors = {mode: off_the_data(mode) for mode in ("published", "denoise", "extrapolate")}
    assert errors["denoise"] < 1e-6 and errors["extrapolate"] < 1e-6
    assert errors["published"] > 1e-4
