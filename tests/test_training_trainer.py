"""The EDM trainer: learning, exact resume, bad input, non-finite gradients, export, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from edm_sampling.training.checkpoint import CHECKPOINT_NAME, verify_checkpoint
from edm_sampling.training.config import TrainConfig
from edm_sampling.training.data import ImageDataset, load_builtin_digits
from edm_sampling.training.trainer import Trainer

TINY = dict(block_out_channels=(8, 16), progress=False, export=False, num_samples=0, log_every=1)


@pytest.fixture(scope="module")
def digits8():
    return load_builtin_digits(8)


def _config(tmp_path, name="run", **overrides):
    return TrainConfig(output_dir=str(tmp_path / name), **{**TINY, **overrides})


@torch.no_grad()
def _fixed_loss(trainer: Trainer, images: torch.Tensor) -> float:
    """The EDM loss on fixed images, sigmas and noise (a deterministic yardstick)."""
    trainer.model.eval()
    out = trainer.loss_fn(trainer.unwrapped, images, torch.Generator().manual_seed(123))
    return float(out.loss.mean())


def test_edm_loss_falls_on_builtin_digits(tmp_path, digits8):
    trainer = Trainer(_config(tmp_path, steps=200, batch_size=16, lr=3e-3, lr_warmup_images=1000, log_every=50), digits8)
    yardstick = digits8.images[:256]
    before = _fixed_loss(trainer, yardstick)
    result = trainer.run()
    after = _fixed_loss(trainer, yardstick)
    assert result.steps == 200 and result.skipped_steps == 0
    assert after < 0.6 * before, (before, after)
    assert {"loss_by_sigma", "lr", "images"} <= set(result.history[-1])


def _states(trainer: Trainer):
    return trainer.unwrapped.state_dict(), trainer.ema.state_dict(), trainer.optimizer.state_dict()["state"]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, digits8):
    small = ImageDataset(digits8.images[:40], digits8.labels[:40], 10)
    common = dict(batch_size=8, grad_accum=2, augment_p=0.5, class_conditional=True, dropout=0.1,
                  lr_warmup_images=32, ema_halflife_images=16, checkpoint_every=2)
    straight = Trainer(_config(tmp_path, "straight", steps=6, **common), small)
    straight.run()

    first = Trainer(_config(tmp_path, "split", steps=3, **common), small)
    first.run()  # "interrupted" after 3 steps, checkpoint written
    torch.manual_seed(999)  # whatever happened in between must not matter
    resumed = Trainer(_config(tmp_path, "split", steps=6, resume=True, **common), small)
    assert resumed.step == 3
    resumed.run()

    for a, b in zip(_states(straight), _states(resumed)):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], dict):
                for k in a[key]:
                    assert torch.equal(torch.as_tensor(a[key][k]), torch.as_tensor(b[key][k])), (key, k)
            else:
                assert torch.equal(a[key], b[key]), key
    assert resumed.images_seen == straight.images_seen == 48


def test_bad_input_rejected_before_training(tmp_path, digits8):
    with pytest.raises(ValueError, match="batch_size: must be an integer >= 1, got 0"):
        Trainer(_config(tmp_path, batch_size=0))
    with pytest.raises(ValueError, match="loss: must be one of edm, vp, ve, ddpm"):
        Trainer(_config(tmp_path, loss="l1"))
    with pytest.raises(ValueError, match="divisible"):
        Trainer(_config(tmp_path, batch_size=6, grad_accum=4), digits8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG or JPEG"):
        Trainer(_config(tmp_path, "fresh", data=str(tmp_path / "empty")))
    from PIL import Image

    (tmp_path / "mixed").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "mixed" / "a.png")
    Image.new("L", (16, 16)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ValueError, match="mixed sizes"):
        Trainer(_config(tmp_path, "fresh", data=str(tmp_path / "mixed")))
    assert not (tmp_path / "fresh").exists()  # nothing written for rejected runs

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / CHECKPOINT_NAME).write_bytes(b"precious")
    with pytest.raises(ValueError, match="holds a run with a checkpoint .*--resume .* or --overwrite"):
        Trainer(_config(tmp_path, "existing"), digits8)
    assert (existing / CHECKPOINT_NAME).read_bytes() == b"precious"
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer(_config(tmp_path, "nothing", resume=True), digits8)
    with pytest.raises(ValueError, match="resume: cannot be used together with --overwrite"):
        Trainer(_config(tmp_path, "existing", resume=True, overwrite=True), digits8)


def test_nonfinite_gradients_skip_the_step(tmp_path, digits8):
    images = digits8.images[:16].clone()
    images[3] = float("nan")
    bad = ImageDataset(images, digits8.labels[:16])
    trainer = Trainer(_config(tmp_path, steps=2, batch_size=16), bad)
    before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    result = trainer.run()
    assert result.skipped_steps == 2 and result.images_seen == 0
    for k, v in trainer.unwrapped.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cli_train_export_and_resume(tmp_path, capsys):
    """`edm-sampling train` end to end on tiny settings; the pipeline folder loads and samples."""
    from edm_sampling.cli import main

    out = tmp_path / "cli"
    args = ["train", "--output-dir", str(out), "--resolution", "8", "--channels", "8,16", "--steps", "2",
            "--batch-size", "8", "--num-samples", "4", "--sample-steps", "2", "--no-progress"]
    assert main(args) == 0
    assert (out / CHECKPOINT_NAME).is_file() and (out / "samples.png").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:  # an existing run is never overwritten silently
        main(args)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--batch-size", "0", "--output-dir", str(tmp_path / "x")])
    assert main(args[:8] + ["3"] + args[9:] + ["--resume"]) == 0
    state = json.loads(__import__("safetensors").safe_open(str(out / CHECKPOINT_NAME), "pt").metadata()["state"])
    assert state["step"] == 3

    from edm_sampling.pipelines import EDMPipeline
    from edm_sampling.samplers import sample
    from edm_sampling.schedulers import EDMScheduler
    from edm_sampling.schedules import karras_sigmas
    from edm_sampling.training.checkpoint import load_checkpoint
    from edm_sampling.training.preconditioning import precondition

    pipe = EDMPipeline.from_pretrained(out / "pipeline")
    assert isinstance(pipe.scheduler, EDMScheduler)
    assert pipe.scheduler.config.model_family == "edm" and pipe.scheduler.config.sigma_data == 0.5
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = pipe(batch_size=2, num_inference_steps=3, latents=latents, output_type="latent").images

    # the same samples from the core sampler on the checkpoint's EMA denoiser
    ema = precondition(pipe.unet.__class__.from_config(pipe.unet.config), "edm")
    ema.load_state_dict(load_checkpoint(out / CHECKPOINT_NAME)["ema"])
    with torch.no_grad():
        ref = sample(ema, latents, karras_sigmas(3)).sample
    torch.testing.assert_close(images, ref, rtol=1e-4, atol=1e-4)


def test_cli_trains_with_seeds_up_to_the_largest(tmp_path):
    """Every --seed in its range (up to 2^63 - 1) gives a data order and trains: each epoch of
    the global batches is a permutation of the data, and a different one per seed."""
    from edm_sampling.cli import main
    from edm_sampling.training.data import batch_indices

    orders = []
    for seed in (100_000_000_000_000, 2**63 - 1):
        out = tmp_path / str(seed)
        assert main(["train", "--output-dir", str(out), "--resolution", "8", "--channels", "8,16", "--steps", "1",
                     "--batch-size", "8", "--num-samples", "0", "--no-export", "--no-progress", "--seed", str(seed)]) == 0
        assert verify_checkpoint(out / CHECKPOINT_NAME)["config"]["seed"] == seed
        epoch = torch.cat([batch_indices(12, seed, step, 4) for step in range(3)])
        assert sorted(epoch.tolist()) == list(range(12))
        orders.append(epoch)
    assert not torch.equal(*orders)


def test_exported_folder_loads_with_diffusion_pipeline(tmp_path, digits8):
    import diffusers
    import edm_sampling.pipelines  # noqa: F401
    from edm_sampling.training.export import export_pipeline

    trainer = Trainer(_config(tmp_path, steps=1, batch_size=8), digits8)
    trainer.train_step()
    folder = export_pipeline(trainer, tmp_path / "pipe")
    with pytest.raises(ValueError, match="already exists"):
        export_pipeline(trainer, folder)
    assert diffusers.EDMPipeline is edm_sampling.pipelines.EDMPipeline  # registered on import
    # the folder names its loader file (edm_pipeline.py); without the class in hand diffusers needs
    # trust_remote_code=True to run it (tests/test_scheduler_contract.py checks that in a fresh process)
    pipe = edm_sampling.pipelines.EDMPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == "EDMPipeline"
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_cli_train_in_a_relative_output_dir_rewrites_its_own_files(tmp_path, monkeypatch):
    """The default --output-dir is relative ("edm-output-train"): every file written a second time
    (log.jsonl, the checkpoint, sample grids, pipeline/) must be recognised as the run's own, and
    --resume / --overwrite work there too."""
    from edm_sampling.cli import main

    monkeypatch.chdir(tmp_path)
    common = ["--resolution", "8", "--channels", "8,16", "--batch-size", "8", "--num-samples", "2", "--sample-steps", "2",
              "--log-every", "1", "--checkpoint-every", "2", "--no-progress"]
    assert main(["train", "--steps", "4", *common]) == 0
    run = tmp_path / "edm-output-train"
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert verify_checkpoint(run / CHECKPOINT_NAME)["step"] == 4 and (run / "pipeline" / "model_index.json").is_file()
    assert main(["train", "--steps", "6", "--resume", *common]) == 0
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert main(["train", "--steps", "2", "--overwrite", *common]) == 0
    assert verify_checkpoint(run / CHECKPOINT_NAME)["step"] == 2


def _saved_tensors(path):
    """The model, EMA and optimizer-state tensors of a checkpoint, by name."""
    from edm_sampling.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    moments = {f"optim.{i}.{k}": v for i, s in ckpt["optimizer"]["state"].items() for k, v in s.items()}
    return {**{f"model.{k}": v for k, v in ckpt["model"].items()}, **{f"ema.{k}": v for k, v in ckpt["ema"].items()},
            **moments}


def test_cli_resume_keeps_the_runs_own_settings(tmp_path, capsys):
    """`train --resume --steps 4 --output RUN` (an abbreviation) after a 2-step run with
    non-default flags takes every flag not typed from the checkpoint: the weights, EMA and Adam
    moments equal an uninterrupted 4-step run's bit for bit and the config is that run's (lr
    1e-3). A typed flag wins (--lr), a typed change of the setup is refused (--seed), and
    `--resume` alone on a finished run trains no step and says so."""
    from edm_sampling.cli import main

    flags = ["--resolution", "8", "--channels", "8,16", "--batch-size", "8", "--num-samples", "0", "--no-export",
             "--no-progress", "--lr", "1e-3", "--seed", "3", "--lr-warmup-images", "24", "--ema-halflife-images", "8",
             "--augment-p", "0.5", "--grad-accum", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--output-dir", str(straight), "--steps", "4", *flags]) == 0
    assert main(["train", "--output-dir", str(split), "--steps", "2", *flags]) == 0
    capsys.readouterr()
    torch.manual_seed(999)  # whatever happened in between must not matter
    assert main(["train", "--resume", "--steps", "4", "--output", str(split)]) == 0
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if line.startswith("settings from the checkpoint: "))
    assert "--lr 0.001" in note and "--seed 3" in note and "--grad-accum 2" in note and "--no-progress" in note
    assert "--steps" not in note and "--output-dir" not in note
    assert f"found a checkpoint at step 2 in {split}: resuming to step 4" in out

    expected, resumed = _saved_tensors(straight / CHECKPOINT_NAME), _saved_tensors(split / CHECKPOINT_NAME)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    run_config = {k: v for k, v in verify_checkpoint(straight / CHECKPOINT_NAME)["config"].items() if k != "output_dir"}
    saved = verify_checkpoint(split / CHECKPOINT_NAME)
    assert saved["step"] == 4 and saved["config"]["lr"] == 1e-3
    assert {k: v for k, v in saved["config"].items() if k != "output_dir"} == {**run_config, "resume": True}

    assert main(["train", "--resume", f"--output-dir={split}"]) == 0  # a finished run: nothing to do
    out = capsys.readouterr().out
    assert f"found a checkpoint at step 4 in {split}: the run is done (--steps 4)" in out
    assert "nothing to train: the run is at step 4 of 4" in out
    assert verify_checkpoint(split / CHECKPOINT_NAME)["step"] == 4
    assert all(torch.equal(expected[k], v) for k, v in _saved_tensors(split / CHECKPOINT_NAME).items())

    with pytest.raises(SystemExit) as exit_info:  # the data order is the seed's: refused, named as typed
        main(["train", "--resume", "--output-dir", str(split), "--steps", "5", "--se", "4"])
    assert exit_info.value.code == 2
    assert "--se: was 3 in the checkpoint being resumed, got 4" in capsys.readouterr().err
    assert main(["train", "--resume", "--output-dir", str(split), "--steps", "5", "--lr=5e-4"]) == 0
    saved = verify_checkpoint(split / CHECKPOINT_NAME)
    assert saved["step"] == 5 and saved["config"]["lr"] == 5e-4 and saved["config"]["seed"] == 3


def test_typed_fields_counts_every_spelling():
    """The fields a --resume takes from the checkpoint are those not typed, however typed:
    an abbreviation, --flag=value, a --no- switch, a flag whose field has another name."""
    from edm_sampling.training.command import typed_fields

    argv = ["train", "--output", "run", "--lr=1e-3", "--no-exp", "--channels", "8,16", "--resume", "--random-flip"]
    assert typed_fields(argv) == {"output_dir", "lr", "export", "block_out_channels", "resume", "random_flip"}
    assert typed_fields(["train"]) == set()
