"""The fine-tuning recipe of a pretrained model: the balanced loss weighting (1 / the model's own
loss at each noise level, measured before step 1), the "native" noise distribution, and the
defaults of `--pretrained` runs (benchmarks/finetune_quality.py has the measurements)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edm_sampling.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from edm_sampling.training.config import TrainConfig
from edm_sampling.training.losses import (
    CALIBRATION_LEVELS,
    BalancedWeight,
    DiscreteTimestepSigma,
    FamilyLoss,
    LogNormalSigma,
    per_sigma_loss,
)
from edm_sampling.training.preconditioning import precondition
from edm_sampling.training.trainer import Trainer
from tiny_models import tiny_unet2d, write_image_folder

QUIET = dict(progress=False, num_samples=0, export=False, log_every=1)


def _pretrained_the_plain_way(images: torch.Tensor, steps: int = 80):
    """A tiny DDPMPipeline trained briefly by the plain diffusers loop (random timesteps,
    add_noise, epsilon-MSE), so that its loss differs between noise levels as a real one's does."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet, scheduler = tiny_unet2d(in_channels=3).train(), DDPMScheduler()
    optimizer = torch.optim.Adam(unet.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        noise = torch.randn(images.shape, generator=generator)
        t = torch.randint(0, 1000, (len(images),), generator=generator)
        loss = (unet(scheduler.add_noise(images, noise, t), t).sample - noise).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return DDPMPipeline(unet=unet.eval(), scheduler=scheduler)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from edm_sampling.training.data import load_image_folder

    root = tmp_path_factory.mktemp("weighting")
    write_image_folder(root / "data", sizes=[(8, 8)] * 16)
    _pretrained_the_plain_way(load_image_folder(root / "data").images).save_pretrained(root / "ddpm")
    return {"ddpm": root / "ddpm", "data": root / "data"}


def _config(models, tmp_path, name="run", **overrides) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / name), pretrained=str(models["ddpm"]), data=str(models["data"]),
                batch_size=8, steps=2, **QUIET)
    return TrainConfig(**{**base, **overrides})


def test_balanced_weight_interpolates_log_loss_linearly_in_log_sigma():
    levels = torch.tensor([0.01, 0.3, 2.0, 150.0], dtype=torch.float64)
    losses = torch.tensor([1e-5, 0.02, 0.4, 30.0], dtype=torch.float64)
    weight = BalancedWeight(levels, losses)
    sigma = torch.tensor([0.001, 0.01, 0.05, 0.3, 1.0, 2.0, 40.0, 150.0, 1e4])
    expected = 1 / np.exp(np.interp(np.log(sigma.double().numpy()), np.log(levels.numpy()), np.log(losses.numpy())))
    torch.testing.assert_close(weight(sigma).double(), torch.from_numpy(expected), rtol=1e-5, atol=0)
    assert weight(sigma).dtype == torch.float32 and weight(sigma).device == sigma.device
    again = BalancedWeight.from_state_dict(weight.state_dict())  # the checkpoint's JSON round trip
    assert torch.equal(again(sigma), weight(sigma))


def test_balanced_weight_rejects_bad_tables():
    with pytest.raises(ValueError, match="increasing"):
        BalancedWeight(torch.tensor([1.0, 0.5]), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="finite and > 0"):
        BalancedWeight(torch.tensor([0.5, 1.0]), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="finite and > 0"):
        BalancedWeight(torch.tensor([0.5, 1.0]), torch.tensor([float("nan"), 2.0]))


def test_balanced_weighting_makes_the_pretrained_loss_one_at_every_sigma(models, tmp_path):
    """The default `--pretrained` recipe: after calibration, lambda(sigma) x (the model's loss at
    sigma) = 1, checked the plain diffusers way (add_noise, epsilon-MSE, D-space loss =
    sigma^2 x epsilon-MSE) with fresh noise at timesteps between the calibration levels."""
    from diffusers import DDPMPipeline

    trainer = Trainer(_config(models, tmp_path))
    assert trainer.config.recipe == ("native", "balanced")
    assert isinstance(trainer.loss_fn.sampler, DiscreteTimestepSigma)  # native noise of a DDPM model
    assert not trainer.loss_fn.needs_calibration and trainer.unwrapped.training
    assert len(trainer.loss_fn.balanced.levels) == CALIBRATION_LEVELS
    pipe = DDPMPipeline.from_pretrained(models["ddpm"])
    images = torch.stack([trainer.streamed[i]["image"] for i in range(len(trainer.streamed))]).repeat(4, 1, 1, 1)
    abar = pipe.scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(1234)
    native = []
    for t in (3, 40, 250, 600, 999):
        sigma = float(((1 - abar[t]) / abar[t]).sqrt())
        noise = torch.randn(images.shape, generator=generator)
        steps = torch.full((len(images),), t)
        with torch.no_grad():
            eps_mse = (pipe.unet(pipe.scheduler.add_noise(images, noise, steps), steps).sample - noise).square().mean()
        balanced = trainer.loss_fn.weight(torch.tensor([sigma])) * sigma**2 * eps_mse
        assert 0.85 < float(balanced) < 1.15, (t, float(balanced))
        native.append(float(eps_mse))
    assert max(native) > 3 * min(native)  # the native weighting's losses are far from equal


