"""The adams_alpha solvers: Adams predictor-corrector with D interpolated in the signal fraction
alpha = sigma_data / sqrt(sigma_data^2 + sigma^2) (`solvers.adams_alpha_update`), and
adams_alpha_adaptive, which fits each sample's scale of alpha at every call
(`solvers.interpolation_scale`).

Exact answers: along the probability-flow trajectory of Gaussian data of std a, D - mu is
linear in alpha at sigma_data = a, so each step through two or more nodes lands on the
trajectory to quadrature precision (the first step, through one node, does not); for other
stds the error falls at the solver's order. Through EDMScheduler: near-exact in the SD3 loop
on unit-variance data, and the EDM family's sigma_data reaches the solver. The fitted scale is
the std of Gaussian data of one std, exactly, so adams_alpha_adaptive is near-exact for any such
data, per sample, in a mixed batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_flow import exact_velocity

from edm_sampling import samplers
from edm_sampling.denoisers import PreconditionedDenoiser
from edm_sampling.families import EDM
from edm_sampling.oracles import GaussianOracle
from edm_sampling.schedules import logsnr_sigmas
from edm_sampling.schedulers import EDMScheduler
from edm_sampling.solvers import (ADAPTIVE_SCALE_RANGE, adams_alpha_update, interpolation_scale, make_plan, motion_gram,
                                  signal_fraction)


def test_signal_fraction_ends_and_edm_form():
    assert signal_fraction(math.inf) == 0.0 and signal_fraction(0.0) == 1.0
    sigma = 1.7
    c_skip = float(EDM(0.5).coefficients(torch.tensor(sigma, dtype=torch.float64)).c_skip)
    assert signal_fraction(sigma, 0.5) == pytest.approx(math.sqrt(c_skip), rel=1e-12)


@pytest.mark.parametrize("order", [2, 3, 4])
def test_each_update_is_exact_for_gaussian_data_of_std_sigma_data(order):
    """From the exact state with exact D at the nodes (on the ODE's trajectory): the predictor
    (nodes sigma_i, sigma_i-1, ...; from pure noise too), the corrector (nodes sigma_next,
    sigma_i, ...) and the step to sigma = 0 land on the trajectory; with sigma_data off by 2x
    they do not (the test can fail)."""
    a = 0.7
    mu, n = 0.3, 1.1  # one coordinate: x(sigma) = mu + sqrt(a^2 + sigma^2) n, D = mu + a^2 n / sqrt(a^2 + sigma^2)

    def x_at(sigma: float) -> float:
        return n if sigma == math.inf else mu + math.sqrt(a**2 + sigma**2) * n

    def d_at(sigma: float) -> float:
        return mu if sigma == math.inf else mu + a**2 * n / math.sqrt(a**2 + sigma**2)

    grid = [math.inf, 12.0, 3.0, 0.9, 0.2, 0.0]
    for i in range(len(grid) - 1):
        sigma, sigma_next = grid[i], grid[i + 1]
        for nodes in (grid[i::-1][:order], grid[i + 1::-1][:order] if sigma_next > 0 else None):
            if nodes is None or len(nodes) < 2:
                continue
            for scale, close in ((a, True), (2 * a, False)):
                x_next = adams_alpha_update(x_at(sigma), [d_at(s) for s in nodes], nodes, sigma, sigma_next, scale)
                assert (abs(x_next - x_at(sigma_next)) < 1e-12) == close, (i, nodes, scale, x_next, x_at(sigma_next))


@pytest.mark.parametrize("nodes", [1, 2, 3, 4])
def test_local_error_falls_at_the_number_of_nodes_plus_one(nodes):
    """One predictor step from the exact state with exact D at `nodes` past levels (data of
    std 1.6, sigma_data = 1: D not linear in alpha): halving the step in lambda divides the
    error by at least about 2^(nodes + 1)."""
    a, mu, n = 1.6, 0.2, 1.0
    errors = []
    for h in (0.2, 0.1, 0.05):
        levels = [1.0 * math.exp(h * k) for k in range(nodes)]
        x_next = adams_alpha_update(mu + math.sqrt(a**2 + 1.0) * n, [mu + a**2 * n / math.sqrt(a**2 + s**2) for s in levels],
                                    levels, 1.0, math.exp(-h))
        errors.append(abs(x_next - (mu + math.sqrt(a**2 + math.exp(-2 * h)) * n)))
    slopes = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
    assert all(slope > nodes + 0.7 for slope in slopes), (errors, slopes)


@pytest.mark.parametrize("corrector", [False, True])
def test_global_error_is_second_order_with_two_nodes(corrector):
    """Data of std 1.6 with sigma_data = 1: doubling the steps of a logsnr grid divides the
    error of order 2 by about 4, with and without the corrector (whose Adams-Moulton step has
    the predictor's order and a smaller constant). Coarser grids are left out: there the error
    changes sign with N. (Higher orders: the first step, through one node, is second order
    globally, damped by the ODE; their local order is tested above.)"""
    order = 2
    oracle = GaussianOracle(torch.full((1, 1, 1), 0.2, dtype=torch.float64), torch.full((1, 1, 1), 1.6**2, dtype=torch.float64))
    noise = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    truth = oracle.ode_solution(noise * 80.0, 80.0, 0.0)
    errors = []
    for steps in (128, 256, 512):
        out = samplers.sample(oracle, noise, logsnr_sigmas(steps, 0.002, 80.0), solver="adams_alpha",
                              solver_options={"order": order, "corrector": corrector})
        errors.append(abs((out.sample - truth).item()))
    slopes = [math.log2(errors[k] / errors[k + 1]) for k in range(2)]
    assert all(order - 0.4 < slope < order + 0.7 for slope in slopes), (errors, slopes)


def test_near_exact_through_the_scheduler_in_the_sd3_loop_for_unit_variance_data():
    """A flow model of Gaussian data of std 1 (the flow family's data_std): EDMScheduler from an
    SD3 config, N(0, I) latents, pure-noise start, 6 calls: within 1e-3 of the ODE's solution
    (only the first step, through one node, is inexact); DPM-Solver++(2M) and UniPC on their
    grids are more than 30x further. Data of std 0.5 are not within 1e-3 (the test can fail)."""
    mean = 0.3 * torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def error(solver: str, shift: float, std: float) -> float:
        oracle = GaussianOracle(mean, torch.full_like(mean, std**2))
        scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=shift).config, solver=solver)
        scheduler.set_timesteps(6)
        assert math.isinf(float(scheduler.sigmas[0]))
        x = noise.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(exact_velocity(x, t.expand(x.shape[0]), oracle), t, x, return_dict=False)[0]
        return (x - (mean + std * noise)).abs().max().item()

    for shift in (1.0, 3.0):
        ours = error("adams_alpha", shift, 1.0)
        assert ours < 1e-3
        assert min(error("dpmpp_2m", shift, 1.0), error("unipc", shift, 1.0)) > 30 * ours
        assert error("adams_alpha", shift, 0.5) > 1e-3


def test_default_flow_grid_keeps_the_model_range():
    """adams_alpha's flow grid from pure noise: log-uniform from s (N - 1) to s / (N - 1)."""
    shift, n = 3.0, 9
    scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=shift).config, solver="adams_alpha")
    scheduler.set_timesteps(n)
    sigmas = scheduler.sigmas.double()
    assert math.isinf(float(sigmas[0])) and float(sigmas[-1]) == 0.0
    expected = torch.logspace(math.log10(shift * (n - 1)), math.log10(shift / (n - 1)), n - 1, dtype=torch.float64)
    torch.testing.assert_close(sigmas[1:-1], expected, rtol=1e-5, atol=0)


def test_edm_scheduler_interpolates_at_the_models_sigma_data():
    """EDMScheduler hands the EDM family's sigma_data to the solver: its samples are the core
    sampler's with sigma_data = 0.5 given explicitly (to a denoiser without a family), not those
    with the default 1."""
    a = 0.5
    mean = 0.2 * torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    oracle = GaussianOracle(mean, torch.full((2, 4, 4), 0.3**2, dtype=torch.float64))
    family = EDM(sigma_data=a)

    def net(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        sigma = torch.exp(4 * c_noise.double()).reshape(-1, 1, 1, 1)
        c = family.coefficients(sigma)
        x = x_in.double() / c.c_in
        return (oracle(x, sigma.flatten()) - c.c_skip * x) / c.c_out

    scheduler = EDMScheduler(model_family="edm", sigma_data=a, solver="adams_alpha")
    scheduler.set_timesteps(7)
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t.expand(x.shape[0])), t, x, return_dict=False)[0]
    grid = scheduler.sigmas.double()
    at_half = samplers.sample(oracle, noise, grid, solver="adams_alpha", solver_options={"sigma_data": a}).sample
    at_one = samplers.sample(oracle, noise, grid, solver="adams_alpha").sample
    torch.testing.assert_close(x, at_half, rtol=1e-6, atol=1e-6)
    assert (x - at_one).abs().max() > 1e-4
    core = samplers.sample(PreconditionedDenoiser(net, family), noise, grid, solver="adams_alpha")
    torch.testing.assert_close(core.sample, at_half, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "options, name",
    [({"order": 5}, "order"), ({"order": 0}, "order"), ({"sigma_data": 0.0}, "sigma_data"),
     ({"sigma_data": float("nan")}, "sigma_data"), ({"sigma_data": "1"}, "sigma_data"),
     ({"corrector": "yes"}, "corrector"), ({"final_step": "exact"}, "final_step"), ({"afs": True}, "afs")],
)
@pytest.mark.parametrize("solver", ["adams_alpha", "adams_alpha_adaptive"])
def test_bad_options_are_refused_naming_them(options, name, solver):
    with pytest.raises(ValueError, match=name):
        make_plan(solver, [80.0, 1.0, 0.0], **options)


