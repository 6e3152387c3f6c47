import math

import pytest
import torch
from diffusers import DDPMScheduler

from edm_sampling import schedules as S

EDM_GRID_18 = [80, 57.586, 40.786, 28.375, 19.352, 12.910, 8.4009, 5.3152, 3.2568, 1.9233, 1.0882, 0.58535,
               0.29644, 0.13952, 0.059947, 0.022935, 0.0075280, 0.002, 0]
IDDPM_GRID_18 = [80.2037, 9.68785, 5.06820, 3.41076, 2.53610, 1.98839, 1.60238, 1.32002, 1.09800, 0.913312,
                 0.759765, 0.625997, 0.504630, 0.395845, 0.294571, 0.198506, 0.104037, 0.00642541, 0]


def test_karras_grid_matches_spec_reference():
    grid = S.karras_sigmas(18, 0.002, 80.0, 7.0)
    assert grid.dtype == torch.float64 and len(grid) == 19
    torch.testing.assert_close(grid, torch.tensor(EDM_GRID_18, dtype=torch.float64), rtol=6e-5, atol=0)


def test_iddpm_table_and_grid_match_spec_reference():
    u = S.iddpm_u_table()
    assert len(u) == 1000 and bool((u[1:] < u[:-1]).all())
    assert u[0].item() == pytest.approx(20291, rel=1e-4)
    assert u[8].item() == pytest.approx(80.20, rel=1e-4)
    assert u[999].item() == pytest.approx(0.006425, rel=1e-4)
    grid = S.iddpm_sigmas(18, 0.002, 81.0)
    torch.testing.assert_close(grid, torch.tensor(IDDPM_GRID_18, dtype=torch.float64), rtol=6e-6, atol=0)


def test_vp_reference_values_inverse_and_derivative():
    assert S.vp_sigma(1e-3).item() == pytest.approx(0.0104860, rel=1e-5)
    assert S.vp_sigma(1.0).item() == pytest.approx(152.1670, rel=1e-6)
    assert S.vp_sigma(1e-5).item() == pytest.approx(0.00100050, rel=1e-5)
    t = torch.linspace(1e-4, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(S.vp_sigma_inv(S.vp_sigma(t)), t, rtol=1e-10, atol=1e-12)
    t, h = t[t > 1e-2], 1e-6
    finite_difference = (S.vp_sigma(t + h) - S.vp_sigma(t - h)) / (2 * h)
    torch.testing.assert_close(S.vp_sigma_deriv(t), finite_difference, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["vp", "ve", "linear"])
def test_schedule_families_are_consistent(name):
    schedule = S.SIGMA_SCHEDULES[name]
    t = torch.linspace(0.01, 1, 20, dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_inv(schedule.sigma(t)), t)
    h = 1e-6
    finite_difference = (schedule.sigma(t + h) - schedule.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(schedule.sigma_deriv(t), finite_difference, rtol=1e-6, atol=0)


def test_vp_scaling_derivative():
    t = torch.linspace(0.01, 1, 20, dtype=torch.float64)
    h = 1e-6
    s = lambda tt: S.VP_SCALING.s(tt, S.VP_SCHEDULE)  # noqa: E731
    torch.testing.assert_close(S.VP_SCALING.s_deriv(t, S.VP_SCHEDULE), (s(t + h) - s(t - h)) / (2 * h), rtol=1e-5, atol=1e-12)


def test_vp_and_ve_discretizations():
    vp = S.vp_sigmas(10)
    assert vp[0].item() == pytest.approx(152.1670, rel=1e-6) and vp[-2].item() == pytest.approx(0.0104860, rel=1e-5)
    fitted = S.vp_sigmas(10, 0.002, 80.0)
    assert fitted[0].item() == pytest.approx(80.0) and fitted[-2].item() == pytest.approx(0.002)
    ve = S.ve_sigmas(10)
    ratios = ve[1:-1] / ve[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.02 / 100) ** (1 / 9)))
    assert ve[0].item() == pytest.approx(100) and ve[-2].item() == pytest.approx(0.02) and ve[-1] == 0


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_match_diffusers(schedule):
    ours = S.alphas_cumprod_from_betas(S.betas_from_config(1000, 0.00085, 0.012, schedule))
    theirs = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=schedule).alphas_cumprod
    torch.testing.assert_close(ours.float(), theirs, rtol=2e-5, atol=1e-7)


def test_sigma_timestep_mapping():
    train = S.alphas_cumprod_to_sigmas(S.alphas_cumprod_from_betas(S.betas_from_config()))
    t = S.sigma_to_timestep(train[[0, 10, 500, 999]], train)
    torch.testing.assert_close(t, torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64))
    sigma = torch.logspace(-1.9, 2.1, 37, dtype=torch.float64)
    torch.testing.assert_close(S.timestep_to_sigma(S.sigma_to_timestep(sigma, train), train), sigma)
    rounded = S.sigma_to_timestep(sigma, train, "round").long()
    torch.testing.assert_close(train[rounded], S.snap_sigma(sigma, train))
    brute = torch.tensor([int(torch.argmin((train - s).abs())) for s in sigma])
    assert torch.equal(rounded, brute)
    with pytest.raises(ValueError, match="timestep_mapping"):
        S.sigma_to_timestep(sigma, train, "nearest")


def test_clamp_sigma_range():
    assert S.clamp_sigma_range(0.002, 80, 0.0100, 157.0) == (0.0100, 80)
    assert S.clamp_sigma_range(0.002, 80, 0.02, 50.0) == (0.02, 50.0)
    with pytest.raises(ValueError, match="does not overlap"):
        S.clamp_sigma_range(0.002, 0.005, 0.01, 100.0)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: S.karras_sigmas(0), "num_steps"),
        (lambda: S.karras_sigmas(2.5), "num_steps"),
        (lambda: S.karras_sigmas(10, sigma_min=80, sigma_max=0.002), "sigma_max"),
        (lambda: S.karras_sigmas(10, sigma_min=1, sigma_max=1), "sigma_max"),
        (lambda: S.karras_sigmas(10, sigma_min=-1), "sigma_min"),
        (lambda: S.karras_sigmas(10, rho=0), "rho"),
        (lambda: S.karras_sigmas(10, rho=-7), "rho"),
        (lambda: S.vp_sigmas(10, epsilon_s=1.5), "epsilon_s"),
        (lambda: S.discretization("cosine", 10, 0.002, 80), "discretization"),
        (lambda: S.betas_from_config(beta_schedule="sqrt"), "beta_schedule"),
    ],
)
def test_bad_input_names_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_single_step_grid():
    assert S.karras_sigmas(1).tolist() == [80.0, 0.0]
    assert math.isclose(S.ve_sigmas(1)[0].item(), 100.0)


def test_karras_grid_ends_are_exact():
    grid = S.karras_sigmas(18, 0.05, 50.0)
    assert grid[0].item() == 50.0 and grid[-2].item() == 0.05  # inclusive S_tmin / S_tmax bounds rely on it


def test_betas_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="beta_start / beta_end"):
        S.betas_from_config(beta_end=1.5)
    with pytest.raises(ValueError, match="trained_betas"):
        S.betas_from_config(trained_betas=[])
