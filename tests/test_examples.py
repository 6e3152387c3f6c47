"""Every script in examples/ runs on tiny models built from configs (its smoke test): the
swap into DDPM / DDIM, Stable Diffusion and SD3 pipelines, the benchmark of a local checkpoint,
fine-tuning a pretrained pipeline, and training on the digits."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_models import tiny_sd3_components, tiny_sd_components, tiny_unet2d, write_image_folder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(monkeypatch, capsys, script: str, *args: str) -> str:
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    from diffusers import DDIMPipeline, DDPMScheduler

    folder = tmp_path_factory.mktemp("ddim")
    DDIMPipeline(unet=tiny_unet2d(), scheduler=DDPMScheduler()).save_pretrained(folder)
    return folder


def test_every_example_has_a_smoke_test():
    tested = {"swap_scheduler_ddpm.py", "stable_diffusion.py", "sd3_flux.py", "bench_checkpoint.py",
              "finetune_pretrained.py", "train_digits.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.parametrize("solver, calls", [("heun", 5), ("unipc", 3)])
def test_swap_scheduler_ddpm(ddpm_folder, tmp_path, monkeypatch, capsys, solver, calls):
    out = _run(monkeypatch, capsys, "swap_scheduler_ddpm.py", "--model", str(ddpm_folder), "--solver", solver,
               "--steps", "3", "--batch-size", "2", "--output", str(tmp_path / "grid.png"))
    assert f"{calls} model calls" in out
    assert Image.open(tmp_path / "grid.png").size == (16, 8)


def test_stable_diffusion(tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**tiny_sd_components(tmp_path / "parts")).save_pretrained(tmp_path / "sd")
    out = _run(monkeypatch, capsys, "stable_diffusion.py", "--model", str(tmp_path / "sd"), "--steps", "4",
               "--output", str(tmp_path / "sd.png"))
    assert "'ipndm'" in out and "4 model calls" in out and (tmp_path / "sd.png").is_file()


def test_sd3(tmp_path, monkeypatch, capsys):
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline(**tiny_sd3_components(tmp_path / "parts")).save_pretrained(tmp_path / "sd3")
    out = _run(monkeypatch, capsys, "sd3_flux.py", "--model", str(tmp_path / "sd3"), "--steps", "3", "--no-t5",
               "--output", str(tmp_path / "sd3.png"))
    assert "StableDiffusion3Pipeline with EDMScheduler(adams_alpha_adaptive): 3 model calls" in out
    assert (tmp_path / "sd3.png").is_file()


def test_bench_checkpoint(ddpm_folder, tmp_path, monkeypatch, capsys):
    out = _run(monkeypatch, capsys, "bench_checkpoint.py", "--model", str(ddpm_folder), "--nfe", "5",
               "--num-samples", "4", "--output-dir", str(tmp_path / "bench"))
    assert "best edm_sampling / best diffusers" in out
    assert (tmp_path / "bench" / "results.csv").is_file()


def test_finetune_pretrained(ddpm_folder, tmp_path, monkeypatch, capsys):
    data = write_image_folder(tmp_path / "images", [(8, 8)] * 4)
    args = ["--pretrained", str(ddpm_folder), "--data", str(data), "--output-dir", str(tmp_path / "run"), "--steps", "2",
            "--batch-size", "2"]
    out = _run(monkeypatch, capsys, "finetune_pretrained.py", *args)
    assert "loads as DDIMPipeline" in out
    with pytest.raises(ValueError, match="--resume"):  # a second run into the same folder says what to pass
        _run(monkeypatch, capsys, "finetune_pretrained.py", *args)
    out = _run(monkeypatch, capsys, "finetune_pretrained.py", *args[:-4], "--steps", "3", "--batch-size", "2", "--resume")
    assert "resuming to step 3" in out and "3 steps" in out and "loads as DDIMPipeline" in out
    out = _run(monkeypatch, capsys, "finetune_pretrained.py", *args, "--overwrite")
    assert "starting a new run" in out and "2 steps" in out


def test_train_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = _run(monkeypatch, capsys, "train_digits.py", "--output-dir", str(tmp_path / "digits"), "--steps", "2")
    assert "2 steps" in out and (tmp_path / "digits" / "first_sample.png").is_file()
    out = _run(monkeypatch, capsys, "train_digits.py", "--output-dir", str(tmp_path / "digits"), "--steps", "3", "--resume")
    assert "found a checkpoint at step 2" in out and "resuming to step 3" in out and "3 steps" in out
    with pytest.raises(SystemExit):  # one or the other
        _run(monkeypatch, capsys, "train_digits.py", "--resume", "--overwrite")
