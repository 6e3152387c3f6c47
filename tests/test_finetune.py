"""Fine-tuning pretrained diffusers pipelines (issue 10): a tiny DDPMPipeline and a tiny
StableDiffusionPipeline, saved to disk, fine-tuned from an image folder with captions."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from edm_sampling.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from edm_sampling.training.config import TrainConfig
from edm_sampling.training.trainer import Trainer
from tiny_models import tiny_sd_components, tiny_unet2d, write_image_folder

QUIET = dict(progress=False, num_samples=0, export=False, log_every=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny pipelines and an image folder with captions, odd sizes and two bad files."""
    from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("finetune")
    DDPMPipeline(unet=tiny_unet2d(in_channels=3), scheduler=DDPMScheduler()).save_pretrained(root / "ddpm")
    StableDiffusionPipeline(**tiny_sd_components(root)).save_pretrained(root / "sd")
    write_image_folder(root / "data", sizes=[(20, 12), (12, 20), (16, 16), (24, 10), (10, 10), (32, 18)],
                       captions=["a red cat", "a blue dog", "a photo of a cat", "red", "", "a dog"], broken=True)
    return {"root": root, "ddpm": root / "ddpm", "sd": root / "sd", "data": root / "data"}


def _config(models, tmp_path, model="ddpm", name="run", **overrides) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / name), pretrained=str(models[model]), data=str(models["data"]),
                batch_size=2, steps=2, **QUIET)
    return TrainConfig(**{**base, **overrides})


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).square().flatten(1).mean(1)


def _ddpm_timesteps(sigma: torch.Tensor, scheduler) -> torch.Tensor:
    """The integer DDPM timesteps whose noise level is sigma (they must be exact levels)."""
    abar = scheduler.alphas_cumprod.double()
    levels = ((1 - abar) / abar).sqrt()
    t = (sigma.double().reshape(-1, 1) - levels).abs().argmin(1)
    torch.testing.assert_close(levels[t].float(), sigma.float(), rtol=1e-5, atol=0)  # diffusers: float32 alphas_cumprod
    return t


# ---- step-0 loss parity with the plain diffusers loss --------------------------------------

def test_step0_loss_equals_plain_diffusers_loss_pixel(models, tmp_path):
    """DDPM recipe on a DDPMPipeline: our loss == diffusers' epsilon-MSE on the same batch and noise."""
    from diffusers import DDPMPipeline

    trainer = Trainer(_config(models, tmp_path, loss="ddpm", batch_size=4, random_flip=True))
    batch = trainer.prepare_batch(0, 0)
    pipe = DDPMPipeline.from_pretrained(models["ddpm"])
    t = _ddpm_timesteps(batch.sigma, pipe.scheduler)
    with torch.no_grad():
        noisy = pipe.scheduler.add_noise(batch.y, batch.noise, t)
        plain = _mse(pipe.unet(noisy, t).sample, batch.noise).mean()
    ours = trainer.train_step()["loss"]
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=0)


def test_step0_loss_equals_plain_diffusers_loss_latent(models, tmp_path):
    """DDPM recipe on a StableDiffusionPipeline: same latents, captions, noise -> same loss as
    the diffusers text-to-image loop (encode_prompt, add_noise, epsilon-MSE)."""
    from diffusers import StableDiffusionPipeline

    trainer = Trainer(_config(models, tmp_path, "sd", loss="ddpm", batch_size=4))
    batch = trainer.prepare_batch(0, 0)
    pipe = StableDiffusionPipeline.from_pretrained(models["sd"])
    captions = [trainer.captions[i] for i in trainer.feed.indices(0, 0).tolist()]
    t = _ddpm_timesteps(batch.sigma, pipe.scheduler)
    with torch.no_grad():
        text, _ = pipe.encode_prompt(captions, "cpu", 1, do_classifier_free_guidance=False)
        torch.testing.assert_close(batch.model_kwargs["encoder_hidden_states"], text)
        noisy = pipe.scheduler.add_noise(batch.y, batch.noise, t)
        plain = _mse(pipe.unet(noisy, t, encoder_hidden_states=text).sample, batch.noise).mean()
        # the latents are a draw from the VAE posterior of the batch's images, scaled
        images = torch.stack([trainer.streamed[i]["image"] for i in trainer.feed.indices(0, 0).tolist()])
        posterior = pipe.vae.encode(images).latent_dist
        z = (batch.y / pipe.vae.config.scaling_factor - posterior.mean) / posterior.std
        assert z.abs().max() < 6 and 0.5 < z.std() < 1.5
    ours = trainer.train_step()["loss"]
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=0)


