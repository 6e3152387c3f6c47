"""EDMScheduler inside real diffusers pipelines, and EDMPipeline: each output equals the core
sampler's on the same model wrapped as a denoiser, with the same noise and the same number of
model calls (counted on the UNet's forward)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from tiny_models import CallCounter, tiny_fourier_unet2d, tiny_sd_components, tiny_unet2d

from edm_sampling import samplers
from edm_sampling.denoisers import DiscreteVPDenoiser, EDMDenoiser, VEDenoiser
from edm_sampling.pipelines import EDMPipeline
from edm_sampling.schedulers import EDMScheduler

TOL = dict(rtol=1e-4, atol=1e-4)


def _seed(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _core(denoiser, noise, scheduler, sigmas=None, afs=None, **kwargs):
    """The core sampler on the scheduler's grid (or `sigmas`), solver, order, afs and churn."""
    config = scheduler.config
    with torch.no_grad():
        return samplers.sample(
            denoiser,
            noise,
            scheduler.sigmas.double() if sigmas is None else sigmas,
            solver=config.solver,
            order=config.solver_order,
            afs=config.afs if afs is None else afs,
            s_churn=config.s_churn,
            s_tmin=config.s_tmin,
            s_tmax=scheduler._s_tmax,
            s_noise=config.s_noise,
            **kwargs,
        )


# solvers the pipeline tests run: EDM's Heun, and multistep solvers with and without afs
SOLVER_CASES = {
    "heun": {},
    "unipc3": {"solver": "unipc", "solver_order": 3},
    "dpmpp_2m-afs": {"solver": "dpmpp_2m", "afs": True},
    "ipndm-afs": {"solver": "ipndm", "afs": True},
    "dpmpp_3m": {"solver": "dpmpp_3m"},
}


def _calls(case: str, n: int) -> int:
    """Model calls of num_inference_steps = n: 2n - 1 for Heun, n for the multistep solvers."""
    return 2 * n - 1 if case == "heun" else n


def _to_image(x: torch.Tensor) -> torch.Tensor:
    return (x / 2 + 0.5).clamp(0, 1)


# --- DDPMPipeline / DDIMPipeline ------------------------------------------------------------------


@pytest.mark.parametrize("pipeline_cls", [DDPMPipeline, DDIMPipeline])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", ["heun", "unipc3", "dpmpp_2m-afs"])
def test_ddpm_ddim_pipelines_equal_core(pipeline_cls, prediction_type, case):
    unet = tiny_unet2d()
    source = DDPMScheduler(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    pipe = pipeline_cls(unet=unet, scheduler=source)
    pipe.scheduler = EDMScheduler.from_config(source.config, **SOLVER_CASES[case])  # after construction: DDIMPipeline converts in __init__
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(unet)
    images = pipe(batch_size=2, num_inference_steps=5, generator=_seed(0), output_type="pt").images
    pipe_calls = counter.calls
    assert pipe_calls == _calls(case, 5)

    counter.reset()
    scheduler = pipe.scheduler
    noise = torch.randn((2, 3, 8, 8), generator=_seed(0))
    denoiser = DiscreteVPDenoiser.from_scheduler_config(unet, source.config)
    # these pipelines start from N(0, I) in the model's scale, never multiplying by init_noise_sigma
    ref = _core(denoiser, noise / scheduler.init_noise_sigma, scheduler)
    assert counter.calls == ref.nfe == pipe_calls
    torch.testing.assert_close(images, _to_image(ref.sample), **TOL)


def test_ddpm_pipeline_churn_with_generator_list_equals_core():
    unet = tiny_unet2d()
    scheduler = EDMScheduler(s_churn=30.0, s_tmin=0.01, s_tmax=50.0, s_noise=1.007)
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=6, generator=[_seed(1), _seed(2)], output_type="pt").images

    generators = [_seed(1), _seed(2)]
    noise = samplers.randn((2, 3, 8, 8), generators)
    denoiser = DiscreteVPDenoiser(unet, torch.cumprod(1 - DDPMScheduler().betas.double(), 0))
    ref = _core(denoiser, noise / scheduler.init_noise_sigma, scheduler, generator=generators)
    assert ref.sigma_hats[1] > float(scheduler.sigmas[1])  # churn is active
    torch.testing.assert_close(images, _to_image(ref.sample), **TOL)
    # each sample depends on its own generator only
    alone = pipe(batch_size=1, num_inference_steps=6, generator=[_seed(2)], output_type="pt").images
    torch.testing.assert_close(alone[0], images[1], **TOL)


# --- Stable Diffusion ---------------------------------------------------------------------------------


