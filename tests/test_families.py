"""The model-family objects: recognised from every kind of scheduler config, and each formula
checked against Table 1 / the flow-matching definitions written out here, or against diffusers'
own tables (an independent path)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    ScoreSdeVeScheduler,
    UniPCMultistepScheduler,
)

from edm_sampling.denoisers import PreconditionedDenoiser
from edm_sampling.families import (
    EDM,
    EDM_SCHEDULER_KEYS,
    VE,
    ContinuousVP,
    DiscreteVP,
    FlowMatching,
    family_from_scheduler_config,
    flow_shift_factor,
    read_scheduler_config,
)
from edm_sampling.oracles import builtin_gaussian
from edm_sampling.schedulers import EDMScheduler
from edm_sampling.schedules import vp_sigma

SIGMAS = torch.tensor([0.004, 0.1, 0.7, 3.0, 25.0, 140.0], dtype=torch.float64)


def _saved(scheduler) -> dict:
    """The config as save_pretrained writes it (with _class_name)."""
    import json

    return json.loads(scheduler.to_json_string())


# --- recognising a family ------------------------------------------------------------------------------


def test_ddpm_family_configs_read_as_discrete_vp():
    for source in (DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
                   EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)):
        for config in (source.config, _saved(source)):  # in memory (no _class_name) and as saved
            family = family_from_scheduler_config(config)
            assert isinstance(family, DiscreteVP)
            assert family.prediction_type == source.config.prediction_type
            torch.testing.assert_close(family.alphas_cumprod, source.alphas_cumprod.double(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(family.betas, source.betas.double(), rtol=1e-4, atol=1e-8)


def test_ve_edm_and_flow_configs():
    ve = family_from_scheduler_config(_saved(ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0)))
    assert isinstance(ve, VE) and (ve.sigma_min, ve.sigma_max, ve.time_input) == (0.01, 50.0, "fourier")

    reading = read_scheduler_config(EDMEulerScheduler(sigma_data=0.6, sigma_max=60.0, prediction_type="v_prediction").config)
    assert isinstance(reading.family, EDM) and (reading.family.sigma_data, reading.family.prediction_type) == (0.6, "v_prediction")
    assert reading.scheduler_keys["sigma_max"] == 60.0  # the source's range becomes the grid's
    assert isinstance(family_from_scheduler_config(EDMDPMSolverMultistepScheduler().config), EDM)

    cases = [
        (FlowMatchEulerDiscreteScheduler(shift=3.0), 3.0),
        (FlowMatchHeunDiscreteScheduler(shift=2.0), 2.0),
        (DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"), 5.0),
        (UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=4.0, prediction_type="flow_prediction"), 4.0),
    ]
    for source, shift in cases:
        family = family_from_scheduler_config(_saved(source))
        assert isinstance(family, FlowMatching) and family.shift == shift and family.num_train_timesteps == 1000
    dynamic = family_from_scheduler_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    assert dynamic.use_dynamic_shifting and dynamic.time_shift_type == "exponential"


@pytest.mark.parametrize("name, cls", [("discrete_vp", DiscreteVP), ("vp", DiscreteVP), ("continuous_vp", ContinuousVP),
                                       ("ve", VE), ("edm", EDM), ("flow", FlowMatching)])
def test_own_configs_and_the_legacy_vp_name(name, cls):
    scheduler = EDMScheduler(model_family=name)
    assert isinstance(scheduler.family, cls)
    assert isinstance(family_from_scheduler_config(_saved(scheduler)), cls)
    assert isinstance(family_from_scheduler_config({"model_family": name}), cls)  # a config saved before the VP split


def test_edm_scheduler_keys_are_the_schedulers():
    assert set(EDM_SCHEDULER_KEYS) == set(EDMScheduler._get_init_keys(EDMScheduler)) - {"self"}


@pytest.mark.parametrize(
    "config, key",
    [
        (DDIMScheduler(rescale_betas_zero_snr=True).config, "rescale_betas_zero_snr"),
        (EulerDiscreteScheduler(timestep_type="continuous").config, "timestep_type"),
        (EDMEulerScheduler(sigma_schedule="exponential").config, "sigma_schedule"),
        (FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config, "invert_sigmas"),
        (DPMSolverMultistepScheduler(use_flow_sigmas=True).config, "prediction_type"),  # flow sigmas on an epsilon model
        ({"_class_name": "SomeScheduler", "foo": 1}, "_class_name"),
        ({"model_family": "subvp"}, "model_family"),
        ({"model_family": "flow", "prediction_type": "epsilon"}, "prediction_type"),
    ],
)
def test_unmappable_configs_name_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        family_from_scheduler_config(config)


# --- the formulas ------------------------------------------------------------------------------------


def _table_1(family, sigma):
    """(c_skip, c_out, c_in, c_noise) written from EDM_SPEC section 2 and the flow definitions."""
    one = torch.ones_like(sigma)
    if isinstance(family, EDM):
        sd = family.sigma_data
        return sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt(), 1 / (sigma**2 + sd**2).sqrt(), sigma.log() / 4
    if isinstance(family, VE):
        return one, sigma, one, (sigma if family.time_input == "fourier" else (sigma / 2).log())
    if isinstance(family, ContinuousVP):
        t = ((0.1**2 + 2 * 19.9 * (sigma**2 + 1).log()).sqrt() - 0.1) / 19.9
        return one, -sigma, 1 / (sigma**2 + 1).sqrt(), 999 * t
    t = sigma / (1 + sigma)  # flow: x_t = (1 - t) y + t n = x_edm / (1 + sigma), D = x_t - t v
    return 1 - t, -t, 1 - t, 1000 * t


@pytest.mark.parametrize("family", [EDM(0.5), EDM(1.3), VE(), VE(time_input="positional"), ContinuousVP(), FlowMatching()],
                         ids=["edm", "edm-1.3", "ve-fourier", "ve-positional", "continuous-vp", "flow"])
def test_coefficients_time_input_and_input_scale(family):
    c_skip, c_out, c_in, c_noise = _table_1(family, SIGMAS)
    coefficients = family.coefficients(SIGMAS)
    torch.testing.assert_close(coefficients.c_skip, c_skip)
    torch.testing.assert_close(coefficients.c_out, c_out)
    torch.testing.assert_close(coefficients.c_in, c_in)
    torch.testing.assert_close(family.net_time(SIGMAS), c_noise)
    torch.testing.assert_close(family.input_scale(SIGMAS), c_in)  # the pipeline's state is c_in x_edm


def test_discrete_vp_formulas_against_diffusers_tables():
    source = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    family = family_from_scheduler_config(source.config)
    abar = source.alphas_cumprod.double()
    train = ((1 - abar) / abar).sqrt()
    # a DDPM model sees x_vp = sqrt(abar) x_edm at timestep j
    torch.testing.assert_close(family.input_scale(train), abar.sqrt(), rtol=1e-5, atol=0)
    for j in (0, 10, 500, 999):
        assert family.net_time(train[j : j + 1]).item() == pytest.approx(j, abs=1e-3)
        assert family.time_of_sigma(train[j]).item() == pytest.approx(j, abs=1e-3)
    torch.testing.assert_close(family.sigma_of_time(torch.tensor([3.0, 400.0])), train[[3, 400]], rtol=1e-5, atol=0)
    rounded = DiscreteVP(family.alphas_cumprod, timestep_mapping="round")
    assert rounded.integer_timesteps and not family.integer_timesteps
    snapped = rounded.round_sigma(torch.tensor([0.5, 7.0], dtype=torch.float64))
    assert all(torch.isclose(family.train_sigmas, s).any() for s in snapped)
    assert (family.sigma_min, family.sigma_max) == (pytest.approx(float(train[0]), rel=1e-4), pytest.approx(float(train[-1]), rel=1e-4))


def test_natural_time_variables():
    # Table 1's VP time for VE / EDM / continuous VP (EDM_SPEC section 6: sigma_VP(1e-3) = 0.0104860)
    for family in (VE(), EDM(), ContinuousVP()):
        assert family.time_of_sigma(torch.tensor(0.0104860, dtype=torch.float64)).item() == pytest.approx(1e-3, rel=1e-4)
        torch.testing.assert_close(family.sigma_of_time(family.time_of_sigma(SIGMAS)), SIGMAS)
    assert ContinuousVP().sigma_max == pytest.approx(152.1670, rel=1e-6)
    assert ContinuousVP().sigma_min == pytest.approx(0.00100050, rel=1e-5)
    flow = FlowMatching()
    torch.testing.assert_close(flow.time_of_sigma(SIGMAS), SIGMAS / (1 + SIGMAS))
    torch.testing.assert_close(flow.sigma_of_time(flow.time_of_sigma(SIGMAS)), SIGMAS)


def test_output_conventions():
    output = torch.tensor([0.3, -1.2], dtype=torch.float64)
    sigma = torch.tensor([2.0, 5.0], dtype=torch.float64)
    torch.testing.assert_close(VE().net_output(output, sigma), output * sigma)  # undo the fourier UNet's division
    torch.testing.assert_close(VE(time_input="positional").net_output(output, sigma), output)
    torch.testing.assert_close(EDM(prediction_type="v_prediction").net_output(output, sigma), -output)
    torch.testing.assert_close(FlowMatching().net_output(output, sigma), output)


def test_shift_is_a_rescaling_of_sigma():
    """diffusers' shifts of flow times, applied by diffusers itself, multiply sigma = t/(1-t) by one factor."""
    t = np.linspace(0.05, 0.95, 7)
    sigma = t / (1 - t)
    static = FlowMatchEulerDiscreteScheduler(shift=3.0)
    shifted = static.shift * t / (1 + (static.shift - 1) * t)
    np.testing.assert_allclose(shifted / (1 - shifted), flow_shift_factor(3.0, False, "exponential", None) * sigma, rtol=1e-12)
    for kind, mu in (("exponential", 0.8), ("linear", 2.5)):
        dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=kind)
        shifted = dynamic.time_shift(mu, 1.0, t)
        np.testing.assert_allclose(shifted / (1 - shifted), flow_shift_factor(1.0, True, kind, mu) * sigma, rtol=1e-12)
    with pytest.raises(ValueError, match="mu"):
        flow_shift_factor(1.0, True, "exponential", None)


