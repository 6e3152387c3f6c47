"""Flow-matching models in D(x; sigma) and through EDMScheduler.

Exact truth: for Gaussian data y ~ N(mu, diag(lam)) and x_t = (1 - t) y + t n, the ideal velocity
E[n - y | x_t] is written below straight from the Gaussian posterior in flow terms (no EDM
quantity in it); the flow family must turn it into the Gaussian oracle's D. Then the scheduler
must equal the core sampler, reproduce diffusers' FlowMatchEuler step for step, converge at
Heun's order, and run a real StableDiffusion3Pipeline.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from tiny_models import CallCounter, FirstCallSeesUnitNoise, tiny_sd3_components

from edm_sampling import samplers
from edm_sampling.denoisers import FlowDenoiser
from edm_sampling.families import flow_sigma, flow_time
from edm_sampling.oracles import GaussianOracle
from edm_sampling.schedulers import EDMScheduler

M = 1000


def _gaussian(seed: int = 0) -> GaussianOracle:
    g = torch.Generator().manual_seed(seed)
    mean = 0.4 * torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    variance = 0.05 + 1.5 * torch.rand(2, 4, 4, generator=g, dtype=torch.float64)
    return GaussianOracle(mean, variance)


ORACLE = _gaussian()


def exact_velocity(x_t: torch.Tensor, timestep: torch.Tensor, oracle: GaussianOracle = ORACLE) -> torch.Tensor:
    """E[n - y | x_t] for y ~ N(mu, lam), x_t = (1 - t) y + t n: with var = (1 - t)^2 lam + t^2 and
    r = x_t - (1 - t) mu, E[y | x_t] = mu + (1 - t) lam r / var and E[n | x_t] = t r / var."""
    t = (torch.as_tensor(timestep, dtype=torch.float64) / M).reshape(-1, *([1] * (x_t.ndim - 1)))
    mu, lam = oracle.mean, oracle.variance
    var = (1 - t) ** 2 * lam + t**2
    r = x_t.double() - (1 - t) * mu
    return (t * r / var - (mu + (1 - t) * lam * r / var)).to(x_t.dtype)


def _loop(scheduler: EDMScheduler, noise: torch.Tensor, generator=None) -> tuple[torch.Tensor, int]:
    """The SD3 / Flux denoising loop: N(0, I) start (never times init_noise_sigma), no scale_model_input."""
    x, calls = noise.clone(), 0
    for t in scheduler.timesteps:
        output = exact_velocity(x, t.expand(x.shape[0]))
        calls += 1
        x = scheduler.step(output, t, x, generator=generator, return_dict=False)[0]
    return x, calls


def test_flow_family_turns_the_exact_velocity_into_the_exact_denoiser():
    denoiser = FlowDenoiser(exact_velocity)
    x = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigma = torch.tensor([0.003, 0.1, 0.9, 4.0, 60.0, 900.0], dtype=torch.float64)
    x = x * (sigma.reshape(-1, 1, 1, 1) ** 2 + 1).sqrt()
    torch.testing.assert_close(denoiser(x, sigma), ORACLE(x, sigma), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver, churn", [("heun", 0.0), ("euler", 0.0), ("heun", 20.0), ("euler", 20.0), ("ipndm", 0.0)])
def test_flow_scheduler_equals_core_sampler(solver, churn):
    """The pipeline's unit noise is the start noise z: the state starts at sigma_max z (or at pure
    noise for euler), D of the first call is the model's estimate for the input it saw."""
    scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver=solver, s_churn=churn,
                                         s_tmin=0.05, s_tmax=50.0)
    scheduler.set_timesteps(6)
    assert scheduler.init_noise_sigma == 1.0
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    out, calls = _loop(scheduler, noise, generator=torch.Generator().manual_seed(3))
    ref = samplers.sample(FirstCallSeesUnitNoise(exact_velocity), noise, scheduler.sigmas.double(), solver=solver,
                          s_churn=churn, s_tmin=0.05, s_tmax=50.0, generator=torch.Generator().manual_seed(3))
    assert calls == ref.nfe == (11 if solver == "heun" else 6)
    torch.testing.assert_close(out, ref.sample.float(), rtol=1e-5, atol=1e-5)
    plain = samplers.sample(FlowDenoiser(exact_velocity), noise, scheduler.sigmas.double(), solver=solver,
                            s_churn=churn, s_tmin=0.05, s_tmax=50.0, generator=torch.Generator().manual_seed(3))
    assert float((out - plain.sample.float()).abs().max()) < 3e-4  # the first D differs by O(1 / sigma_max^2)


