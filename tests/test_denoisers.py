"""Each adapter, fed a network that returns the exact answer in its own parameterization,
reproduces the exact D of a Gaussian oracle."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from edm_sampling import denoisers as D
from edm_sampling.oracles import FiniteDataOracle, GaussianOracle, builtin_gaussian
from edm_sampling.schedules import timestep_to_sigma, vp_sigma

ORACLE = builtin_gaussian()


def gaussian_batch(batch=6, seed=0):
    return torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("mapping", ["round", "interpolate"])
def test_discrete_vp_adapter_is_exact(prediction_type, mapping):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = scheduler.alphas_cumprod.double()  # diffusers' own (float32) table: an independent path to sigma
    if mapping == "interpolate":  # fractional timesteps: compare against the float64 table (checked in test_schedules)
        from edm_sampling.schedules import alphas_cumprod_from_betas, betas_from_config

        abar = alphas_cumprod_from_betas(betas_from_config(1000, 0.00085, 0.012, "scaled_linear"))

    def net(x_vp, t):
        a = timestep_to_sigma(t, ((1 - abar) / abar).sqrt()).reshape(-1, 1, 1, 1)
        abar_t = 1 / (a**2 + 1)
        x_edm = x_vp / abar_t.sqrt()
        y = ORACLE(x_edm, a.flatten())
        eps = (x_vp - abar_t.sqrt() * y) / (1 - abar_t).sqrt()
        return {"epsilon": eps, "v_prediction": abar_t.sqrt() * eps - (1 - abar_t).sqrt() * y, "sample": y}[prediction_type]

    denoiser = D.DiscreteVPDenoiser.from_scheduler_config(net, scheduler.config, prediction_type=prediction_type, timestep_mapping=mapping)
    x = gaussian_batch()
    train = ((1 - abar) / abar).sqrt()
    sigma = train[[3, 100, 400, 700, 900, 999]] if mapping == "round" else torch.tensor([0.03, 0.2, 1.0, 3.7, 11.0, 14.0], dtype=torch.float64)
    x = x * (sigma.reshape(-1, 1, 1, 1) ** 2 + 1).sqrt()
    torch.testing.assert_close(denoiser(x, sigma), ORACLE(x, sigma), rtol=1e-8, atol=1e-8)
    # diffusers' table is float32, ours float64
    assert denoiser.sigma_min == pytest.approx(float(train[0]), rel=1e-4)
    assert denoiser.sigma_max == pytest.approx(float(train[-1]), rel=1e-4)


def test_round_sigma_snaps_to_trained_levels():
    denoiser = D.DiscreteVPDenoiser.from_scheduler_config(lambda x, t: x, DDPMScheduler().config, timestep_mapping="round")
    snapped = denoiser.round_sigma(torch.tensor([0.5, 3.0, 70.0], dtype=torch.float64))
    for value in snapped:
        assert torch.isclose(denoiser.train_sigmas, value).any()
    interp = D.DiscreteVPDenoiser.from_scheduler_config(lambda x, t: x, DDPMScheduler().config)
    assert interp.round_sigma(torch.tensor([0.5])).item() == 0.5


def test_continuous_vp_adapter_is_exact():
    def net(x_in, c_noise):
        sigma = vp_sigma(c_noise / 999).reshape(-1, 1, 1, 1)
        x = x_in * (sigma**2 + 1).sqrt()
        return (x - ORACLE(x, sigma.flatten())) / sigma

    denoiser = D.ContinuousVPDenoiser(net)
    sigma = torch.tensor([0.002, 0.1, 1.0, 5.0, 40.0, 150.0], dtype=torch.float64)
    x = gaussian_batch() * sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(denoiser(x, sigma), ORACLE(x, sigma), rtol=1e-8, atol=1e-8)
    assert denoiser.sigma_min == pytest.approx(0.00100050, rel=1e-5) and denoiser.sigma_max == pytest.approx(152.1670)


def test_ve_adapter_is_exact():
    def net(x, sigma):  # diffusers' fourier UNet convention: a score, already divided by sigma
        s = sigma.reshape(-1, 1, 1, 1)
        return (ORACLE(x, sigma) - x) / s**2

    denoiser = D.VEDenoiser(net)
    sigma = torch.tensor([0.02, 0.1, 1.0, 5.0, 40.0, 100.0], dtype=torch.float64)
    x = gaussian_batch() * sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(denoiser(x, sigma), ORACLE(x, sigma), rtol=1e-8, atol=1e-8)


def test_ve_adapter_with_real_fourier_unet():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, time_embedding_type="fourier")
    x = torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.5, 7.0])
    with torch.no_grad():
        expected = x + sigma.reshape(-1, 1, 1, 1) ** 2 * unet(x, sigma).sample
        torch.testing.assert_close(D.VEDenoiser(unet)(x, sigma), expected)


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_edm_adapter_is_exact(sigma_data):
    def net(x_in, c_noise):
        sigma = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        x = x_in * (sigma**2 + sigma_data**2).sqrt()
        return (ORACLE(x, sigma.flatten()) - c_skip * x) / c_out

    denoiser = D.EDMDenoiser(net, sigma_data=sigma_data)
    sigma = torch.tensor([0.002, 0.1, 1.0, 5.0, 40.0, 80.0], dtype=torch.float64)
    x = gaussian_batch() * sigma.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(denoiser(x, sigma), ORACLE(x, sigma), rtol=1e-8, atol=1e-8)


def test_coefficients_match_table_1():
    s = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    c = D.edm_coefficients(s, 0.5)
    torch.testing.assert_close(c.c_skip, 0.25 / (s**2 + 0.25))
    torch.testing.assert_close(c.c_out, s * 0.5 / (0.25 + s**2) ** 0.5)
    torch.testing.assert_close(c.c_in, 1 / (s**2 + 0.25) ** 0.5)
    # v-prediction is EDM preconditioning with sigma_data = 1 and a flipped sign of c_out
    v, e = D.vp_coefficients(s, "v_prediction"), D.edm_coefficients(s, 1.0)
    torch.testing.assert_close(v.c_skip, e.c_skip)
    torch.testing.assert_close(v.c_out, -e.c_out)
    torch.testing.assert_close(D.edm_c_noise(s), torch.log(s) / 4)
    torch.testing.assert_close(D.ve_c_noise(s), torch.log(s / 2))


def test_conditioning_kwargs_reach_the_network():
    seen = {}

    def net(x, t, class_labels=None, encoder_hidden_states=None):
        seen.update(class_labels=class_labels, encoder_hidden_states=encoder_hidden_states)
        return torch.zeros_like(x)

    labels, states = torch.tensor([3, 7]), torch.zeros(2, 4, 8)
    D.EDMDenoiser(net)(torch.zeros(2, 1, 4, 4), torch.tensor([1.0, 2.0]), class_labels=labels, encoder_hidden_states=states)
    assert seen["class_labels"] is labels and seen["encoder_hidden_states"] is states


@pytest.mark.parametrize("net_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_network_returns_callers_dtype(net_dtype):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    x = torch.randn(2, 1, 8, 8) * 3
    sigma = torch.tensor([3.0, 3.0])
    with torch.no_grad():
        full = D.DiscreteVPDenoiser.from_scheduler_config(unet, DDPMScheduler().config)(x, sigma)
        half = D.DiscreteVPDenoiser.from_scheduler_config(unet.to(net_dtype), DDPMScheduler().config)(x, sigma)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.1)


def test_bad_adapter_input():
    with pytest.raises(ValueError, match="prediction_type"):
        D.DiscreteVPDenoiser(lambda x, t: x, DDPMScheduler().alphas_cumprod, prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_mapping"):
        D.DiscreteVPDenoiser(lambda x, t: x, DDPMScheduler().alphas_cumprod, timestep_mapping="floor")
    with pytest.raises(ValueError, match="sigma_data"):
        D.EDMDenoiser(lambda x, t: x, sigma_data=0)


def test_finite_data_oracle_matches_direct_sum():
    points = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    oracle = FiniteDataOracle(points, chunk_size=2)
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigma = torch.linspace(0.05, 3, 7, dtype=torch.float64)
    expected = []
    for xi, si in zip(x, sigma):
        logits = torch.stack([-((xi - y) ** 2).sum() / (2 * si**2) for y in points])
        expected.append((torch.softmax(logits, 0)[:, None] * points).sum(0))
    torch.testing.assert_close(oracle(x, sigma), torch.stack(expected))


def test_gaussian_oracle_ode_solution_solves_the_ode():
    oracle = GaussianOracle(torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0]))
    x = torch.tensor([[2.0, 1.0]], dtype=torch.float64)
    sigma = 1.5
    h = 1e-6
    numeric = (oracle.ode_solution(x, sigma, sigma + h) - oracle.ode_solution(x, sigma, sigma - h)) / (2 * h)
    torch.testing.assert_close(numeric, (x - oracle(x, sigma)) / sigma, rtol=1e-6, atol=1e-9)
