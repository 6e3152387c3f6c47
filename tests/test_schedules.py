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


# --- named grids through sigma_grid -----------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in S.SCHEDULES if n != "gits"])
def test_every_named_schedule_is_a_decreasing_grid_ending_at_zero(name):
    grid = S.sigma_grid(name, 7, 0.01, 80.0)
    assert grid.dtype == torch.float64 and len(grid) == 8 and grid[-1] == 0
    assert bool((grid[1:] < grid[:-1]).all())
    if name == "iddpm":  # the table levels inside the range
        assert 70 < grid[0].item() <= 80.0 and grid[-2].item() >= 0.01
    else:
        assert grid[0].item() == pytest.approx(80.0)


def test_logsnr_is_geometric_and_ve_is_logsnr_on_the_ve_range():
    grid = S.sigma_grid("logsnr", 9, 0.01, 80.0)
    ratios = grid[1:-1] / grid[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.01 / 80.0) ** (1 / 8)))
    torch.testing.assert_close(S.sigma_grid("ve", 9), S.logsnr_sigmas(9, 0.02, 100.0))


def test_time_grids_are_uniform_in_the_models_time():
    """time_uniform: equal steps in the continuous VP t (default) or in a discrete model's train
    timestep (discrete_time_maps); time_quadratic: equal steps in sqrt(t)."""
    t = S.vp_sigma_inv(S.sigma_grid("time_uniform", 8, 0.01, 80.0)[:-1])
    torch.testing.assert_close(t.diff(), torch.full((7,), float(t.diff()[0]), dtype=torch.float64))
    root_t = S.vp_sigma_inv(S.sigma_grid("time_quadratic", 8, 0.01, 80.0)[:-1]).sqrt()
    torch.testing.assert_close(root_t.diff(), torch.full((7,), float(root_t.diff()[0]), dtype=torch.float64))
    train = S.alphas_cumprod_to_sigmas(S.alphas_cumprod_from_betas(S.betas_from_config()))
    to_t, to_sigma = S.discrete_time_maps(train)
    grid = S.sigma_grid("time_uniform", 10, float(train[0]), float(train[-1]), sigma_to_t=to_t, t_to_sigma=to_sigma)
    torch.testing.assert_close(S.sigma_to_timestep(grid[:-1], train), torch.linspace(999, 0, 10, dtype=torch.float64))


def test_ays_lists_are_the_published_ones_interpolated_and_mapped():
    for model, levels in S.AYS_SIGMAS.items():
        torch.testing.assert_close(S.sigma_grid("ays", 10, model=model), torch.tensor([*levels[:-1], 0.0], dtype=torch.float64))
    twenty = S.sigma_grid("ays", 20)  # 21 levels: every other one is a published level
    torch.testing.assert_close(twenty[0:-1:2], torch.tensor(S.AYS_SIGMAS["sd15"][:-1], dtype=torch.float64))
    assert twenty[1].item() == pytest.approx(math.sqrt(S.AYS_SIGMAS["sd15"][0] * S.AYS_SIGMAS["sd15"][1]))
    mapped = S.sigma_grid("ays", 10, 0.002, 80.0)  # same relative log positions on another range
    levels = torch.tensor(S.AYS_SIGMAS["sd15"], dtype=torch.float64)
    relative = (levels.log() - levels[-1].log()) / (levels[0].log() - levels[-1].log())
    torch.testing.assert_close((mapped[:-1].log() - math.log(0.002)) / math.log(80 / 0.002), relative[:-1])


def test_gits_exists_only_for_its_published_step_counts():
    torch.testing.assert_close(S.sigma_grid("gits", 6), torch.tensor([*S.GITS_SIGMAS[("cifar10", 6)][:-1], 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_steps=5"):
        S.sigma_grid("gits", 5)
    assert len(S.sigma_grid("gits", 5, interpolate=True)) == 6


def test_vp_refit_to_the_sampling_range():
    """For [0.002, 80] and epsilon_s = 1e-3 (issue 9 quotes beta_d = 17.538, beta_min = -0.00477):
    ln(sigma^2 + 1) = beta_d t^2 / 2 + beta_min t solved at t = 1 and t = epsilon_s."""
    beta_d, beta_min = S.vp_betas_for_range(0.002, 80.0, 1e-3)
    assert beta_d == pytest.approx(17.53796, abs=1e-5) and beta_min == pytest.approx(-0.004769, abs=1e-6)
    assert S.vp_sigma(1e-3, beta_d, beta_min).item() == pytest.approx(0.002, rel=1e-9)
    assert S.vp_sigma(1.0, beta_d, beta_min).item() == pytest.approx(80.0, rel=1e-12)
    assert S.vp_betas_for_range(*S.default_sigma_range("vp")) == pytest.approx((19.9, 0.1), rel=1e-9)


def test_default_ranges_are_the_papers():
    assert S.default_sigma_range("vp") == pytest.approx((0.0104860, 152.1670), rel=1e-5)
    assert S.default_sigma_range("ve") == (0.02, 100.0)
    assert S.default_sigma_range("iddpm") == (0.002, 81.0)
    assert S.default_sigma_range("karras") == S.default_sigma_range("logsnr") == (0.002, 80.0)
    assert S.default_sigma_range("ays", model="svd") == (0.002, 700.0)
    torch.testing.assert_close(S.sigma_grid("iddpm", 18), torch.tensor(IDDPM_GRID_18, dtype=torch.float64), rtol=6e-6, atol=0)


def test_user_grids_pass_through_after_checks():
    torch.testing.assert_close(S.sigma_grid([3.0, 1.0, 0.5]), torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    assert S.sigma_grid(torch.tensor([3.0, 1.0, 0.0]), 2, 0.5, 3.0).tolist() == [3.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: S.sigma_grid("cosine", 10), "schedule"),
        (lambda: S.sigma_grid([1.0, 2.0, 0.0]), "schedule must be strictly decreasing"),
        (lambda: S.sigma_grid([2.0, float("inf"), 0.0]), "schedule must be finite"),
        (lambda: S.sigma_grid([2.0, -1.0]), "schedule must be > 0"),
        (lambda: S.sigma_grid([200.0, 1.0, 0.0], sigma_min=0.01, sigma_max=80.0), "schedule span"),
        (lambda: S.sigma_grid([2.0, 1.0, 0.0], 5), "num_steps"),
        (lambda: S.sigma_grid([2.0, 1.0, 0.0], rho=7.0), "options"),
        (lambda: S.sigma_grid("karras", 10, foo=1), "foo"),
        (lambda: S.sigma_grid("karras", 10, rho=-1.0), "rho"),
        (lambda: S.sigma_grid("logsnr", 0), "num_steps"),
        (lambda: S.sigma_grid("ays", 10, model="sd3"), "model"),
        (lambda: S.sigma_grid("gits", 6, dataset="imagenet"), "dataset"),
        (lambda: S.sigma_grid("time_uniform", 5, sigma_to_t=lambda s: s), "together"),
        (lambda: S.sigma_grid("vp", 5, sigma_min=0.01), "together"),
    ],
)
def test_bad_schedule_requests_name_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()
