"""Flow-matching models from pure noise: t = 1, sigma = inf, where SD3 / Flux start.

The truth is the probability-flow ODE from the noise n at t = 1: for Gaussian data it ends at
mu + sqrt(lam) n, for data at one point c at c. The solvers that can start there (euler,
dpmpp_2m / 3m, unipc) must be exact for a constant D, equal the limit of a start at a huge
finite sigma, converge to that truth, and run through EDMScheduler in the SD3 / Flux loop from
N(0, I) with `init_noise_sigma` = 1 and the transformer's t = 1 (timestep 1000). The others
(heun, ipndm, ipndm_v, deis) step in sigma and keep a finite start.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_flow import ORACLE, exact_velocity

from edm_sampling import samplers
from edm_sampling.denoisers import FlowDenoiser, PreconditionedDenoiser
from edm_sampling.families import flow_sigma
from edm_sampling.oracles import GaussianOracle
from edm_sampling.schedulers import FLOW_GRID_BOTTOM_EXPONENT, EDMScheduler
from edm_sampling.solvers import SOLVERS, Combination, make_plan

M = 1000
FROM_NOISE = [name for name, info in SOLVERS.items() if info.infinite_start]
CASES = [
    {"solver": "euler"},
    {"solver": "dpmpp_2m"},
    {"solver": "dpmpp_3m"},
    {"solver": "unipc", "solver_order": 1},
    {"solver": "unipc"},
    {"solver": "unipc", "solver_order": 3},
    {"solver": "dpmpp_2m", "final_step": "denoise"},
]


def _case_id(case: dict) -> str:
    return "-".join(f"{v}" if k == "solver" else f"{k}={v}" for k, v in case.items())


def _flow_config(**kwargs):
    return FlowMatchEulerDiscreteScheduler(**kwargs).config


def _point_velocity(c: torch.Tensor):
    """The exact velocity of data at the single point c: E[n - y | x_t] = (x_t - c) / t, finite
    at t = 1 (x_t - c)."""

    def velocity(x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = (torch.as_tensor(timestep, dtype=torch.float64) / M).reshape(-1, *([1] * (x_t.ndim - 1)))
        return ((x_t.double() - c) / t).to(x_t.dtype)

    return velocity


def _sd3_loop(scheduler: EDMScheduler, velocity, noise: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The SD3 / Flux denoising loop: latents = N(0, I) noise (never times init_noise_sigma)."""
    x, calls = noise.clone(), 0
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t.expand(x.shape[0])), t, x, return_dict=False)[0]
        calls += 1
    return x, calls


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_constant_denoiser_is_exact_from_pure_noise(case):
    """Data at one point c: D = c at every sigma, the ODE from pure noise ends at c, and every
    solver's first step sigma_1 n + D_0 lands on the exact trajectory c + sigma_1 n (to the
    float32 rounding of the transformer's timesteps)."""
    c = 0.7 * torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler = EDMScheduler.from_config(_flow_config(shift=3.0), **case)
    scheduler.set_timesteps(6)
    assert scheduler.sigmas[0].item() == math.inf and scheduler.timesteps[0].item() == M
    assert scheduler.init_noise_sigma == 1.0
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, calls = _sd3_loop(scheduler, _point_velocity(c), noise)
    assert calls == 6
    torch.testing.assert_close(out, c.expand_as(out), rtol=0, atol=1e-6)