class _CFGNet(torch.nn.Module):
    """The UNet on the doubled batch [uncond, cond], combined by classifier-free guidance."""

    def __init__(self, unet, embeds: torch.Tensor, guidance_scale: float):
        super().__init__()
        self.unet, self.embeds, self.guidance_scale = unet, embeds, guidance_scale

    def forward(self, x, t, **kwargs):
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=self.embeds).sample
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    components = tiny_sd_components(tmp_path_factory.mktemp("sd"))
    return components, components["scheduler"]


@pytest.fixture(params=["heun", "unipc3", "ipndm-afs"])
def sd_parts(sd_base, request):
    components, source = sd_base
    components = {**components, "scheduler": EDMScheduler.from_config(source.config, **SOLVER_CASES[request.param])}
    return components, source


def _cfg_denoiser(pipe, source, prompt: str, guidance_scale: float):
    cond, uncond = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True)
    net = _CFGNet(pipe.unet, torch.cat([uncond, cond]), guidance_scale)
    return DiscreteVPDenoiser.from_scheduler_config(net, source.config)


def test_stable_diffusion_cfg_custom_sigmas_and_callback(sd_parts, tmp_path):
    components, source = sd_parts
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(pipe.unet)
    noise = torch.randn((1, 4, 8, 8), generator=_seed(3))
    seen = []

    def callback(pipeline, i, t, kwargs):
        seen.append(i)
        return {"latents": kwargs["latents"].clone()}  # a new tensor: the scheduler must use it

    latents = pipe(
        "a photo of a cat",
        height=16,
        width=16,
        num_inference_steps=4,
        guidance_scale=5.0,
        latents=noise.clone(),
        output_type="latent",
        callback_on_step_end=callback,
    ).images
    calls = 2 * 4 - 1 if pipe.scheduler.config.solver == "heun" else 4
    assert counter.calls == len(seen) == calls

    counter.reset()
    denoiser = _cfg_denoiser(pipe, source, "a photo of a cat", 5.0)
    ref = _core(denoiser, noise, pipe.scheduler)
    assert counter.calls == ref.nfe == calls
    torch.testing.assert_close(latents, ref.sample, **TOL)

    # custom sigmas (sigma units) through retrieve_timesteps
    sigmas = [12.0, 3.0, 0.7, 0.1]
    common = dict(height=16, width=16, guidance_scale=5.0, output_type="latent")
    custom = pipe("a photo of a cat", sigmas=sigmas, latents=noise.clone(), **common).images
    ref = _core(denoiser, noise, pipe.scheduler)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(sigmas + [0.0])
    torch.testing.assert_close(custom, ref.sample, **TOL)

    # save / load with the diffusers loader: the scheduler comes back by its module path
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, EDMScheduler)
    assert dict(loaded.scheduler.config)["beta_schedule"] == "scaled_linear"
    loaded.set_progress_bar_config(disable=True)
    again = loaded("a photo of a cat", num_inference_steps=4, latents=noise.clone(), **common).images
    torch.testing.assert_close(again, latents, **TOL)


class _ShiftedDenoiser(torch.nn.Module):
    """D'(x) = D(x + y) - y: the core sampler starts from pure noise, img2img from y + noise;
    solving the ODE for x - y is the same trajectory."""

    def __init__(self, denoiser, y: torch.Tensor):
        super().__init__()
        self.denoiser, self.y = denoiser, y

    def forward(self, x, sigma, **kwargs):
        return self.denoiser(x + self.y, sigma) - self.y


def test_stable_diffusion_img2img_strength(sd_parts):
    components, source = sd_parts
    pipe = StableDiffusionImg2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(pipe.unet)
    init = torch.randn((1, 4, 8, 8), generator=_seed(4))  # 4 channels: used as latents directly
    n, strength = 6, 0.5
    latents = pipe(
        "a red dog", image=init, strength=strength, num_inference_steps=n, guidance_scale=3.0, generator=_seed(5), output_type="latent"
    ).images
    steps = int(n * strength)
    heun = pipe.scheduler.config.solver == "heun"
    assert counter.calls == (2 * steps - 1 if heun else steps)

    counter.reset()
    scheduler = pipe.scheduler
    noise = torch.randn((1, 4, 8, 8), generator=_seed(5))
    denoiser = _ShiftedDenoiser(_cfg_denoiser(pipe, source, "a red dog", 3.0), init)
    # the remaining grid's plan, with a fresh history and no afs (the start is not pure noise)
    ref = _core(denoiser, noise, scheduler, sigmas=scheduler.sigmas.double()[-(steps + 1) :], afs=False)
    assert counter.calls == ref.nfe
    torch.testing.assert_close(latents, ref.sample + init, **TOL)

    with pytest.raises(ValueError, match="begin_index"):
        pipe("a red dog", image=init, strength=0.1, num_inference_steps=n, output_type="latent")


# --- EDMPipeline --------------------------------------------------------------------------------------