def _gaussian_outputs(stds: list[float], sigmas: list[float]) -> list[torch.Tensor]:
    """D along the ODE trajectories of Gaussian data N(mu, a^2) per sample (a = stds[b]) at `sigmas`:
    D = mu + a^2 n / sqrt(a^2 + sigma^2)."""
    mu = 0.4 * torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = torch.randn(len(stds), 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = torch.tensor(stds, dtype=torch.float64).reshape(-1, 1, 1, 1)
    return [mu + a**2 * n / torch.sqrt(a**2 + sigma**2) for sigma in sigmas]


@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_interpolation_scale_is_exact_for_gaussian_data_of_one_std(sigma_data):
    """Per sample, the scale on which D_i lies on the line in alpha through D_{i-1}, D_{i-2} is the
    data's std, for stds from 0.05 to 3 around the nodes, from pure noise too (D at sigma = inf is
    the mean); a weight out of reach takes the nearer end of the range; outputs that do not move
    keep sigma_data. The result does not depend on the batch's other samples."""
    for stds, sigmas in (([0.2, 0.37, 1.0, 3.0], [0.8, 2.5, 7.0]), ([0.05, 0.37, 1.0, 3.0], [0.1, 0.3, math.inf])):
        outputs = _gaussian_outputs(stds, sigmas)
        scales = interpolation_scale(motion_gram(outputs), sigmas[1:], sigmas[0], sigma_data)
        np.testing.assert_allclose(scales, stds, rtol=1e-9)
        alone = interpolation_scale(motion_gram([d[1:2] for d in outputs]), sigmas[1:], sigmas[0], sigma_data)
        assert alone[0] == scales[1]
    far = _gaussian_outputs([1e4 * sigma_data], [0.8, 2.5, 7.0])
    assert interpolation_scale(motion_gram(far), [2.5, 7.0], 0.8, sigma_data)[0] == pytest.approx(
        ADAPTIVE_SCALE_RANGE * sigma_data, rel=1e-9)
    still = [torch.ones(2, 2, 3, 3, dtype=torch.float64)] * 3
    assert (interpolation_scale(motion_gram(still), [2.5, 7.0], 0.8, sigma_data) == sigma_data).all()


def test_adaptive_steps_are_the_linear_ones_at_sigma_data_where_nothing_is_learned():
    """The first two calls do not adapt (fewer than three outputs); a later step's adapt on outputs
    that do not move gives the linear plan's updates at sigma_data, and its look-back is kept."""
    grid = [math.inf, 20.0, 5.0, 1.0, 0.3, 0.0]
    fixed = make_plan("adams_alpha", grid, sigma_data=0.5)
    adaptive = make_plan("adams_alpha_adaptive", grid, sigma_data=0.5)
    assert [s.adapt is None for s in adaptive.steps] == [True, True, False, False, False]
    assert [s.updates for s in adaptive.steps] == [s.updates for s in fixed.steps]
    assert adaptive.denoised_history == 3 and make_plan("adams_alpha_adaptive", grid, order=2).denoised_history == 3
    still = motion_gram([torch.ones(2, 5, dtype=torch.float64)] * 3)
    for step, linear in zip(adaptive.steps[2:], fixed.steps[2:]):
        for update, reference in zip(step.adapt(still), linear.updates):
            for values, expected in ((update.states, reference.states), (update.denoised, reference.denoised)):
                assert len(values) == len(expected)
                for value, scalar in zip(values, expected):
                    np.testing.assert_allclose(np.broadcast_to(value, 2), scalar, rtol=1e-12)


class _PerSampleGaussians:
    """Sample b's data ~ N(mean, stds[b]^2) per pixel: a batch of different models for exact_velocity."""

    def __init__(self, mean: torch.Tensor, stds: list[float]):
        self.mean = mean
        self.variance = torch.tensor(stds, dtype=torch.float64).reshape(-1, 1, 1, 1) ** 2


def test_adaptive_is_near_exact_per_sample_for_any_std_through_the_scheduler():
    """The SD3 loop through EDMScheduler (shift 3), 8 calls from pure noise, a batch whose samples
    come from Gaussians of std 0.3, 1 and 2.5: adams_alpha_adaptive lands within 2e-3 of each
    sample's ODE solution, adams_alpha (sigma_data = 1 for all) is 50x further on the other stds,
    and each sample's result is the one it gets alone (the scale is fitted per sample)."""
    mean = 0.3 * torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stds = [0.3, 1.0, 2.5]
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    truth = mean + torch.tensor(stds, dtype=torch.float64).reshape(-1, 1, 1, 1) * noise

    def run(solver: str, rows: list[int]) -> torch.Tensor:
        data = _PerSampleGaussians(mean, [stds[r] for r in rows])
        scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver=solver)
        scheduler.set_timesteps(8)
        x = noise[rows].clone()
        for t in scheduler.timesteps:
            x = scheduler.step(exact_velocity(x, t.expand(x.shape[0]), data), t, x, return_dict=False)[0]
        return x

    errors = (run("adams_alpha_adaptive", [0, 1, 2]) - truth).flatten(1).abs().amax(1)
    fixed = (run("adams_alpha", [0, 1, 2]) - truth).flatten(1).abs().amax(1)
    assert (errors < 2e-3).all(), errors
    assert (fixed[[0, 2]] > 50 * errors[[0, 2]]).all(), (fixed, errors)
    together = run("adams_alpha_adaptive", [0, 1, 2])
    for row in range(3):
        torch.testing.assert_close(together[row : row + 1], run("adams_alpha_adaptive", [row]), rtol=1e-12, atol=1e-12)


def test_adaptive_core_sampler_from_sigma_max_in_float32():
    """A grid from sigma_max = 80 with float32 states, data of std 0.2: the core sampler keeps
    float32 and lands within 1e-4 of the ODE's solution (float32 rounding), where adams_alpha at
    sigma_data = 1 is 1e-2 off (scheduler = core: tests/test_scheduler_solvers.py)."""
    mean = torch.zeros(2, 4, 4, dtype=torch.float64)
    oracle = GaussianOracle(mean, torch.full((2, 4, 4), 0.2**2, dtype=torch.float64))
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    grid = logsnr_sigmas(8, 0.01, 80.0)
    truth = oracle.ode_solution(80.0 * noise.double(), 80.0, 0.0)
    adaptive = samplers.sample(oracle, noise, grid, solver="adams_alpha_adaptive").sample
    fixed = samplers.sample(oracle, noise, grid, solver="adams_alpha").sample
    assert adaptive.dtype == torch.float32
    assert (adaptive.double() - truth).abs().max() < 1e-4 < 1e-2 < (fixed.double() - truth).abs().max()