def test_afs_from_pure_noise_is_exact_for_data_at_zero():
    scheduler = EDMScheduler.from_config(_flow_config(), solver="unipc", afs=True)
    scheduler.set_timesteps(5)
    assert scheduler.sigmas[0].item() == math.inf and len(scheduler.timesteps) == 5
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = noise  # the SD3 loop's unit noise is pure noise: afs starts its state at x_t(sigma_1) = sigma_1 / (1 + sigma_1) n
    out, _ = _sd3_loop(scheduler, _point_velocity(torch.zeros(())), x)
    torch.testing.assert_close(out, torch.zeros_like(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver, options", [("euler", {}), ("unipc", {"order": 1})])
def test_pure_noise_start_is_the_limit_of_a_finite_start(solver, options):
    """A second path: the same plan from a finite sigma_0 (state sigma_0 n, D called at
    x = sigma_0 n) approaches the start at inf (state n, the family's limit coefficients) at the
    rate 1 / sigma_0: Euler's first step, UniPC's corrector at h = inf and D at t = 1 are the
    limits they claim."""
    denoiser = FlowDenoiser(exact_velocity)
    noise = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rest = [30.0, 9.0, 2.5, 0.8, 0.2, 0.03, 0.0]
    at_inf = samplers.sample(denoiser, noise, [math.inf, *rest], solver=solver, state_dtype=torch.float64, **options)
    gaps = []
    for sigma_0 in (1e5, 1e7):
        finite = samplers.sample(denoiser, noise, [sigma_0, *rest], solver=solver, state_dtype=torch.float64, **options)
        assert finite.nfe == at_inf.nfe == len(rest)
        gaps.append((finite.sample - at_inf.sample).abs().max().item())
    assert gaps[1] < 1e-6 and 60 < gaps[0] / gaps[1] < 160


def test_unipc_corrects_the_first_step_by_the_trapezoid_in_u():
    """From sigma = inf the ODE in y = x / sigma, u = 1 / sigma is dy/du = D: the first step is
    x_1 = sigma_1 n + D_0 and UniPC's corrector (h = inf) the trapezoidal rule
    x_1 = sigma_1 n + (D_0 + D_1) / 2, reaching back to the noise X[0] = n."""
    plan = make_plan("unipc", [math.inf, 4.0, 1.0, 0.0])
    assert plan.init_std == 1.0
    assert plan.steps[0].sigma == math.inf and plan.steps[0].updates == (Combination((4.0,), (1.0,)),)
    corrector = plan.steps[1].updates[0]
    assert corrector.states == pytest.approx((0.0, 4.0)) and corrector.denoised == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize("solver, options, order", [
    ("euler", {}, 1), ("dpmpp_2m", {}, 2), ("dpmpp_3m", {}, 2), ("unipc", {}, 2), ("unipc", {"order": 3}, 2),
])
def test_convergence_to_the_ode_from_pure_noise(solver, options, order):
    """The exact Gaussian velocity on Flux's time grid (flow times linspace(1, 1/N, N), t = 1 pure
    noise) converges to mu + sqrt(lam) n, the ODE's solution from the noise at t = 1, at the
    solver's order: 1 for Euler, 2 for the others (the time grid's last levels, t = 2/N and 1/N,
    keep a fixed ratio, which caps every solver at second order)."""
    denoiser = FlowDenoiser(exact_velocity)
    noise = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    truth = ORACLE.mean + ORACLE.variance.sqrt() * noise
    errors = []
    for n in (32, 64):
        t = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
        grid = torch.cat([flow_sigma(t), torch.zeros(1, dtype=torch.float64)])
        out = samplers.sample(denoiser, noise, grid, solver=solver, state_dtype=torch.float64, **options).sample
        errors.append((out - truth).pow(2).mean().sqrt().item())
    assert 2**order * 0.75 < errors[0] / errors[1] < 2**order * 1.3


def test_default_flow_grid_from_pure_noise():
    """The default grid of the solvers that start from pure noise: inf, then equal steps in
    log sigma from s (N - 1) down to s / (N - 1)^1.5, then 0 (s the shift factor: static or
    e^mu); timesteps t * 1000 from 1000; the others keep the model's own grid from sigma_max."""
    n, shift = 9, 3.0
    scheduler = EDMScheduler.from_config(_flow_config(shift=shift), solver="unipc")
    scheduler.set_timesteps(n)
    levels = scheduler.sigmas.double()
    assert levels[0].item() == math.inf and levels[-1].item() == 0.0 and len(levels) == n + 1
    expected = torch.logspace(math.log10(shift * (n - 1)), math.log10(shift / (n - 1) ** FLOW_GRID_BOTTOM_EXPONENT), n - 1,
                              dtype=torch.float64)
    torch.testing.assert_close(levels[1:-1], expected.float().double(), rtol=1e-6, atol=0)
    assert scheduler.timesteps[0].item() == M and scheduler.init_noise_sigma == 1.0

    dynamic = EDMScheduler.from_config(_flow_config(use_dynamic_shifting=True), solver="dpmpp_2m")
    dynamic.set_timesteps(n, mu=0.8)
    assert dynamic.sigmas[1].item() == pytest.approx(math.exp(0.8) * (n - 1), rel=1e-6)
    for solver in ("heun", "ipndm", "ipndm_v", "deis"):
        finite = EDMScheduler.from_config(_flow_config(shift=shift), solver=solver)
        finite.set_timesteps(n)
        assert finite.sigmas[0].item() == pytest.approx(80.0) and finite.init_noise_sigma == 1.0


def test_pipeline_grids_keep_t_1_as_pure_noise():
    """Flux passes flow times from t = 1, other pipelines timesteps from 1000: for the solvers that
    start from pure noise both are sigma = inf; the other levels are kept as given (no cap at
    sigma_max: the model is trained at every t), shifted like FlowMatchEuler shifts them."""
    scheduler = EDMScheduler.from_config(_flow_config(shift=3.0), solver="unipc")
    scheduler.set_timesteps(sigmas=[1.0, 0.99, 0.5, 0.25])
    torch.testing.assert_close(scheduler.sigmas.double(), torch.tensor([math.inf, 297.0, 3.0, 1.0, 0.0], dtype=torch.float64))
    scheduler.set_timesteps(timesteps=[1000.0, 500.0])
    assert scheduler.sigmas.tolist() == [math.inf, 1.0, 0.0]
    heun = EDMScheduler.from_config(_flow_config(shift=3.0))
    with pytest.raises(ValueError, match=r"timesteps.*\[0, 1000\)"):
        heun.set_timesteps(timesteps=[1000.0, 500.0])
    heun.set_timesteps(sigmas=[1.0, 0.5])
    assert heun.sigmas[0].item() == pytest.approx(80.0)


def test_scale_noise_at_pure_noise_is_the_noise():
    """img2img with strength 1 starts at the first call: x_t = (1 - t) y + t n at t = 1 is n."""
    scheduler = EDMScheduler.from_config(_flow_config(shift=3.0), solver="dpmpp_2m")
    scheduler.set_timesteps(5)
    scheduler.set_begin_index(0)
    y, n = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(scheduler.scale_noise(y, scheduler.timesteps[:1], n), n)


def test_bad_pure_noise_starts_are_refused_naming_why():
    denoiser = FlowDenoiser(exact_velocity)
    noise = torch.randn(1, 2, 4, 4)
    for solver in ("heun", "ipndm", "ipndm_v", "deis"):
        with pytest.raises(ValueError, match=f"solver '{solver}' cannot start"):
            samplers.sample(denoiser, noise, [math.inf, 1.0, 0.0], solver=solver)
    with pytest.raises(ValueError, match="infinite_sigma"):
        samplers.sample(GaussianOracle(torch.zeros(2, 4, 4), torch.ones(2, 4, 4)), noise, [math.inf, 1.0, 0.0], solver="unipc")
    with pytest.raises(ValueError, match="variant 'bh1'"):
        make_plan("unipc", [math.inf, 1.0, 0.1, 0.0], variant="bh1")
    vp = EDMScheduler(solver="unipc")
    with pytest.raises(ValueError, match="sigmas"):
        vp.set_timesteps(sigmas=[math.inf, 1.0, 0.0])
    assert set(FROM_NOISE) == {"euler", "dpmpp_2m", "dpmpp_3m", "unipc", "adams_alpha", "adams_alpha_adaptive"}


def test_scheduler_from_pure_noise_equals_the_core_sampler_with_a_network():
    """A network through the family's limit coefficients at t = 1: the scheduler in the SD3 loop
    and the core sampler over PreconditionedDenoiser agree for every solver that starts there."""
    for solver in FROM_NOISE:
        scheduler = EDMScheduler.from_config(_flow_config(shift=3.0), solver=solver)
        scheduler.set_timesteps(7)
        noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        out, _ = _sd3_loop(scheduler, exact_velocity, noise)
        ref = samplers.sample(PreconditionedDenoiser(exact_velocity, scheduler.family), noise, scheduler.sigmas.double(),
                              solver=solver)
        torch.testing.assert_close(out, ref.sample, rtol=1e-6, atol=1e-6)