def test_edm_pipeline_ve_fourier_unet(tmp_path):
    unet = tiny_fourier_unet2d()
    pipe = EDMPipeline(unet=unet, scheduler=EDMScheduler(model_family="ve", sigma_min=0.02, sigma_max=100.0))
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(unet)
    images = pipe(batch_size=2, num_inference_steps=5, generator=_seed(6), output_type="pt").images
    assert counter.calls == 9 and images.shape == (2, 3, 8, 8)

    counter.reset()
    noise = samplers.randn((2, 3, 8, 8), _seed(6))
    ref = _core(VEDenoiser(unet, sigma_min=0.02, sigma_max=100.0), noise, pipe.scheduler)
    assert counter.calls == ref.nfe
    torch.testing.assert_close(images, ref.sample.clamp(0, 1), **TOL)  # VE data lives in [0, 1]

    pipe.save_pretrained(tmp_path)
    loaded = EDMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, EDMScheduler) and loaded.scheduler.config.model_family == "ve"
    loaded.set_progress_bar_config(disable=True)
    again = loaded(batch_size=2, num_inference_steps=5, generator=_seed(6), output_type="pt").images
    torch.testing.assert_close(again, images, **TOL)


def test_edm_pipeline_class_conditional_churn_and_outputs():
    unet = tiny_unet2d(num_class_embeds=3)
    scheduler = EDMScheduler(model_family="edm", s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    pipe = EDMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generators = [_seed(7), _seed(8)]
    raw = pipe(batch_size=2, num_inference_steps=5, generator=generators, class_labels=[0, 2], output_type="latent").images

    generators = [_seed(7), _seed(8)]
    noise = samplers.randn((2, 3, 8, 8), generators)
    ref = _core(EDMDenoiser(unet), noise, scheduler, generator=generators, model_kwargs={"class_labels": torch.tensor([0, 2])})
    torch.testing.assert_close(raw, ref.sample, **TOL)

    np_images = pipe(batch_size=2, num_inference_steps=5, generator=[_seed(7), _seed(8)], class_labels=[0, 2], output_type="np").images
    assert np_images.shape == (2, 8, 8, 3)
    torch.testing.assert_close(torch.from_numpy(np_images), _to_image(raw).permute(0, 2, 3, 1), **TOL)
    pil = pipe(num_inference_steps=2, generator=_seed(0), class_labels=1).images
    assert len(pil) == 1 and pil[0].size == (8, 8)


def test_edm_model_in_plain_ddpm_pipeline_and_from_pretrained(tmp_path):
    """The EDM family's state is kept in the model's input scale, so an EDM-preconditioned UNet
    samples in diffusers' own DDPMPipeline (which never calls scale_model_input), and a saved
    folder loads back with plain DiffusionPipeline.from_pretrained."""
    unet = tiny_unet2d()
    pipe = DDPMPipeline(unet=unet, scheduler=EDMScheduler(model_family="edm", sigma_data=0.5))
    pipe.set_progress_bar_config(disable=True)
    counter = CallCounter(unet)
    raw = pipe(batch_size=2, num_inference_steps=5, generator=[_seed(1), _seed(2)], output_type="np").images
    counter.remove()
    noise = samplers.randn((2, 3, 8, 8), [_seed(1), _seed(2)])
    # DDPMPipeline starts from N(0, I), not init_noise_sigma * N(0, I)
    ref = _core(EDMDenoiser(unet), noise / pipe.scheduler.init_noise_sigma, pipe.scheduler)
    torch.testing.assert_close(torch.from_numpy(raw), _to_image(ref.sample).permute(0, 2, 3, 1), **TOL)
    assert counter.calls == ref.nfe == 9

    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, DDPMPipeline) and isinstance(loaded.scheduler, EDMScheduler)
    assert loaded.scheduler.config.model_family == "edm"
    loaded.set_progress_bar_config(disable=True)
    again = loaded(batch_size=2, num_inference_steps=5, generator=[_seed(1), _seed(2)], output_type="np").images
    torch.testing.assert_close(torch.from_numpy(again), torch.from_numpy(raw))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"output_type": "jpg"}, "output_type"),
        ({"batch_size": 0}, "batch_size"),
        ({"class_labels": None}, "class_labels"),
        ({"class_labels": [0, 1, 2]}, "class_labels"),
        ({"generator": [torch.Generator()]}, "generator"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"latents": torch.zeros(2, 3, 4, 4)}, "latents"),
    ],
)
def test_edm_pipeline_bad_input(kwargs, name):
    pipe = EDMPipeline(unet=tiny_unet2d(num_class_embeds=3), scheduler=EDMScheduler(model_family="edm"))
    call = {"batch_size": 2, "num_inference_steps": 2, "class_labels": 0, **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe(**call)
