"""The samplers against exact answers: the Gaussian oracle's closed-form ODE solution,
convergence orders, exact NFE, churn statistics and per-sample seeds."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from edm_sampling import samplers as SM
from edm_sampling.denoisers import DiscreteVPDenoiser
from edm_sampling.oracle_unet import OracleUNet2DModel
from edm_sampling.oracles import GaussianOracle, builtin_gaussian
from edm_sampling.schedules import karras_sigmas

ORACLE = builtin_gaussian()


class Recorder:
    """Counts and records every call of a denoiser."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, []
        self.round_sigma = getattr(denoiser, "round_sigma", None)
        self.sigma_min, self.sigma_max = getattr(denoiser, "sigma_min", 0.0), getattr(denoiser, "sigma_max", math.inf)

    def __call__(self, x, sigma, **kwargs):
        self.calls.append((x.clone(), sigma.clone(), kwargs))
        return self.denoiser(x, sigma, **kwargs)


def latents(batch=8, seed=0, shape=(1, 8, 8)):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def error_slope(solver, steps):
    z = latents()
    exact = ORACLE.ode_solution(z * 80.0, 80.0, 0.0)
    errors = [(SM.sample(ORACLE, z, karras_sigmas(n), solver=solver).sample - exact).abs().max().item() for n in steps]
    nfes = [2 * n - 1 if solver == "heun" else n for n in steps]
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0], errors


def test_heun_converges_to_the_exact_ode_solution_at_second_order():
    slope, errors = error_slope("heun", [8, 16, 32, 64])
    assert 1.8 < slope < 2.4, (slope, errors)
    assert errors[-1] < 1e-2


def test_euler_converges_at_first_order():
    slope, errors = error_slope("euler", [8, 16, 32, 64])
    assert 0.8 < slope < 1.2, (slope, errors)


@pytest.mark.parametrize("solver, n, expected", [("heun", 18, 35), ("heun", 1, 1), ("euler", 18, 18)])
def test_exact_nfe(solver, n, expected):
    model = Recorder(ORACLE)
    out = SM.sample(model, latents(2), karras_sigmas(n), solver=solver)
    assert out.nfe == expected == len(model.calls)


def test_alpha_generalized_step_is_second_order_and_alpha_one_is_heun():
    z = latents()
    exact = ORACLE.ode_solution(z * 80.0, 80.0, 0.0)
    errors = [(SM.sample(ORACLE, z, karras_sigmas(n), alpha=0.5).sample - exact).abs().max().item() for n in (16, 32, 64)]
    slope = -np.polyfit(np.log([16, 32, 64]), np.log(errors), 1)[0]
    assert slope > 1.7, (slope, errors)  # second order (or better, on this linear ODE)
    torch.testing.assert_close(SM.sample(ORACLE, z, karras_sigmas(8), alpha=1.0).sample, SM.sample_heun(ORACLE, z, karras_sigmas(8)).sample)


def test_ablation_sampler_linear_equals_sample_and_vp_ode_converges():
    z = latents()
    for solver in ("heun", "euler"):
        ours = SM.sample(ORACLE, z, karras_sigmas(12), solver=solver).sample
        general = SM.sample_ablation(ORACLE, z, 12, solver=solver).sample
        torch.testing.assert_close(general, ours, rtol=1e-10, atol=1e-10)
    exact = ORACLE.ode_solution(z * 80.0, 80.0, 0.0)
    vp_errors = [(SM.sample_ablation(ORACLE, z, n, schedule="vp", scaling="vp").sample - exact).abs().max().item() for n in (16, 32, 64)]
    assert vp_errors[2] < vp_errors[1] < vp_errors[0] and vp_errors[2] < 0.02
    ve_runs = [SM.sample_ablation(ORACLE, z, n, discretization_name="ve", schedule="ve") for n in (32, 64, 128)]
    ve_exact = ORACLE.ode_solution(z * 100.0, 100.0, 0.0)  # VE's own range starts at 100
    ve_errors = [(out.sample - ve_exact).abs().max().item() for out in ve_runs]
    assert ve_runs[0].sigmas[0].item() == 100.0
    assert ve_errors[2] < ve_errors[1] < ve_errors[0] and ve_errors[2] < 0.05