@pytest.mark.parametrize("options", [{}, {"solver": "ipndm", "afs": True}, {"solver": "unipc", "afs": True}])
def test_flow_pipelines_unit_noise_is_pure_noise_for_every_start(options):
    """SD3 / Flux pass N(0, I) without init_noise_sigma. Heun and iPNDM start at sigma_max = 80
    and must read it as the noise at 80 (state 80 / 81 n, not 81 / 80 too wide); with afs the first
    call is at sigma_1 (state sigma_1 / (1 + sigma_1) n). Gaussian data: the exact ODE maps the
    start noise to samples of the data's std; 60 calls leave under 0.3%."""
    oracle = GaussianOracle(torch.zeros(1, 16, 16, dtype=torch.float64), torch.full((1, 16, 16), 0.25, dtype=torch.float64))
    scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, **options)
    scheduler.set_timesteps(60)
    noise = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(exact_velocity(x, t.expand(x.shape[0]), oracle), t, x, return_dict=False)[0]
    exact = noise * 0.5 * 80 / math.sqrt(80**2 + 0.25)  # x*(0) = sqrt(lam) z sigma_max / sqrt(sigma_max^2 + lam)
    assert float(x.std() / exact.std()) == pytest.approx(1.0, abs=0.004)  # unscaled reading: 1.0097, 1.018, 1.006


def test_flow_grid_follows_the_models_shift():
    """Default grid: Flux's time-uniform flow times linspace(1, 1/N, N), scaled so that t = 1 lands
    on sigma_max after the shift, then shifted (sigma' = shift * sigma); network timesteps t * 1000."""
    scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    scheduler.set_timesteps(5)
    t_top = flow_time(80.0 / 3.0)
    expected = 3.0 * flow_sigma(t_top * torch.linspace(1.0, 0.2, 5, dtype=torch.float64))
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), expected.float().double())
    assert scheduler.sigmas[0].item() == pytest.approx(80.0) and scheduler.sigmas[-1].item() == 0.0
    torch.testing.assert_close(scheduler.timesteps[::2].double(), (M * flow_time(expected)).float().double())
    # flow pipelines pass N(0, I) unscaled: init_noise_sigma is 1 and step scales a fresh start to
    # the state at sigma_max (80 / 81 n), so the core sampler from the same noise is the reference
    assert scheduler.init_noise_sigma == 1.0

    dynamic = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="mu"):
        dynamic.set_timesteps(5)
    dynamic.set_timesteps(5, mu=0.7)
    t_top = flow_time(80.0 / math.exp(0.7))
    expected = math.exp(0.7) * flow_sigma(t_top * torch.linspace(1.0, 0.2, 5, dtype=torch.float64))
    torch.testing.assert_close(dynamic.sigmas[:-1].double(), expected.float().double())


@pytest.mark.parametrize("shift_kwargs, mu", [({"shift": 3.0}, None), ({"use_dynamic_shifting": True}, 0.9),
                                               ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 2.5)])
def test_euler_on_the_pipelines_flow_times_is_flow_match_euler(shift_kwargs, mu):
    """On the same flow times, EDM's Euler step on x_edm = x_t / (1 - t) is FlowMatchEuler's
    x_t + (t' - t) v step (the two are one update written in two variables), and the shift is the
    same: same timesteps, same samples."""
    times = torch.linspace(0.9, 0.1, 9).tolist()  # pipeline-style flow times below t = 1
    theirs = FlowMatchEulerDiscreteScheduler(**shift_kwargs)
    ours = EDMScheduler.from_config(theirs.config, solver="euler")
    theirs.set_timesteps(sigmas=times, mu=mu)
    ours.set_timesteps(sigmas=times, mu=mu)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=1e-5, atol=1e-3)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    x = noise.clone()
    for t in theirs.timesteps:
        x = theirs.step(exact_velocity(x, t.expand(3)), t, x).prev_sample
    out, _ = _loop(ours, noise)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_pipeline_flow_times_at_one_become_sigma_max():
    scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.01, 100).tolist())  # Flux-style, t = 1 is pure noise
    assert scheduler.sigmas[0].item() == pytest.approx(80.0)
    assert bool((scheduler.sigmas[1:] < scheduler.sigmas[:-1]).all())  # levels clamped to 80 are merged
    assert scheduler.num_inference_steps < 100
    with pytest.raises(ValueError, match="sigmas"):
        scheduler.set_timesteps(sigmas=[1.5, 0.5])