def test_edm_recipe_sigmas_clipped_to_the_model_and_weights(models, tmp_path):
    """The EDM recipe on a DDPM model: log-normal sigma inside the model's range, EDM lambda;
    the native weighting is MSE on the network's own output (epsilon here)."""
    from edm_sampling.training.losses import edm_weight

    trainer = Trainer(_config(models, tmp_path, loss="edm", p_mean=3.0, p_std=3.0))
    denoiser = trainer.unwrapped
    sigma = trainer.loss_fn.sample_sigma(4000, torch.Generator().manual_seed(0))
    assert sigma.min() >= denoiser.sigma_min * (1 - 1e-6) and sigma.max() <= denoiser.sigma_max * (1 + 1e-6)
    assert (sigma == sigma.max()).float().mean() > 0.1  # p_mean = 3: many draws clipped at the top
    s = torch.tensor([0.05, 1.0, 20.0])
    torch.testing.assert_close(trainer.loss_fn.weight(s), edm_weight(s, 0.5))
    native = Trainer(_config(models, tmp_path, name="native", loss="edm", loss_weighting="native"))
    torch.testing.assert_close(native.loss_fn.weight(s), 1 / s**2)
    batch = native.prepare_batch(0, 0)
    with torch.no_grad():  # native weighting == epsilon-MSE at the fractional timestep the denoiser feeds
        eps = -(native.unwrapped(batch.y + batch.sigma.reshape(-1, 1, 1, 1) * batch.noise, batch.sigma) - batch.y
                - batch.sigma.reshape(-1, 1, 1, 1) * batch.noise) / batch.sigma.reshape(-1, 1, 1, 1)
        ours = native.loss_fn.weight(batch.sigma) * _mse(native.unwrapped(batch.y + batch.sigma.reshape(-1, 1, 1, 1) * batch.noise, batch.sigma), batch.y)
    torch.testing.assert_close(ours, _mse(eps, batch.noise), rtol=1e-3, atol=1e-5)


# ---- end to end: CLI, export into the user's own pipeline ------------------------------------

def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_finetune_stable_diffusion_exports_the_original_pipeline(models, tmp_path, capsys):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    import edm_sampling.pipelines  # noqa: F401  (diffusers loads EDMScheduler from imported modules)
    from edm_sampling.cli import main
    from edm_sampling.schedulers import EDMScheduler

    out = tmp_path / "sd_run"
    args = ["train", "--pretrained", str(models["sd"]), "--data", str(models["data"]), "--output-dir", str(out),
            "--steps", "2", "--batch-size", "2", "--resolution", "16", "--random-flip", "--caption-dropout", "0.5",
            "--num-samples", "2", "--sample-steps", "2", "--checkpoint-every", "1", "--max-grad-norm", "1.0",
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bad.png" in printed and "zero.png" in printed  # reported by name ...
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["unreadable_images"] == 2 and log[-1]["images_per_second"] > 0  # ... and counted
    assert (out / "samples" / "step-0000001.png").is_file() and (out / "samples.png").is_file()

    exported = out / "pipeline"
    original, new = _files(models["sd"]), _files(exported)
    for name in ("vae", "text_encoder", "tokenizer"):
        keys = [k for k in original if k.startswith(name + "/")]
        assert keys and all(new[k] == original[k] for k in keys), name
    pipe = DiffusionPipeline.from_pretrained(exported)
    assert type(pipe) is StableDiffusionPipeline and isinstance(pipe.scheduler, EDMScheduler)
    ema = load_checkpoint(out / CHECKPOINT_NAME)["ema"]
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, ema["net.unet." + key]), key
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red cat", num_inference_steps=2, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_finetune_ddpm_export_original_scheduler_non_square(models, tmp_path):
    """Non-square training size, the original scheduler kept byte for byte, DDPMPipeline back."""
    from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline

    trainer = Trainer(_config(models, tmp_path, resolution="8,16", export=True, export_scheduler="original"))
    assert trainer.prepare_batch(0, 0).y.shape == (2, 3, 8, 16)
    result = trainer.run()
    exported = Path(result.pipeline_dir)
    original = _files(models["ddpm"])
    new = _files(exported)
    assert all(new[k] == original[k] for k in original if not k.startswith("unet/"))
    pipe = DiffusionPipeline.from_pretrained(exported)
    assert type(pipe) is DDPMPipeline and type(pipe.scheduler) is DDPMScheduler
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 8, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()  # the trained size