@pytest.mark.parametrize(
    "discretization, first, last",
    [("vp", 152.1670, 0.0104860), ("ve", 100.0, 0.02), ("iddpm", 80.2037, 0.00642541), ("karras", 80.0, 0.002)],
)
def test_ablation_grids_default_to_the_papers_ranges(discretization, first, last):
    model = Recorder(ORACLE)
    SM.sample_ablation(model, latents(1), 6, discretization_name=discretization, solver="euler")
    called = [sigma[0].item() for _, sigma, _ in model.calls]
    assert called[0] == pytest.approx(first, rel=1e-5) and called[-1] == pytest.approx(last, rel=1e-5)


def test_ablation_vp_schedule_is_refitted_to_the_sampling_range():
    """With schedule "vp" the ODE's sigma(t) uses the betas refitted to [sigma_min, sigma_max]
    (17.538, -0.00477 for [0.002, 80]), so the VP grid is uniform in that t and Heun's alpha = 1/2
    midpoints sit at sigma_VP((t_i + t_{i+1}) / 2) of the refitted schedule."""
    from edm_sampling.schedules import vp_betas_for_range, vp_sigma

    model = Recorder(ORACLE)
    n = 5
    SM.sample_ablation(model, latents(1), n, discretization_name="vp", schedule="vp", scaling="vp", sigma_min=0.002,
                       sigma_max=80.0, solver="heun", alpha=0.5)
    betas = vp_betas_for_range(0.002, 80.0, 1e-3)
    t = [1 + i / (n - 1) * (1e-3 - 1) for i in range(n)]
    first = [sigma[0].item() for _, sigma, _ in model.calls[0::2]]
    midpoints = [sigma[0].item() for _, sigma, _ in model.calls[1::2]]
    assert first == pytest.approx([vp_sigma(ti, *betas).item() for ti in t], rel=1e-9)
    assert midpoints == pytest.approx([vp_sigma((a + b) / 2, *betas).item() for a, b in zip(t, t[1:])], rel=1e-9)


def test_churn_samples_match_the_data_distribution():
    """Mean within 5 standard errors, variance within 5% (5 standard errors of a variance
    estimate from 20000 samples). sigma_max = 1000 makes the pure-noise prior's bias,
    mu sqrt(lam / (lam + sigma_max^2)), negligible. The churned sampler's own discretization
    error shrinks about linearly in N (measured excess variance of the smallest-variance
    dimension: 12% at 64 steps, 7% at 128, 0.1% at 256), so 256 steps are used."""
    mean, variance = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.25, 4.0, 0.01])
    oracle = GaussianOracle(mean, variance)
    n = 20000
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = karras_sigmas(256, 0.002, 1000.0)
    out = SM.sample(oracle, z, sigmas, s_churn=40, s_tmin=0.05, s_tmax=50, s_noise=1.003,
                    generator=torch.Generator().manual_seed(2))
    x = out.sample
    standard_error = (variance / n).sqrt().double()
    assert ((x.mean(0) - mean.double()).abs() < 5 * standard_error).all(), x.mean(0)
    torch.testing.assert_close(x.var(0), variance.double(), rtol=0.05, atol=0)
    deterministic = SM.sample(oracle, z, sigmas).sample
    assert (x - deterministic).abs().mean() > 0.05  # churn really adds noise


def test_model_is_evaluated_at_x_hat_and_sigma_hat():
    model = Recorder(ORACLE)
    sigmas = karras_sigmas(6)
    s_churn, s_tmin, s_tmax, s_noise = 2.0, 0.05, 50.0, 1.007
    z = latents(3)
    steps = []
    SM.sample(model, z, sigmas, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise,
              generator=torch.Generator().manual_seed(5), callback=steps.append)
    gammas = SM.churn_gammas(sigmas, s_churn, s_tmin, s_tmax)
    assert gammas[0] == 0 and gammas[1] == pytest.approx(2.0 / 6) and gammas[-1] == 0
    replay = torch.Generator().manual_seed(5)
    first_calls = [model.calls[2 * i] for i in range(6)]  # Heun: two calls per step, one on the last
    for i in range(1, 6):
        x_i, sigma_i = steps[i - 1]["x"], sigmas[i].item()
        sigma_hat = sigma_i * (1 + gammas[i])
        x_hat = x_i
        if gammas[i] > 0:
            x_hat = x_i + math.sqrt(sigma_hat**2 - sigma_i**2) * s_noise * torch.randn(x_i.shape, generator=replay, dtype=x_i.dtype)
        torch.testing.assert_close(first_calls[i][1], torch.full((3,), sigma_hat, dtype=torch.float64))
        torch.testing.assert_close(first_calls[i][0], x_hat)


