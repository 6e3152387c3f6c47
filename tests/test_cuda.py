"""CUDA, float16 and bfloat16 paths. Skipped without a GPU (CI has none); run on a GPU machine
with `pytest tests/test_cuda.py`."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from edm_sampling.denoisers import DiscreteVPDenoiser
from edm_sampling.oracles import builtin_gaussian
from edm_sampling.samplers import sample
from edm_sampling.schedules import karras_sigmas

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def tiny_unet(**kwargs):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, **kwargs)


def test_core_sampler_on_cuda_matches_cpu_with_cpu_generators():
    oracle = builtin_gaussian()
    seeds = [3, 4, 5]
    z = torch.cat([torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    runs = {}
    for device in ("cpu", "cuda"):
        gens = [torch.Generator().manual_seed(s + 100) for s in seeds]
        runs[device] = sample(oracle.to(device), z.to(device), karras_sigmas(12), s_churn=10, generator=gens).sample.cpu()
    torch.testing.assert_close(runs["cuda"], runs["cpu"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet_on_cuda(dtype):
    unet = tiny_unet().to(CUDA)
    denoiser32 = DiscreteVPDenoiser.from_scheduler_config(unet, DDPMScheduler().config)
    z = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        reference = sample(denoiser32, z, karras_sigmas(6, 0.01, 80)).sample
        half = DiscreteVPDenoiser.from_scheduler_config(unet.to(dtype), DDPMScheduler().config)
        out = sample(half, z, karras_sigmas(6, 0.01, 80))
    assert out.sample.dtype == torch.float32 and out.nfe == 11
    assert torch.isfinite(out.sample).all()
    assert (out.sample - reference).abs().mean() < 0.05 * reference.abs().mean() + 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["discrete_vp", "edm", "flow"])
def test_scheduler_in_ddpm_pipeline_half_precision_without_host_sync(dtype, family):
    from diffusers import DDPMPipeline

    from edm_sampling.schedulers import EDMScheduler

    unet = tiny_unet().to(CUDA, dtype)
    scheduler = EDMScheduler(model_family=family, s_churn=20, s_tmin=0.05, s_tmax=50)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler).to(CUDA)
    pipe.set_progress_bar_config(disable=True)

    original_step = scheduler.step

    def step_without_sync(*args, **kwargs):
        """No host-device sync in any call but the last, whose one finiteness check syncs once."""
        last = scheduler.step_index is not None and scheduler.step_index == len(scheduler.timesteps) - 1
        torch.cuda.set_sync_debug_mode("default" if last else "error")
        try:
            return original_step(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    scheduler.step = step_without_sync
    generator = [torch.Generator(CUDA).manual_seed(s) for s in range(3)]
    # "pt": DDPMPipeline's numpy conversion cannot take bfloat16, whatever the scheduler
    images = pipe(batch_size=3, num_inference_steps=8, generator=generator, output_type="pt").images
    assert images.shape == (3, 3, 16, 16) and images.dtype == dtype
    assert torch.isfinite(images.float()).all() and (images >= 0).all() and (images <= 1).all()


def test_stable_diffusion_fp16_with_edm_scheduler(tmp_path):
    from diffusers import StableDiffusionPipeline
    from tiny_models import tiny_sd_components

    from edm_sampling.schedulers import EDMScheduler

    parts = tiny_sd_components(tmp_path)
    pipe = StableDiffusionPipeline(**parts).to(CUDA, torch.float16)
    pipe.scheduler = EDMScheduler.from_config(pipe.scheduler.config, s_churn=10)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a tiny prompt", num_inference_steps=6, guidance_scale=5.0, output_type="latent",
               generator=torch.Generator(CUDA).manual_seed(0)).images
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_adaptive_solver_core_on_cuda_matches_cpu():
    """adams_alpha_adaptive's per-sample fit reads its Gram matrices back from the device and sends
    the coefficients to it: the CUDA run equals the CPU run."""
    oracle = builtin_gaussian()
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    runs = {device: sample(oracle.to(device), z.to(device), karras_sigmas(9, 0.01, 80), solver="adams_alpha_adaptive").sample.cpu()
            for device in ("cpu", "cuda")}
    torch.testing.assert_close(runs["cuda"], runs["cpu"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adaptive_scheduler_in_ddpm_pipeline_half_precision(dtype):
    """adams_alpha_adaptive through EDMScheduler with a half-precision UNet on CUDA: finite, and within
    a few percent of the float32 run (its coefficients are applied in the state's float32)."""
    from diffusers import DDPMPipeline

    from edm_sampling.schedulers import EDMScheduler

    images = {}
    for run_dtype in (torch.float32, dtype):
        scheduler = EDMScheduler.from_config(DDPMScheduler().config, solver="adams_alpha_adaptive")
        pipe = DDPMPipeline(unet=tiny_unet().to(CUDA, run_dtype), scheduler=scheduler).to(CUDA)
        pipe.set_progress_bar_config(disable=True)
        generator = [torch.Generator(CUDA).manual_seed(s) for s in range(3)]
        images[run_dtype] = pipe(batch_size=3, num_inference_steps=8, generator=generator, output_type="pt").images.float()
    assert torch.isfinite(images[dtype]).all()
    assert (images[dtype] - images[torch.float32]).abs().mean() < 0.05