def _hub_snapshot(pipeline: Path, repo: Path) -> Path:
    """``pipeline`` laid out as a Hugging Face hub cache: snapshots/REV/... are relative links
    into blobs/SHA256, as `huggingface_hub` writes them."""
    import hashlib
    import os

    snapshot = repo / "snapshots" / "0123abc"
    shutil.copytree(pipeline, snapshot)
    (repo / "blobs").mkdir()
    for file in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        file.replace(blob)
        file.symlink_to(os.path.relpath(blob, file.parent))
    return snapshot


def test_finetune_a_hub_cache_snapshot_exports_real_files(models, tmp_path):
    """--pretrained a hub cache snapshot (every file a relative link into ../../blobs): the export
    holds real files, byte-identical to the model's own, and loads (a copied link would dangle)."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    snapshot = _hub_snapshot(models["sd"], tmp_path / "hub" / "models--me--tiny-sd")
    result = Trainer(_config(models, tmp_path, pretrained=str(snapshot), steps=1, batch_size=2, resolution=16,
                             export=True, export_scheduler="original")).run()
    exported = Path(result.pipeline_dir)
    original = _files(models["sd"])
    copied = [k for k in original if not k.startswith("unet/")]
    assert {"model_index.json", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"} <= set(copied)
    for name in copied:
        assert not (exported / name).is_symlink() and (exported / name).read_bytes() == original[name], name
    assert not any(p.is_symlink() for p in exported.rglob("*"))
    pipe = DiffusionPipeline.from_pretrained(exported)
    assert type(pipe) is StableDiffusionPipeline
    ema = load_checkpoint(Path(result.output_dir) / CHECKPOINT_NAME)["ema"]
    assert all(torch.equal(value, ema["net.unet." + key]) for key, value in pipe.unet.state_dict().items())


def test_resume_command_of_a_python_finetune(models, tmp_path):
    """The resume command printed for a fine-tune started from Python has the flags of its config
    and no others (no '--loss None': None is --loss's default); parsed by the CLI, it gives the
    same config with --resume."""
    import dataclasses

    from edm_sampling.cli import build_parser
    from edm_sampling.safety import resume_command
    from edm_sampling.training.command import config_argv

    config = TrainConfig(pretrained=str(models["ddpm"]), data=str(models["data"]), output_dir=str(tmp_path / "ft"))
    argv = config_argv(config)
    assert argv == ["train", "--output-dir", config.output_dir, "--data", config.data, "--pretrained", config.pretrained]
    args = build_parser().parse_args(shlex.split(resume_command(argv))[1:])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}) == dataclasses.replace(config, resume=True)


def test_scratch_ddpm_recipe_then_finetune_it(tmp_path):
    """`--loss ddpm` from scratch makes an epsilon DDPMPipeline; `--pretrained` fine-tunes it
    with the fine-tuning recipe (its own timesteps, balanced weighting) unless --loss is given."""
    from diffusers import DDPMPipeline, DiffusionPipeline

    from edm_sampling.cli import main

    common = ["--resolution", "8", "--channels", "8,16", "--steps", "2", "--batch-size", "4", "--num-samples", "0",
              "--no-progress"]
    assert main(["train", "--loss", "ddpm", "--export-scheduler", "original", "--output-dir", str(tmp_path / "eps"),
                 *common]) == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "eps" / "pipeline")
    assert type(pipe) is DDPMPipeline and pipe.scheduler.config.prediction_type == "epsilon"
    digits = tmp_path / "digits"
    write_image_folder(digits, sizes=[(8, 8)] * 4, mode="L")
    assert main(["train", "--pretrained", str(tmp_path / "eps" / "pipeline"), "--data", str(digits),
                 "--output-dir", str(tmp_path / "ft"), *common[4:]]) == 0
    state = load_checkpoint(tmp_path / "ft" / CHECKPOINT_NAME)["state"]
    assert state["config"]["pretrained"] and state["config"]["loss"] is None and state["loss"]["balanced"]


# ---- exact resume through streaming, latents, captions --------------------------------------

def _assert_same_state(a: Trainer, b: Trainer) -> None:
    for x, y in ((a.unwrapped.state_dict(), b.unwrapped.state_dict()), (a.ema.state_dict(), b.ema.state_dict())):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in sa:
        for name in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name])), (k, name)


@pytest.mark.parametrize("cache", [False, True])
def test_latent_resume_is_bit_exact(models, tmp_path, cache):
    common = dict(batch_size=4, grad_accum=2, random_flip=True, caption_dropout=0.5, checkpoint_every=2,
                  cache_latents=cache, lr=1e-3, lr_warmup_images=8)
    straight = Trainer(_config(models, tmp_path, "sd", "straight", steps=4, **common))
    straight.run()
    Trainer(_config(models, tmp_path, "sd", "split", steps=2, **common)).run()
    torch.manual_seed(123)
    resumed = Trainer(_config(models, tmp_path, "sd", "split", steps=4, resume=True, **common))
    assert resumed.step == 2
    resumed.run()
    _assert_same_state(straight, resumed)
    assert resumed.images_seen == 16


def test_cached_latents_equal_per_batch_encoding(models, tmp_path, monkeypatch):
    """The cache holds what per-batch encoding gives; a valid cache is reused, and one built with
    the VAE in another dtype (bf16 on a GPU) is not: the key holds the VAE's dtype."""
    import numpy as np

    import edm_sampling.training.trainer as trainer_module

    common = dict(batch_size=4, random_flip=True)
    plain = Trainer(_config(models, tmp_path, "sd", "plain", **common)).prepare_batch(1, 0)
    cached_trainer = Trainer(_config(models, tmp_path, "sd", "cached", cache_latents=True, **common))
    cached = cached_trainer.prepare_batch(1, 0)
    cached_trainer.close()  # a Trainer holds its run folder until it runs or is closed
    torch.testing.assert_close(cached.y, plain.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.noise, plain.noise, rtol=0, atol=0)
    assert (tmp_path / "cached" / "latent_cache" / "moments.npy").is_file()
    cache_file = tmp_path / "cached" / "latent_cache" / "moments.npy"
    stamp = cache_file.stat().st_mtime_ns
    again = dict(cache_latents=True, resume=False, overwrite=True, **common)
    Trainer(_config(models, tmp_path, "sd", "cached", **again)).close()
    assert cache_file.stat().st_mtime_ns == stamp  # a valid cache is reused
    float32 = np.load(cache_file)

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "frozen_dtype", lambda device, mixed_precision: torch.bfloat16)  # as on a GPU
        half = Trainer(_config(models, tmp_path, "sd", "cached", **again))
        half.close()
    assert half.codec.vae.dtype == torch.bfloat16 and cache_file.stat().st_mtime_ns != stamp
    bfloat16 = np.load(cache_file)
    assert not np.array_equal(bfloat16, float32)  # encoded in bf16
    Trainer(_config(models, tmp_path, "sd", "cached", **again)).close()  # float32 again: not the bf16 cache
    assert np.array_equal(np.load(cache_file), float32)