def test_first_churn_is_folded_into_the_starting_noise():
    model = Recorder(ORACLE)
    sigmas = karras_sigmas(4)
    z = latents(2)
    SM.sample(model, z, sigmas, s_churn=4.0, s_noise=1.01, generator=torch.Generator().manual_seed(0))
    sigma_hat_0 = 80.0 * (1 + min(4.0 / 4, math.sqrt(2) - 1))
    std = math.sqrt(80.0**2 + (sigma_hat_0**2 - 80.0**2) * 1.01**2)
    assert model.calls[0][1][0].item() == pytest.approx(sigma_hat_0)
    torch.testing.assert_close(model.calls[0][0], z * std)


def test_per_sample_seeds_make_samples_independent_of_batch_size():
    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        z = torch.cat([torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64) for g in gens])
        return SM.sample(ORACLE, z, karras_sigmas(8), s_churn=10, generator=gens).sample

    big, small = run([11, 12, 13]), run([12])
    torch.testing.assert_close(big[1:2], small)
    assert not torch.allclose(big[0], big[1])


def test_randn_matches_diffusers_randn_tensor():
    for generator in (torch.Generator().manual_seed(3), [torch.Generator().manual_seed(s) for s in (1, 2, 3)]):
        clone = ([torch.Generator().manual_seed(s) for s in (1, 2, 3)] if isinstance(generator, list) else torch.Generator().manual_seed(3))
        torch.testing.assert_close(SM.randn((3, 2, 4, 4), generator), randn_tensor((3, 2, 4, 4), generator=clone))


def test_round_sigma_keeps_every_evaluation_on_trained_levels():
    unet = OracleUNet2DModel(dataset="gaussian")
    denoiser = DiscreteVPDenoiser.from_scheduler_config(unet, DDPMScheduler().config, timestep_mapping="round")
    model = Recorder(denoiser)
    out = SM.sample(model, latents(2).float(), karras_sigmas(6, 0.01, 80), s_churn=5, generator=torch.Generator().manual_seed(0))
    train = denoiser.train_sigmas
    for _, sigma, _ in model.calls[::2]:  # the first call of each step is at sigma_hat
        assert torch.isclose(train, sigma[0].double(), rtol=1e-6).any()
    assert torch.isfinite(out.sample).all()


def test_oracle_unet_in_sampler_matches_oracle():
    unet = OracleUNet2DModel(dataset="gaussian")
    denoiser = DiscreteVPDenoiser.from_scheduler_config(unet, DDPMScheduler().config)
    z = latents(4)
    sigmas = karras_sigmas(10, denoiser.sigma_min, 80.0)
    via_unet = SM.sample(denoiser, z, sigmas, state_dtype=torch.float64).sample
    direct = SM.sample(unet.oracle.double(), z, sigmas, state_dtype=torch.float64).sample
    torch.testing.assert_close(via_unet, direct, rtol=1e-4, atol=1e-4)