def test_heun_on_the_flow_model_converges_at_second_order():
    errors = []
    noise = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for n in (16, 32):
        scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)
        scheduler.set_timesteps(n)
        sigma_0 = float(scheduler.sigmas[0])
        out = samplers.sample(FlowDenoiser(exact_velocity), noise, scheduler.sigmas.double(), state_dtype=torch.float64).sample
        exact = ORACLE.ode_solution(noise * sigma_0, sigma_0, 0.0)
        errors.append((out - exact).pow(2).mean().sqrt().item())
    assert errors[0] / errors[1] > 3.0  # 4 for an exact second-order method


def test_scale_noise_is_flow_match_forward_process():
    """img2img: the start is (1 - t) y + t n at the begin index's flow time (FlowMatchEuler's
    scale_noise with that t)."""
    scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(2 * scheduler.order)
    y, n = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    t = float(flow_time(scheduler.sigmas[2].double()))
    noisy = scheduler.scale_noise(y, scheduler.timesteps[4:5], n)
    torch.testing.assert_close(noisy, (1 - t) * y + t * n, rtol=1e-5, atol=1e-6)


# --- a real StableDiffusion3Pipeline ----------------------------------------------------------------


class _SD3CFGNet(torch.nn.Module):
    """The SD3 transformer on the doubled batch [uncond, cond] with classifier-free guidance,
    called as net(x_t, t * 1000) (the flow family's time input)."""

    def __init__(self, transformer, embeds, pooled, guidance_scale: float):
        super().__init__()
        self.transformer, self.embeds, self.pooled, self.guidance_scale = transformer, embeds, pooled, guidance_scale

    def forward(self, x, timestep, **kwargs):
        out = self.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([timestep, timestep]),
                               encoder_hidden_states=self.embeds, pooled_projections=self.pooled, return_dict=False)[0]
        uncond, cond = out.chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)


@pytest.fixture(scope="module")
def sd3_components(tmp_path_factory):
    return tiny_sd3_components(tmp_path_factory.mktemp("sd3"))


def _sd3_denoiser(pipe, prompt: str, guidance_scale: float, unit_noise_start: bool = False) -> FlowDenoiser:
    """D of the pipeline's transformer with CFG; `unit_noise_start`: its first call sees the
    pipeline's unit noise (`tiny_models.FirstCallSeesUnitNoise`), as in the pipeline's own loop."""
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt, None, None, do_classifier_free_guidance=True, max_sequence_length=8, device=torch.device("cpu"))
    net = _SD3CFGNet(pipe.transformer, torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled]), guidance_scale)
    return FirstCallSeesUnitNoise(net) if unit_noise_start else FlowDenoiser(net)


def _pipeline_with_our_scheduler(pipeline_cls, components, **scheduler_kwargs):
    """The pipeline on the tiny SD3 parts, its scheduler swapped as a user would, calls counted."""
    pipe = pipeline_cls(**components)
    pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config, **scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe, CallCounter(pipe.transformer)