def test_per_sigma_loss_restores_the_mode_and_needs_images():
    denoiser = precondition(tiny_unet2d(in_channels=3), "ddpm").train()
    batches = [SimpleNamespace(y=torch.rand(3, 3, 8, 8) * 2 - 1, model_kwargs={}) for _ in range(2)]
    levels = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    losses = per_sigma_loss(denoiser, batches, levels, images=5)
    assert denoiser.training and losses.shape == (3,) and bool((losses > 0).all())
    assert bool(losses[2] > losses[0])  # an untrained epsilon net: D error grows with sigma
    with pytest.raises(ValueError, match="training images"):
        per_sigma_loss(denoiser, [], levels)


def test_recipe_defaults():
    scratch = TrainConfig()
    assert scratch.loss == "edm" and scratch.recipe == ("lognormal", "edm")
    assert TrainConfig(loss="ddpm").recipe == ("ddpm", "native")
    assert TrainConfig(pretrained="p").loss is None and TrainConfig(pretrained="p").recipe == ("native", "balanced")
    assert TrainConfig(pretrained="p", loss="edm").recipe == ("lognormal", "edm")
    assert TrainConfig(pretrained="p", loss="ddpm").recipe == ("ddpm", "native")
    assert TrainConfig(pretrained="p", loss_weighting="native").recipe == ("native", "native")


def test_native_noise_of_an_edm_model_is_edm_lognormal_and_balanced_spans_edm_range():
    denoiser = precondition(tiny_unet2d(in_channels=3), "edm")
    loss = FamilyLoss(denoiser, "native", "balanced", p_mean=-1.0, p_std=1.5)
    assert loss.sampler == LogNormalSigma(-1.0, 1.5, float(denoiser.sigma_min), float(denoiser.sigma_max))
    with pytest.raises(RuntimeError, match="not calibrated"):
        loss.weight(torch.tensor([1.0]))
    batches = [SimpleNamespace(y=torch.rand(4, 3, 8, 8) * 2 - 1, model_kwargs={})]
    table = loss.calibrate(denoiser, batches)
    assert table.levels[0] == pytest.approx(0.002) and table.levels[-1] == pytest.approx(80.0)  # EDM's range
    assert loss.state_dict()["balanced"] == table.state_dict()


@pytest.mark.parametrize("flag, value, message", [
    ("loss_weighting", "uniform", "loss_weighting: must be one of native, edm, balanced"),
    ("noise_distribution", "loguniform", "noise_distribution: must be one of native, lognormal, ddpm"),
])
def test_bad_recipe_values_name_the_flag(models, tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        Trainer(_config(models, tmp_path, **{flag: value}))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=message):
        FamilyLoss(precondition(tiny_unet2d(in_channels=3), "ddpm"), **{flag.replace("loss_", ""): value})


def test_balanced_resume_is_bit_exact_and_keeps_the_step0_table(models, tmp_path):
    """The table is measured once, on the pretrained weights, and travels in the checkpoint: a
    resumed run (whose weights are no longer the pretrained ones) uses the same weights."""
    common = dict(batch_size=8, random_flip=True, lr=1e-3, lr_warmup_images=8)
    straight = Trainer(_config(models, tmp_path, "straight", steps=4, **common))
    straight.run()
    Trainer(_config(models, tmp_path, "split", steps=2, **common)).run()
    resumed = Trainer(_config(models, tmp_path, "split", steps=4, resume=True, **common))
    assert resumed.step == 2
    assert resumed.loss_fn.balanced.state_dict() == straight.loss_fn.balanced.state_dict()
    resumed.run()
    for a, b in ((straight.unwrapped.state_dict(), resumed.unwrapped.state_dict()),
                 (straight.ema.state_dict(), resumed.ema.state_dict())):
        for key in a:
            assert torch.equal(a[key], b[key]), key
    saved = load_checkpoint(tmp_path / "split" / CHECKPOINT_NAME)["state"]["loss"]
    assert saved == straight.loss_fn.state_dict()


def test_cli_flags_reach_the_recipe(models, tmp_path):
    from edm_sampling.cli import main

    out = tmp_path / "cli"
    assert main(["train", "--pretrained", str(models["ddpm"]), "--data", str(models["data"]), "--output-dir", str(out),
                 "--steps", "1", "--batch-size", "4", "--num-samples", "0", "--no-progress",
                 "--noise-distribution", "lognormal", "--loss-weighting", "balanced", "--p-mean", "0.5"]) == 0
    state = load_checkpoint(out / CHECKPOINT_NAME)["state"]
    assert state["config"]["noise_distribution"] == "lognormal" and state["config"]["p_mean"] == 0.5
    assert len(state["loss"]["balanced"]["levels"]) == CALIBRATION_LEVELS