def test_options_state_dtype_callback_and_kwargs():
    seen = []
    model = lambda x, sigma, label=None: (seen.append(label), ORACLE(x, sigma))[1]  # noqa: E731
    out = SM.sample(model, latents(2).float(), karras_sigmas(3), state_dtype=torch.float64,
                    model_kwargs={"label": 7}, callback=lambda info: seen.append(info["i"]))
    assert out.sample.dtype == torch.float64 and 7 in seen and [s for s in seen if s != 7] == [0, 1, 2]
    assert SM.sample(ORACLE, latents(2).float(), karras_sigmas(3)).sample.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sigmas": [80.0, 90.0, 0.0]}, "decreasing"),
        ({"sigmas": [80.0]}, "sigmas"),
        ({"sigmas": [80.0, 0.0, 0.0]}, "decreasing"),
        ({"s_churn": -1.0}, "s_churn"),
        ({"s_noise": 0.0}, "s_noise"),
        ({"s_tmin": 5.0, "s_tmax": 1.0}, "s_tmax"),
        ({"solver": "rk4"}, "solver"),
        ({"alpha": 0.0}, "alpha"),
        ({"generator": [torch.Generator(), torch.Generator()]}, "generator"),
    ],
)
def test_bad_input_is_rejected_before_any_model_call(kwargs, name):
    model = Recorder(ORACLE)
    kwargs = {"sigmas": karras_sigmas(4), **kwargs}
    with pytest.raises(ValueError, match=name):
        SM.sample(model, latents(3), **kwargs)
    assert model.calls == []


def test_non_finite_model_output_names_step_and_sigma():
    def broken(x, sigma):
        return torch.where(sigma.reshape(-1, 1, 1, 1) < 1.0, torch.full_like(x, float("nan")), x * 0)

    with pytest.raises(SM.NonFiniteOutputError, match=r"step \d+ \(sigma = 0\.\d+"):
        SM.sample(broken, latents(2), karras_sigmas(10))


def test_learned_variance_output_is_reduced_to_its_prediction():
    unet = OracleUNet2DModel(dataset="gaussian")

    def with_variance(x, t):
        eps = unet(x, t).sample
        return torch.cat([eps, torch.full_like(eps, 7.0)], dim=1)  # ADM-style [eps, variance]

    config = DDPMScheduler(variance_type="learned_range").config
    plain = DiscreteVPDenoiser.from_scheduler_config(unet, config)
    learned = DiscreteVPDenoiser.from_scheduler_config(with_variance, config)
    z, sigmas = latents(2).float(), karras_sigmas(4, 0.01, 80)
    torch.testing.assert_close(SM.sample(learned, z, sigmas).sample, SM.sample(plain, z, sigmas).sample)


def test_sigma_hat_is_capped_at_the_models_sigma_max():
    unet = OracleUNet2DModel(dataset="gaussian", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    model = Recorder(DiscreteVPDenoiser.from_scheduler_config(unet, config))
    sigma_max = model.denoiser.sigma_max  # ~14.6, Stable Diffusion's range
    sigmas = SM.denoiser_sigmas(model.denoiser, 6)
    out = SM.sample(model, latents(2).float(), sigmas, s_churn=40, generator=torch.Generator().manual_seed(0))
    assert max(out.sigma_hats) <= sigma_max and out.sigma_hats[0] == pytest.approx(sigma_max)
    assert out.sigma_hats[1] > sigmas[1].item()  # later steps keep their churn
    for x, sigma, _ in model.calls:  # every evaluation inside the range the model was trained on
        assert sigma.max().item() <= sigma_max * (1 + 1e-6)


def test_grid_outside_the_models_range_is_rejected():
    denoiser = DiscreteVPDenoiser.from_scheduler_config(OracleUNet2DModel(dataset="gaussian"), DDPMScheduler().config)
    with pytest.raises(ValueError, match="model supports"):
        SM.sample(denoiser, latents(1).float(), karras_sigmas(4, 0.002, 80.0))  # 0.002 < sigma_min ~ 0.01
    with pytest.raises(ValueError, match="state_dtype"):
        SM.sample(ORACLE, latents(1), karras_sigmas(4), state_dtype=torch.int32)


@pytest.mark.parametrize("solver", ["heun", "unipc"])
def test_sampling_keeps_no_autograd_graph(solver):
    """A trainable network (parameters requiring grad) sampled outside torch.no_grad(): the
    sampler must not build a graph through its model calls (memory grows with every call)."""
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    seen = []

    def denoiser(x, sigma):
        out = net(x)
        seen.append(out.requires_grad)
        return out

    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = SM.sample(denoiser, latents, [80.0, 5.0, 0.5, 0.0], solver=solver)
    assert not out.sample.requires_grad and out.sample.grad_fn is None
    assert seen and not any(seen)