def test_sd3_pipeline_equals_core_sampler(sd3_components):
    pipe, counter = _pipeline_with_our_scheduler(StableDiffusion3Pipeline, sd3_components)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(6))
    common = dict(height=16, width=16, guidance_scale=4.0, max_sequence_length=8, output_type="latent")
    latents = pipe("a photo of a cat", num_inference_steps=3, latents=noise.clone(), **common).images
    assert counter.calls == 2 * 3 - 1

    counter.reset()
    scheduler = pipe.scheduler
    assert scheduler.timesteps.max().item() < M  # the transformer's t * 1000
    with torch.no_grad():
        ref = samplers.sample(_sd3_denoiser(pipe, "a photo of a cat", 4.0, unit_noise_start=True), noise,
                              scheduler.sigmas.double())
    assert counter.calls == ref.nfe == 5
    torch.testing.assert_close(latents, ref.sample, rtol=1e-4, atol=1e-4)

    # Flux-style flow times and a dynamic shift, passed by the pipeline
    pipe.scheduler = EDMScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config)
    custom = pipe("a photo of a cat", sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.6, latents=noise.clone(), **common).images
    assert pipe.scheduler.sigmas[0].item() == pytest.approx(80.0)
    torch.testing.assert_close(pipe.scheduler.sigmas[1].double(), torch.tensor(math.exp(0.6) * 3.0, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    with torch.no_grad():
        ref = samplers.sample(_sd3_denoiser(pipe, "a photo of a cat", 4.0, unit_noise_start=True), noise,
                              pipe.scheduler.sigmas.double())
    torch.testing.assert_close(custom, ref.sample, rtol=1e-4, atol=1e-4)


class _Shifted(torch.nn.Module):
    """D'(x) = D(x + y) - y: img2img starts from y + noise, the core sampler from pure noise."""

    def __init__(self, denoiser, y):
        super().__init__()
        self.denoiser, self.y = denoiser, y

    def forward(self, x, sigma, **kwargs):
        return self.denoiser(x + self.y, sigma) - self.y


def test_sd3_img2img_strength(sd3_components):
    pipe, counter = _pipeline_with_our_scheduler(StableDiffusion3Img2ImgPipeline, sd3_components)
    image = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    n, strength = 6, 0.5
    latents = pipe("a red dog", image=image, strength=strength, num_inference_steps=n, guidance_scale=3.0,
                   max_sequence_length=8, generator=torch.Generator().manual_seed(8), output_type="latent").images
    y = image  # 4 channels: the pipeline takes the image as clean latents
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(8))
    steps = int(n * strength)
    assert counter.calls == 2 * steps - 1
    with torch.no_grad():
        ref = samplers.sample(_Shifted(_sd3_denoiser(pipe, "a red dog", 3.0), y), noise,
                              pipe.scheduler.sigmas.double()[n - steps:])
    torch.testing.assert_close(latents, ref.sample + y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", ["unipc", "dpmpp_2m", "adams_alpha", "adams_alpha_adaptive"])
def test_sd3_pipeline_from_pure_noise_equals_core_sampler(sd3_components, solver):
    """The multistep solvers start at t = 1 as SD3 does: the transformer's first timestep is 1000,
    the latents are the pipeline's N(0, I) noise itself (init_noise_sigma = 1), and the pipeline
    equals the core sampler on the grid from sigma = inf; Flux-style flow times from t = 1 too."""
    pipe, counter = _pipeline_with_our_scheduler(StableDiffusion3Pipeline, sd3_components, solver=solver)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(6))
    common = dict(height=16, width=16, guidance_scale=4.0, max_sequence_length=8, output_type="latent")
    latents = pipe("a photo of a cat", num_inference_steps=4, latents=noise.clone(), **common).images
    scheduler = pipe.scheduler
    assert counter.calls == 4 and scheduler.timesteps[0].item() == M and scheduler.init_noise_sigma == 1.0
    assert scheduler.sigmas[0].item() == math.inf
    with torch.no_grad():
        ref = samplers.sample(_sd3_denoiser(pipe, "a photo of a cat", 4.0), noise, scheduler.sigmas.double(), solver=solver)
        custom = pipe("a photo of a cat", sigmas=[1.0, 0.75, 0.5, 0.25], latents=noise.clone(), **common).images
        assert pipe.scheduler.sigmas[0].item() == math.inf and pipe.scheduler.sigmas[1].item() == pytest.approx(9.0)
        custom_ref = samplers.sample(_sd3_denoiser(pipe, "a photo of a cat", 4.0), noise, pipe.scheduler.sigmas.double(),
                                     solver=solver)
    torch.testing.assert_close(latents, ref.sample, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(custom, custom_ref.sample, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_sd3_img2img_from_pure_noise(sd3_components, strength):
    """img2img with a solver that starts at t = 1: strength 1 starts from the noise itself
    (scale_noise at t = 1 drops the image), strength 0.5 from the image noised to the begin
    index's level, with a fresh plan."""
    pipe, counter = _pipeline_with_our_scheduler(StableDiffusion3Img2ImgPipeline, sd3_components, solver="unipc")
    image = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    n = 6
    latents = pipe("a red dog", image=image, strength=strength, num_inference_steps=n, guidance_scale=3.0,
                   max_sequence_length=8, generator=torch.Generator().manual_seed(8), output_type="latent").images
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(8))
    steps = int(n * strength)
    assert counter.calls == steps
    grid = pipe.scheduler.sigmas.double()[n - steps:]
    with torch.no_grad():
        if strength == 1.0:
            assert grid[0].item() == math.inf
            ref = samplers.sample(_sd3_denoiser(pipe, "a red dog", 3.0), noise, grid, solver="unipc").sample
        else:
            ref = samplers.sample(_Shifted(_sd3_denoiser(pipe, "a red dog", 3.0), image), noise, grid, solver="unipc").sample + image
    torch.testing.assert_close(latents, ref, rtol=1e-4, atol=1e-4)
