"""diffusers' scheduler contract, point by point, in our own tests (diffusers' SchedulerCommonTest
itself runs out of tree): the DDPM tables, scale_model_input before set_timesteps, config round
trips through every compatible scheduler, warnings for what is ignored (from_config settings,
DDIMPipeline's scheduler replacement, eta), and loading a saved pipeline in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from tiny_models import tiny_unet2d

from edm_sampling.pipelines import EDMPipeline
from edm_sampling.schedulers import EDMScheduler

REPO = Path(__file__).resolve().parents[1]


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _ignore_warnings(caught: list) -> list:
    return [w for w in caught if "EDMScheduler.from_config ignores" in str(w.message)]


# --- DDPM tables ---------------------------------------------------------------------------------


def test_discrete_vp_has_diffusers_tables():
    source = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler = EDMScheduler.from_config(source.config)
    for name in ("betas", "alphas", "alphas_cumprod"):
        torch.testing.assert_close(getattr(scheduler, name), getattr(source, name), rtol=1e-5, atol=1e-7)


def test_trained_betas_survive_save_and_load(tmp_path):
    scheduler = EDMScheduler(trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    loaded = EDMScheduler.from_pretrained(tmp_path)
    assert loaded.betas.tolist() == scheduler.betas.tolist() == pytest.approx([0.1, 0.3])


@pytest.mark.parametrize("family", ["continuous_vp", "ve", "edm", "flow"])
def test_other_families_have_no_ddpm_tables(family):
    assert not hasattr(EDMScheduler(model_family=family), "alphas_cumprod")


# --- scale_model_input -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["discrete_vp", "edm", "flow"])
def test_scale_model_input_is_the_identity_before_and_after_set_timesteps(family):
    scheduler = EDMScheduler(model_family=family)
    sample = torch.randn(2, 3, 4, 4)
    assert scheduler.scale_model_input(sample, 0.0) is sample
    scheduler.set_timesteps(4)
    assert scheduler.scale_model_input(sample, scheduler.timesteps[1]) is sample
    assert scheduler.scale_model_input(sample, 12345.0) is sample  # any timestep value a caller passes


# --- config round trips ------------------------------------------------------------------------------


CONFIGS = {
    "default": {},
    "vp-custom": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
                  "solver": "euler", "s_churn": 10.0},
    "edm": {"model_family": "edm", "sigma_data": 0.6, "rho": 5.0},
    "flow": {"model_family": "flow", "shift": 3.0},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trip_through_every_compatible_scheduler(name):
    scheduler = EDMScheduler(**CONFIGS[name])
    original = dict(scheduler.config)
    for cls in scheduler.compatibles:
        other = cls.from_config(scheduler.config)
        back = EDMScheduler.from_config(other.config)
        kept = {k: v for k, v in back.config.items() if k in original}
        assert kept == original, cls.__name__


def test_other_schedulers_made_from_ours_see_the_models_values():
    """HeunDiscreteScheduler's default betas (0.00085 .. 0.012) are not DDPM's: the model keys of
    an EDMScheduler config are stored explicitly, so a swap back keeps the model."""
    heun = HeunDiscreteScheduler.from_config(EDMScheduler().config)
    assert (heun.config.beta_start, heun.config.beta_end) == (0.0001, 0.02)
    back = DDPMScheduler.from_config(EDMScheduler.from_config(DDIMScheduler(prediction_type="v_prediction").config).config)
    assert back.config.prediction_type == "v_prediction"


def test_save_load_and_the_legacy_family_name(tmp_path):
    scheduler = EDMScheduler(s_churn=5.0)
    scheduler.save_pretrained(tmp_path)
    assert _public(EDMScheduler.from_pretrained(tmp_path).config) == _public(scheduler.config)
    path = tmp_path / "scheduler_config.json"
    legacy = json.loads(path.read_text())
    legacy.update(model_family="vp")  # as saved before discrete / continuous VP were told apart
    for key in ("shift", "use_dynamic_shifting", "time_shift_type"):
        legacy.pop(key)
    path.write_text(json.dumps(legacy))
    loaded = EDMScheduler.from_pretrained(tmp_path)
    assert loaded.config.model_family == "discrete_vp"
    scheduler.set_timesteps(5)
    loaded.set_timesteps(5)
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps)


# --- what is ignored is said ----------------------------------------------------------------------------


def test_from_config_warns_naming_what_it_ignores():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EDMScheduler.from_config(DDPMScheduler().config)
        EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
        # Stable Diffusion's scheduler: its own timestep spacing is replaced by design, not "ignored"
        EDMScheduler.from_config(DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False,
                                               timestep_spacing="trailing").config)
        EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True).config)
    assert not _ignore_warnings(caught)  # defaults, mapped keys and the source's own grid settings: nothing to say

    with pytest.warns(UserWarning, match="s_chrun") as record:
        EDMScheduler.from_config(DDPMScheduler().config, s_chrun=40.0)
    assert "s_chrun" in str(record[0].message)
    with pytest.warns(UserWarning, match="thresholding"):
        EDMScheduler.from_config(DDIMScheduler(thresholding=True).config)
    with pytest.warns(UserWarning, match="clip_sample_range"):
        EDMScheduler.from_config(DDPMScheduler(clip_sample_range=2.0).config)


def test_ddim_pipeline_replacing_our_scheduler_warns(tmp_path):
    unet = tiny_unet2d()
    with pytest.warns(UserWarning, match="DDIMPipeline replaces"):
        pipe = DDIMPipeline(unet=unet, scheduler=EDMScheduler())
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert list(DDIMPipeline.__init__.__wrapped__.__code__.co_varnames[:3]) == ["self", "unet", "scheduler"]

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config)  # after construction it sticks, silently
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["edm_sampling.schedulers", "EDMScheduler"]
    with pytest.warns(UserWarning, match="DDIMPipeline replaces"):
        loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, DDIMPipeline) and isinstance(loaded.scheduler, DDIMScheduler)


def test_ddim_eta_is_ignored_with_one_warning():
    pipe = DDIMPipeline(unet=tiny_unet2d(), scheduler=DDIMScheduler())
    pipe.scheduler = EDMScheduler()
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = pipe(batch_size=1, num_inference_steps=3, eta=0.0, generator=torch.Generator().manual_seed(0), output_type="np")
    assert not [w for w in caught if "eta" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noisy = pipe(batch_size=1, num_inference_steps=3, eta=0.7, generator=torch.Generator().manual_seed(0), output_type="np")
    assert len([w for w in caught if "ignores eta=0.7" in str(w.message)]) == 1
    np.testing.assert_array_equal(noisy.images, plain.images)  # eta changes nothing


# --- loading a saved pipeline in a process that has not imported edm_sampling ------------------------


_LOADER = textwrap.dedent(
    """
    import sys
    from diffusers import DiffusionPipeline

    for folder, trust in zip(sys.argv[1::2], sys.argv[2::2]):
        assert trust == "trust" or not any(name.startswith("edm_sampling") for name in sys.modules)
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=(trust == "trust"))
        except Exception as error:
            print("ERROR", type(error).__name__, " ".join(str(error).split()))
        else:
            images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
            print("LOADED", type(pipe).__name__, type(pipe.scheduler).__name__, images.shape)
    """
)


def test_saved_pipelines_load_in_a_fresh_process_or_say_what_to_do(tmp_path):
    edm_folder, ddpm_folder = tmp_path / "edm", tmp_path / "ddpm"
    EDMPipeline(unet=tiny_unet2d(), scheduler=EDMScheduler(model_family="edm")).save_pretrained(edm_folder)
    ddpm = DDPMPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler())
    ddpm.scheduler = EDMScheduler()
    ddpm.save_pretrained(ddpm_folder)

    # one process that has not imported edm_sampling (HF_HOME: diffusers copies the loader file there)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    args = [str(ddpm_folder), "plain", str(edm_folder), "plain", str(edm_folder), "trust"]
    result = subprocess.run([sys.executable, "-c", _LOADER, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    scheduler_only, plain, trusted = [line for line in result.stdout.splitlines() if line.startswith(("ERROR", "LOADED"))]
    # a diffusers pipeline holding our scheduler: diffusers' own error names the import to make
    assert scheduler_only.startswith("ERROR") and "import edm_sampling.schedulers" in scheduler_only
    # our pipeline: the folder's loader file makes diffusers' error name the flag, and the flag loads it
    assert plain.startswith("ERROR") and "trust_remote_code=True" in plain and "edm_pipeline.py" in plain
    assert trusted.startswith("LOADED EDMPipeline EDMScheduler")

    loaded = EDMPipeline.from_pretrained(edm_folder)  # no flag needed with the class in hand
    assert isinstance(loaded, EDMPipeline) and loaded.scheduler.config.model_family == "edm"
