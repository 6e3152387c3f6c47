"""EDMScheduler: config mapping and round-trips, the call plan, dtype handling, bad input.

Equality with the core sampler inside real diffusers pipelines is in test_pipelines.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    ScoreSdeVeScheduler,
)

from edm_sampling import samplers
from edm_sampling.denoisers import DiscreteVPDenoiser, EDMDenoiser
from edm_sampling.schedulers import EDMScheduler
from edm_sampling.schedules import karras_sigmas


def _train_sigmas(source) -> torch.Tensor:
    abar = source.alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


# --- configs ---------------------------------------------------------------------------------


def test_config_round_trip(tmp_path):
    scheduler = EDMScheduler(solver="euler", s_churn=7.5, s_tmin=0.05, s_noise=1.003, rho=5.0, timestep_mapping="round")
    scheduler.save_config(tmp_path)
    loaded = EDMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert loaded.config.s_tmax is None and loaded._s_tmax == math.inf


@pytest.mark.parametrize(
    "source",
    [
        DDPMScheduler(),
        DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
        PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True),
        HeunDiscreteScheduler(),  # defaults 0.00085 / 0.012: must not fall back to DDPM's
        EulerDiscreteScheduler(num_train_timesteps=500, beta_end=0.03),
    ],
    ids=["ddpm", "ddim-cosine-v", "pndm-scaled-linear", "heun-defaults", "euler-500"],
)
def test_from_config_keeps_vp_betas(source):
    scheduler = EDMScheduler.from_config(source.config)
    assert scheduler.config.model_family == "discrete_vp"
    assert scheduler.config.prediction_type == source.config.prediction_type
    torch.testing.assert_close(scheduler.train_sigmas, _train_sigmas(source), rtol=1e-3, atol=0)  # diffusers: float32
    # the sampling range is clamped to the model's levels
    lo, hi = scheduler.sigma_range
    assert lo == pytest.approx(max(0.002, float(_train_sigmas(source)[0])), rel=1e-3)
    assert hi == pytest.approx(min(80.0, float(_train_sigmas(source)[-1])), rel=1e-3)


def test_from_saved_diffusers_config_and_back(tmp_path):
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(tmp_path)
    scheduler = EDMScheduler.from_pretrained(tmp_path)
    assert (scheduler.config.beta_schedule, scheduler.config.beta_start) == ("scaled_linear", 0.00085)
    back = DDIMScheduler.from_config(scheduler.config)
    direct = DDIMScheduler.from_config(PNDMScheduler.load_config(tmp_path))
    torch.testing.assert_close(back.alphas_cumprod.double(), direct.alphas_cumprod.double())


def test_from_config_ve_and_edm():
    ve = EDMScheduler.from_config(ScoreSdeVeScheduler().config)
    assert ve.config.model_family == "ve"
    assert ve.sigma_range == (0.01, 1348.0)
    assert ve.init_noise_sigma == pytest.approx(1348.0)

    edm = EDMScheduler.from_config(EDMEulerScheduler(sigma_data=0.6, sigma_max=60.0).config)
    assert (edm.config.model_family, edm.config.sigma_data, edm.sigma_range) == ("edm", 0.6, (0.002, 60.0))


@pytest.mark.parametrize(
    "source, name",
    [
        (EDMEulerScheduler(sigma_schedule="exponential"), "sigma_schedule"),
        (EDMEulerScheduler(final_sigmas_type="sigma_min"), "final_sigmas_type"),
        (DDIMScheduler(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
        (EulerDiscreteScheduler(timestep_type="continuous"), "timestep_type"),
        (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "invert_sigmas"),
        (FlowMatchEulerDiscreteScheduler(shift_terminal=0.1), "shift_terminal"),
    ],
)
def test_from_config_unmappable_raises(source, name):
    with pytest.raises(ValueError, match=name):
        EDMScheduler.from_config(source.config)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"prediction_type": "flow"}, "prediction_type"),
        ({"model_family": "subvp"}, "model_family"),
        ({"model_family": "edm", "prediction_type": "sample"}, "prediction_type"),
        ({"solver": "rk4"}, "solver"),
        ({"timestep_mapping": "floor"}, "timestep_mapping"),
        ({"s_churn": -1.0}, "s_churn"),
        ({"s_noise": 0.0}, "s_noise"),
        ({"sigma_min": 90.0}, "sigma_max"),
        ({"rho": 0.0}, "rho"),
    ],
)
def test_bad_config_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EDMScheduler(**kwargs)


def test_bad_set_timesteps_raises():
    scheduler = EDMScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="sigmas"):
        scheduler.set_timesteps(sigmas=[1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match="timesteps"):
        EDMScheduler(model_family="edm").set_timesteps(timesteps=[900, 500])
    scheduler.set_timesteps(3)
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(2 * 3)  # img2img strength leaving zero steps
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(1)  # Heun's second call


# --- the call plan -----------------------------------------------------------------------------


def test_heun_plan_matches_the_paper_grid():
    scheduler = EDMScheduler(model_family="edm")
    scheduler.set_timesteps(18)
    assert scheduler.order == 2 and len(scheduler.timesteps) == 2 * 18 - 1
    torch.testing.assert_close(scheduler.sigmas.double(), karras_sigmas(18).float().double())
    assert scheduler.sigmas[0].item() == pytest.approx(80.0) and scheduler.sigmas[-2].item() == pytest.approx(0.002)
    # EDM timesteps are c_noise = ln(sigma) / 4, repeated for Heun's two calls
    expected = [math.log(float(s)) / 4 for s in karras_sigmas(18)[:-1]]
    assert scheduler.timesteps[0].item() == pytest.approx(expected[0], rel=1e-6)
    assert scheduler.timesteps[1].item() == pytest.approx(expected[1], rel=1e-6)
    assert scheduler.timesteps[2].item() == pytest.approx(expected[1], rel=1e-6)

    euler = EDMScheduler(solver="euler")
    euler.set_timesteps(5)
    assert euler.order == 1 and len(euler.timesteps) == 5


def test_round_mapping_snaps_to_trained_levels():
    scheduler = EDMScheduler(timestep_mapping="round")
    scheduler.set_timesteps(6)
    assert scheduler.timesteps.dtype == torch.long
    train = scheduler.train_sigmas
    for sigma, t in zip(scheduler.sigmas[:-1].double(), scheduler.timesteps[::2]):
        assert float(sigma) == pytest.approx(float(train[int(t)]), rel=1e-6)


def test_custom_sigmas_and_timesteps():
    scheduler = EDMScheduler()
    scheduler.set_timesteps(sigmas=[10.0, 1.0, 0.1])  # a final 0 is appended
    assert scheduler.sigmas.tolist() == pytest.approx([10.0, 1.0, 0.1, 0.0])
    assert len(scheduler.timesteps) == 5
    scheduler.set_timesteps(timesteps=[999, 500, 10])
    assert scheduler.timesteps[0].item() == pytest.approx(999.0, abs=1e-3)
    assert scheduler.timesteps[-1].item() == pytest.approx(10.0, abs=1e-3)


def test_churn_levels_and_start_noise():
    scheduler = EDMScheduler(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003, model_family="edm")
    scheduler.set_timesteps(8)
    sigmas = scheduler.sigmas.double()
    gammas = samplers.churn_gammas(sigmas, 40.0, 0.05, 50.0)
    hats = samplers.sigma_hats(sigmas, gammas)
    assert gammas[0] == 0.0 and max(gammas) > 0  # sigma_0 = 80 > s_tmax
    # the model is called at sigma_hat_i: c_noise of the first call of every step
    for i, hat in enumerate(hats):
        assert scheduler.timesteps[2 * i].item() == pytest.approx(math.log(hat) / 4, rel=1e-5)
    # in the state's (the model input's) scale: c_in(sigma_hat_0) = 1 / sqrt(sigma_hat_0^2 + sigma_data^2)
    start_std = samplers.initial_noise_std(float(sigmas[0]), hats[0], 1.003)
    assert scheduler.init_noise_sigma == pytest.approx(start_std / math.sqrt(hats[0] ** 2 + 0.25))


# --- a manual loop, the way a pipeline drives it ---------------------------------------------------


class _Affine(torch.nn.Module):
    """A network that costs nothing yet depends on its input and timestep."""

    def forward(self, x, t, **kwargs):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(0.7 * x.float() + 0.01 * t).to(x.dtype)


def _pipeline_loop(scheduler, net, noise, dtype=torch.float32, generator=None):
    sample = (noise * scheduler.init_noise_sigma).to(dtype)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(net(model_input, t), t, sample, generator=generator, return_dict=False)[0]
    return sample


@pytest.mark.parametrize("family", ["discrete_vp", "edm"])
def test_manual_loop_equals_core(family):
    net = _Affine()
    scheduler = EDMScheduler(model_family=family, solver="heun")
    scheduler.set_timesteps(6)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    out = _pipeline_loop(scheduler, net, noise)
    if family == "discrete_vp":
        denoiser = DiscreteVPDenoiser.from_scheduler_config(net, scheduler.config)
    else:
        denoiser = EDMDenoiser(net)
    ref = samplers.sample(denoiser, noise, scheduler.sigmas.double())
    torch.testing.assert_close(out, ref.sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_state_stays_float32(dtype):
    net = _Affine()
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    reference = EDMScheduler()
    reference.set_timesteps(5)
    ref = _pipeline_loop(reference, net, noise)
    scheduler = EDMScheduler()
    scheduler.set_timesteps(5)
    out = _pipeline_loop(scheduler, net, noise, dtype=dtype)
    assert out.dtype == dtype
    assert scheduler._state.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_step_output_fields_and_extra_kwargs():
    scheduler = EDMScheduler()
    scheduler.set_timesteps(2)
    sample = torch.randn(1, 1, 2, 2)
    out = scheduler.step(torch.zeros_like(sample), scheduler.timesteps[0], sample, eta=0.0, use_clipped_model_output=False)
    # epsilon = 0 means D = x_edm: the predicted data is the state divided by its VP scale
    torch.testing.assert_close(out.pred_original_sample, sample * math.sqrt(80.0**2 + 1), rtol=1e-5, atol=1e-5)
    assert scheduler.step_index == 1


def test_add_noise_at_begin_index():
    scheduler = EDMScheduler(model_family="edm")
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(2)
    x0, noise = torch.ones(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    noisy = scheduler.add_noise(x0, noise, scheduler.timesteps[2:3])
    sigma = float(scheduler.sigmas[1])  # step 1 starts at call 2; the state is c_in(sigma) x_edm
    torch.testing.assert_close(noisy, (x0 + sigma * noise) / (sigma**2 + 0.25) ** 0.5)


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_img2img_without_set_begin_index_starts_at_the_passed_timestep(solver):
    """Some pipelines (Kandinsky img2img, AnimateDiff video2video) slice the timesteps and call
    add_noise but never set_begin_index: the first `step` must start at its timestep's call."""
    net = _Affine()
    x0 = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    outputs = []
    for use_begin_index in (True, False):
        scheduler = EDMScheduler(solver=solver, s_churn=5.0)
        scheduler.set_timesteps(6)
        start = 3 * scheduler.order
        if use_begin_index:
            scheduler.set_begin_index(start)
        timesteps = scheduler.timesteps[start:]
        sample = scheduler.add_noise(x0, noise, timesteps[:1])
        for t in timesteps:
            sample = scheduler.step(net(scheduler.scale_model_input(sample, t), t), t, sample,
                                    generator=torch.Generator().manual_seed(int(t * 1000) % 1000)).prev_sample
        outputs.append(sample)
    torch.testing.assert_close(outputs[1], outputs[0])


def test_churn_never_lifts_sigma_hat_above_the_models_range():
    scheduler = EDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, s_churn=40.0)
    scheduler.set_timesteps(8)
    model_sigma_max = scheduler.train_sigmas[-1].item()
    assert max(scheduler.sigma_hats) <= model_sigma_max
    assert scheduler.timesteps.max().item() <= 999.0
    assert scheduler.sigma_hats[1] > scheduler.sigmas[1].item()  # churn still applies below the cap


@pytest.mark.parametrize("kwargs, name", [({"sigmas": [500.0, 1.0]}, "sigmas"), ({"timesteps": [5000, 500]}, "timesteps")])
def test_custom_grid_outside_the_models_range_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EDMScheduler().set_timesteps(**kwargs)