def test_dataloader_workers_give_the_same_batches(models, tmp_path):
    a = Trainer(_config(models, tmp_path, name="w0", batch_size=4, random_flip=True))
    b = Trainer(_config(models, tmp_path, name="w2", batch_size=4, random_flip=True, num_workers=2))
    for step in range(3):
        torch.testing.assert_close(b.prepare_batch(step, 0).y, a.prepare_batch(step, 0).y, rtol=0, atol=0)
    b.feed.close()


# ---- training options ------------------------------------------------------------------------

def test_gradient_clipping_and_checkpointing(models, tmp_path):
    clipped = Trainer(_config(models, tmp_path, name="clip", max_grad_norm=1e-3, gradient_checkpointing=True))
    clipped.train_step()
    exp_avg = [s["exp_avg"] for s in clipped.optimizer.state_dict()["state"].values()]
    assert torch.stack([m.norm() for m in exp_avg]).norm() <= 0.1 * 1e-3 * (1 + 1e-4)  # (1 - beta1) * clipped grad
    assert clipped.unwrapped.net.unet.is_gradient_checkpointing
    plain = Trainer(_config(models, tmp_path, name="noclip"))
    plain.train_step()
    exp_avg = [s["exp_avg"] for s in plain.optimizer.state_dict()["state"].values()]
    assert torch.stack([m.norm() for m in exp_avg]).norm() > 0.1 * 1e-3 * 10