@pytest.mark.parametrize("family", [DiscreteVP.from_betas(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64),
                                                          prediction_type="v_prediction"),
                                    ContinuousVP(), VE(0.0, math.inf), EDM(0.7, prediction_type="v_prediction"), FlowMatching(shift=3.0)],
                         ids=["discrete-vp", "continuous-vp", "ve", "edm", "flow"])
def test_scheduler_config_round_trip(family):
    """family -> EDMScheduler config -> family: the same D(x; sigma) for the same network."""
    back = EDMScheduler(**family.scheduler_config()).family
    assert type(back) is type(family)
    net = lambda x, t: torch.tanh(x) * (1 + 0.001 * t.reshape(-1, 1))  # noqa: E731
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = SIGMAS.clamp(max=100.0)
    torch.testing.assert_close(PreconditionedDenoiser(net, back)(x, sigma), PreconditionedDenoiser(net, family)(x, sigma))


def test_generic_denoiser_from_any_config_matches_the_oracle():
    """PreconditionedDenoiser.from_scheduler_config on a FlowMatch config, fed the exact velocity of
    the built-in Gaussian (v = (x_t - D) / t, inverted here from the oracle), gives the oracle back."""
    oracle = builtin_gaussian()

    def velocity(x_t, timestep):
        t = (timestep.double() / 1000).reshape(-1, 1, 1, 1)
        sigma = t / (1 - t)
        return (x_t - oracle(x_t / (1 - t), sigma.flatten())) / t

    denoiser = PreconditionedDenoiser.from_scheduler_config(velocity, FlowMatchEulerDiscreteScheduler().config)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * (1 + SIGMAS.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(denoiser(x, SIGMAS), oracle(x, SIGMAS))
    assert vp_sigma(1.0).item() == pytest.approx(ContinuousVP().sigma_max)