# ---- bad input: one clear error naming the flag, before any write ---------------------------

def _cli_error(args: list[str], capsys) -> str:
    from edm_sampling.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", *args, "--no-progress"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_names_the_flag_before_any_write(models, tmp_path, capsys):
    out = tmp_path / "never"
    base = ["--output-dir", str(out), "--data", str(models["data"])]
    (tmp_path / "plain").mkdir()
    assert "--pretrained" in _cli_error(["--pretrained", str(tmp_path / "plain"), *base], capsys)

    flow = tmp_path / "flow"
    shutil.copytree(models["ddpm"], flow)
    (flow / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}))
    assert "--pretrained: cannot precondition" in _cli_error(["--pretrained", str(flow), *base], capsys)

    err = _cli_error(["--pretrained", str(models["sd"]), "--caption-column", "prompt", *base], capsys)
    assert "--caption-column" in err and "'prompt'" in err
    err = _cli_error(["--pretrained", str(models["sd"]), "--resolution", "18", *base], capsys)
    assert "--resolution" in err and "multiples of 4" in err
    assert "--scheduler-config" in _cli_error(["--pretrained", str(models["ddpm"] / "unet"), *base], capsys)
    assert "--loss" in _cli_error(["--pretrained", str(models["ddpm"]), "--loss", "ve", *base], capsys)
    assert "--noise-distribution" in _cli_error(["--pretrained", str(models["ddpm"]), "--noise-distribution", "x", *base], capsys)
    assert not out.exists()


def test_bare_unet_with_scheduler_config(models, tmp_path):
    from diffusers import DDPMPipeline, DiffusionPipeline

    from edm_sampling.schedulers import EDMScheduler

    config = _config(models, tmp_path, pretrained=str(models["ddpm"] / "unet"),
                     scheduler_config=str(models["ddpm"] / "scheduler"), export=True)
    result = Trainer(config).run()
    pipe = DiffusionPipeline.from_pretrained(result.pipeline_dir)
    assert type(pipe) is DDPMPipeline and isinstance(pipe.scheduler, EDMScheduler)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_native_weighting_is_the_diffusers_target_mse(prediction_type):
    """--loss ddpm on epsilon / v / sample models == diffusers' MSE against its own target
    (noise, get_velocity, the clean image) at the same timesteps and noise."""
    from diffusers import DDPMScheduler

    from edm_sampling.training.losses import FamilyLoss, denoising_loss
    from edm_sampling.training.preconditioning import precondition

    scheduler = DDPMScheduler(prediction_type=prediction_type)
    unet = tiny_unet2d(in_channels=3)
    denoiser = precondition(unet, "ddpm", scheduler_config=scheduler.config)
    loss = FamilyLoss(denoiser, "ddpm", "native")
    g = torch.Generator().manual_seed(0)
    y = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    sigma = loss.sample_sigma(6, g)
    noise = torch.randn(y.shape, generator=g)
    t = _ddpm_timesteps(sigma, scheduler)
    with torch.no_grad():
        ours = denoising_loss(denoiser, y, sigma, noise, loss.weight(sigma)).loss
        target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(y, noise, t), "sample": y}[prediction_type]
        plain = _mse(unet(scheduler.add_noise(y, noise, t), t).sample, target)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-6)
