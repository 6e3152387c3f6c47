"""`edm-sampling bench` / `tune` end to end on CPU: outputs, convergence order, equal-NFE
comparison with diffusers' samplers, process-count independence, model folders, bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edm_sampling.cli import main
from edm_sampling.evaluation.metrics import loglog_slope
from edm_sampling.evaluation.samplers_registry import DEFAULT_SAMPLERS
from edm_sampling.evaluation.sweep import SweepConfig, run_sweep

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *extra: str) -> list[str]:
    return ["bench", "--stats-cache", str(tmp_path / "cache"), "--no-progress", *extra]


def test_small_sweep_writes_every_output_within_a_minute(tmp_path, capsys):
    out = tmp_path / "bench"
    # its wall time (about 3 s here) is reported in the notes, not asserted: machines are noisy
    assert main(_bench(tmp_path, "--model", "gaussian", "--nfe", "4,9", "--num-samples", "16", "--output-dir", str(out))) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "wall time:" in printed and "edm-heun" in printed and "dpmpp-2m-karras" in printed
    assert printed.lstrip().startswith("samplers: the default set, the paper's Heun (edm-heun), our recommended")
    assert f"anchors ({len(DEFAULT_SAMPLERS)} rows). Others: --samplers paper | core | scheduler | diffusers | all | NAME,..." in printed
    # the even NFE is said once, on stderr while sampling starts, and again under the tables
    assert "NFE 4: these samplers cannot make exactly 4 calls" in captured.err
    assert "edm-heun (3)" in printed and "heun-karras (3)" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["sampler"] for r in rows[::2]] == list(DEFAULT_SAMPLERS)
    payload = json.loads((out / "results.json").read_text())
    assert payload["meta"]["reference_statistics"]["cache"].startswith(str(tmp_path / "cache"))
    assert (out / "quality_vs_nfe.png").stat().st_size > 1000
    grids = sorted(p.name for p in (out / "grids").iterdir())
    assert len(grids) == len(DEFAULT_SAMPLERS) * 2 and "edm-heun_nfe9.png" in grids
    by_name = {(r["sampler"], int(r["nfe_target"])): r for r in rows}
    # the sweep lists diffusers' samplers beside ours at equal (measured) NFE
    for name in DEFAULT_SAMPLERS:  # every row, the analytical-first-step one included, counted by wrapping the model
        assert int(by_name[(name, 9)]["nfe"]) == 9, name
    # an even target: Heun-type samplers take the largest count not above it, and say so
    assert int(by_name[("edm-heun", 4)]["nfe"]) == 3 and int(by_name[("heun-karras", 4)]["nfe"]) == 3
    assert int(by_name[("ddim", 4)]["nfe"]) == 4
    assert float(by_name[("edm-heun", 9)]["fd"]) > 0
    # the reference statistics came from the cache the second time; the folder is not overwritten silently
    with pytest.raises(SystemExit):
        main(_bench(tmp_path, "--model", "gaussian", "--nfe", "3", "--samplers", "edm-euler", "--num-samples", "4", "--output", str(out)))
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(_bench(tmp_path, "--model", "gaussian", "--nfe", "3", "--samplers", "edm-euler", "--num-samples", "4", "--output", str(out),
                       "--overwrite", "--grid-images", "0")) == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["meta"]["reference_statistics"]["loaded_from_cache"] is True
    assert not (out / "grids").exists()


def test_heun_error_falls_at_second_order_on_the_builtin_model(tmp_path):
    config = SweepConfig(model="gaussian", samplers=["edm-heun", "edm-euler"], nfe=[9, 17, 35, 63], num_samples=16,
                         progress=False, stats_cache=str(tmp_path))
    rows = run_sweep(config)["rows"]
    heun = [r for r in rows if r["sampler"] == "edm-heun"]
    euler = [r for r in rows if r["sampler"] == "edm-euler"]
    assert [r["nfe"] for r in heun] == [9, 17, 35, 63]
    heun_slope = loglog_slope([r["nfe"] for r in heun], [r["error_median"] for r in heun])
    euler_slope = loglog_slope([r["nfe"] for r in euler], [r["error_median"] for r in euler])
    assert -2.6 < heun_slope < -1.7, heun_slope
    assert -1.3 < euler_slope < -0.7, euler_slope
    assert heun[-1]["error_mean"] < euler[-1]["error_mean"]


def _rows_key(rows):
    return [(r["sampler"], r["nfe"], r["error_mean"], r["error_median"], r["fd"]) for r in rows]


def _free_port() -> int:
    """A TCP port nothing listens on now (two test runs on one machine must not share one)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_one_and_two_processes_give_the_same_results(tmp_path):
    # one batch would hold every sample (as with the defaults, 256 and 256): each process still gets half
    args = ["--model", "gaussian", "--nfe", "5", "--samplers", "edm-heun-churn,edm-heun,ddim", "--num-samples", "6", "--batch-size", "6",
            "--stats-cache", str(tmp_path / "cache"), "--no-progress", "--grid-images", "0"]
    single = run_sweep(SweepConfig(model="gaussian", samplers=["edm-heun-churn", "edm-heun", "ddim"], nfe=[5], num_samples=6,
                                   batch_size=3, progress=False, stats_cache=str(tmp_path / "cache")))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
               "-m", "edm_sampling.cli", "bench", "--output", str(tmp_path / "two"), *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(2 process(es))" in done.stdout
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["meta"]["num_processes"] == 2 and two["meta"]["samples_per_process"] == [3, 3]
    expected = [(s, n, None if np.isnan(a) else a, None if np.isnan(b) else b, f) for s, n, a, b, f in _rows_key(single["rows"])]
    assert _rows_key(two["rows"]) == expected
    assert np.isnan(single["rows"][0]["error_mean"]) and np.isfinite(single["rows"][0]["fd"])  # churn: no ODE reference


@pytest.fixture
def ddpm_folder(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler
    from tiny_models import tiny_unet2d

    path = tmp_path / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet2d(in_channels=1, num_class_embeds=3), scheduler=DDPMScheduler()).save_pretrained(path)
    return path


def test_bench_on_a_local_diffusers_folder(tmp_path, ddpm_folder):
    result = run_sweep(SweepConfig(model=str(ddpm_folder), samplers=["edm-heun", "ddim", "dpmpp-2m-karras"], nfe=[3],
                                   num_samples=4, reference_steps=8, progress=False, output=str(tmp_path / "out")))
    rows = {r["sampler"]: r for r in result["rows"]}
    assert {r["nfe"] for r in rows.values()} == {3}
    assert all(np.isfinite(r["error_mean"]) for r in rows.values())
    assert all(np.isnan(r["fd"]) for r in rows.values())  # no reference data for a user model without --reference
    assert result["meta"]["ode_reference"].startswith("Heun, 8 steps")
    assert (tmp_path / "out" / "grids" / "ddim_nfe3.png").exists()
    # with reference images the Frechet distance is computed
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray((np.random.default_rng(i).random((8, 8, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    result = run_sweep(SweepConfig(model=str(ddpm_folder), samplers=["edm-euler"], nfe=[2], num_samples=4, reference_steps=0,
                                   reference=str(images), stats_cache=str(tmp_path / "cache"), progress=False,
                                   output=str(tmp_path / "with-reference")))
    assert np.isfinite(result["rows"][0]["fd"]) and np.isnan(result["rows"][0]["error_mean"])
    # the grid shows the --reference images beside the samples: two panels side by side
    alone = Image.open(tmp_path / "out" / "grids" / "ddim_nfe3.png")  # no data to show: one panel
    beside = Image.open(tmp_path / "with-reference" / "grids" / "edm-euler_nfe2.png")
    assert _panels(beside) == 2 and _panels(alone) == 1


def _panels(image, gap: int = 10) -> int:
    """Image panels side by side in a titled grid: groups of non-white columns below the captions,
    separated by at least `gap` white columns (a grid's own padding between images is thinner)."""
    pixels = np.asarray(image.convert("L"))
    inked = np.flatnonzero((pixels[pixels.shape[0] // 2:] < 250).any(axis=0))  # the grids' lower half
    return 0 if len(inked) == 0 else 1 + int(np.sum(np.diff(inked) > gap))


def test_bench_on_a_stable_diffusion_folder(tmp_path):
    from diffusers import StableDiffusionPipeline
    from tiny_models import tiny_sd_components

    path = tmp_path / "tiny-sd"
    StableDiffusionPipeline(**tiny_sd_components(tmp_path)).save_pretrained(path)
    with pytest.raises(ValueError, match="prompt: .* is a text-to-image model"):
        run_sweep(SweepConfig(model=str(path), samplers=["edm-heun"], nfe=[3], num_samples=2, progress=False))
    result = run_sweep(SweepConfig(model=str(path), prompt="a photo of a cat", samplers=["edm-heun", "euler-karras"], nfe=[3],
                                   num_samples=2, reference_steps=4, progress=False))
    assert [r["nfe"] for r in result["rows"]] == [3, 3]
    assert result["samples"][("edm-heun", 3)].shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nfe", "0"], "--nfe"),
        (["--samplers", "edm-heun,plms"], "unknown sampler"),
        (["--model", "NOT_A_MODEL_DIR"], "is not a diffusers model folder"),
        (["--inception", "WRONG_INCEPTION"], "not an Inception-v3 FID state dict"),
        (["--num-samples", "1"], "--num-samples"),
    ],
)
def test_bad_input_is_rejected_before_sampling(tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / "NOT_A_MODEL_DIR").mkdir()
    (tmp_path / "NOT_A_MODEL_DIR" / "weights.bin").write_bytes(b"x")
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(3)}, tmp_path / "WRONG_INCEPTION")
    args = [str(tmp_path / a) if a.isupper() and "_" in a else a for a in args]
    out = tmp_path / "out"

    def no_sampling(*unused, **kwargs):
        raise AssertionError("sampling started before the bad input was rejected")

    monkeypatch.setattr("edm_sampling.evaluation.sweep.run_sampler", no_sampling)
    with pytest.raises(SystemExit) as error:
        main(_bench(tmp_path, "--output", str(out), *args))
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # nothing was written


def test_tune_reports_the_best_churn_and_the_grid(tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", "--model", "gaussian", "--nfe", "9", "--num-samples", "16", "--s-churn", "0,20", "--s-tmin", "0.05",
                 "--s-tmax", "1,50", "--s-noise", "1.007", "--output", str(out), "--stats-cache", str(tmp_path / "cache"),
                 "--no-progress", "--grid-images", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best at NFE 9" in printed
    grid = json.loads((out / "tune.json").read_text())["grid"]
    assert len(grid) == 3  # deterministic + 2 churn settings
    assert grid == sorted(grid, key=lambda r: r["fd"])
    assert {r["nfe"] for r in grid} == {9}
    assert (out / "tune.png").exists() and (out / "tune.csv").exists()
    with pytest.raises(SystemExit):
        main(["tune", "--s-noise", "0", "--output", str(tmp_path / "t2"), "--no-progress"])


@pytest.mark.parametrize("family", ["edm", "ve"])
def test_bench_on_a_folder_trained_with_the_package(tmp_path, family):
    from edm_sampling.pipelines import EDMPipeline
    from edm_sampling.schedulers import EDMScheduler
    from tiny_models import tiny_fourier_unet2d, tiny_unet2d

    unet = tiny_unet2d(in_channels=1) if family == "edm" else tiny_fourier_unet2d(in_channels=1)
    scheduler = EDMScheduler(model_family=family, sigma_min=0.02 if family == "ve" else 0.002,
                             sigma_max=100.0 if family == "ve" else 80.0)
    path = tmp_path / f"tiny-{family}"
    EDMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    result = run_sweep(SweepConfig(model=str(path), nfe=[3], num_samples=2, reference_steps=4, progress=False))
    names = [r["sampler"] for r in result["rows"]]
    # the scheduler loop needs a discrete VP epsilon network: EDMScheduler rows run as the same solver and grid on the core
    assert names == ["edm-heun", "edm-ipndm", "edm-ipndm-afs", "edm-unipc3", "edm-unipc3-afs", "edm-adams-alpha-adaptive"]
    assert any(note.startswith("skipped ddim, euler-karras") for note in result["meta"]["notes"])
    assert all(r["nfe"] == 3 for r in result["rows"])
    assert all(np.isfinite(r["error_mean"]) for r in result["rows"])
    with pytest.raises(ValueError, match="discrete VP"):
        run_sweep(SweepConfig(model=str(path), samplers=["ddim"], nfe=[3], num_samples=2, progress=False))


def _reference_folder(path: Path, size: int, count: int = 4, seed: int = 0) -> Path:
    from PIL import Image

    path.mkdir(exist_ok=True)
    for i in range(count):
        pixels = (np.random.default_rng(seed + i).random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(path / f"{i}.png")
    return path


def _mixture_fd(tmp_path, reference: Path, **extra) -> dict:
    config = SweepConfig(model="mixture", samplers=["edm-euler"], nfe=[1], num_samples=2, reference_steps=0, progress=False,
                         quiet=True, reference=str(reference), stats_cache=str(tmp_path / "cache"), **extra)
    return run_sweep(config)


def test_reference_images_of_another_size_are_resized_to_the_samples(tmp_path):
    """12x12 images against the mixture's 16x16 samples: resized as FID pipelines do (the FD is
    that of the same images resized by PIL, given as statistics), and said in a note."""
    from PIL import Image

    from edm_sampling.evaluation.features import PixelFeatures
    from edm_sampling.evaluation.metrics import feature_statistics

    folder = _reference_folder(tmp_path / "small", 12)
    result = _mixture_fd(tmp_path, folder, output=str(tmp_path / "out"))
    assert any("--reference images of 12x12 are resized to the samples' 16x16" in note for note in result["meta"]["notes"])
    resized = [np.asarray(Image.open(f).convert("RGB").resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32)
               for f in sorted(folder.iterdir())]
    images = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2) / 127.5 - 1
    mu, sigma = feature_statistics(PixelFeatures()(images).numpy())
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    by_statistics = _mixture_fd(tmp_path, tmp_path / "stats.npz")
    assert np.isfinite(result["rows"][0]["fd"])
    assert result["rows"][0]["fd"] == pytest.approx(by_statistics["rows"][0]["fd"], rel=1e-9)
    assert (tmp_path / "out" / "grids" / "edm-euler_nfe1.png").exists()  # the resized images beside the samples


def test_cached_reference_statistics_follow_the_images(tmp_path):
    folder = _reference_folder(tmp_path / "images", 16)
    first = _mixture_fd(tmp_path, folder)
    again = _mixture_fd(tmp_path, folder)
    assert not first["meta"]["reference_statistics"]["loaded_from_cache"]
    assert again["meta"]["reference_statistics"]["loaded_from_cache"] and again["rows"][0]["fd"] == first["rows"][0]["fd"]
    _reference_folder(folder, 16, count=1, seed=7)  # one image replaced: same name, new pixels
    changed = _mixture_fd(tmp_path, folder)
    assert not changed["meta"]["reference_statistics"]["loaded_from_cache"]
    assert changed["rows"][0]["fd"] != first["rows"][0]["fd"]


def test_a_stable_diffusion_model_moves_every_module_it_holds(tmp_path):
    """`BenchModel.to` moves the VAE (used by to_image) and the text encoder with the UNet, as
    the sweep does before sampling on a GPU; the schedule search makes its labels on the device."""
    from diffusers import StableDiffusionPipeline
    from tiny_models import tiny_sd_components

    from edm_sampling.evaluation.models import load_model

    path = tmp_path / "tiny-sd"
    StableDiffusionPipeline(**tiny_sd_components(tmp_path)).save_pretrained(path)
    model = load_model(path, prompt="a cat").to("meta")
    parts = [model.denoiser, model.unet, *model.modules]
    assert {type(m).__name__ for m in model.modules} >= {"AutoencoderKL", "CLIPTextModel"}
    assert {p.device.type for part in parts for p in [*part.parameters(), *part.buffers()]} == {"meta"}
    image = model.to_image(torch.zeros(1, *model.sample_shape, device="meta"))
    assert image.device.type == "meta" and image.shape == (1, 3, 16, 16)


def test_the_schedule_search_makes_class_labels_on_the_model_device(ddpm_folder):
    from edm_sampling.evaluation.models import load_model
    from edm_sampling.evaluation.schedule_search import model_problem

    problem = model_problem(load_model(ddpm_folder).to("meta"), "euler", False, device="meta")
    assert problem.model_kwargs([0, 1])["class_labels"].device.type == "meta"


def _sdxl_pipeline(root: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from tiny_models import tiny_clip_text_model, tiny_clip_tokenizer, tiny_vae

    tokenizer = tiny_clip_tokenizer(root / "clip_vocab")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, norm_num_groups=4,
                                attention_head_dim=2, addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=8 + 6 * 4)
    return StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=tiny_clip_text_model(len(tokenizer), seed=1),
                                     text_encoder_2=tiny_clip_text_model(len(tokenizer), seed=2, with_projection=True),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear"))


def _sd3_pipeline(root: Path):
    from diffusers import StableDiffusion3Pipeline
    from tiny_models import tiny_sd3_components

    return StableDiffusion3Pipeline(**tiny_sd3_components(root))


@pytest.mark.parametrize("make, message", [(_sdxl_pipeline, "does not support SDXL's added conditioning yet"),
                                           (_sd3_pipeline, "does not support transformer (flow) pipelines yet")])
def test_sdxl_and_transformer_folders_are_refused_before_any_work(tmp_path, capsys, monkeypatch, make, message):
    path = tmp_path / "pipeline"
    make(tmp_path).save_pretrained(path)

    def no_loading(*unused, **kwargs):
        raise AssertionError("a component was loaded before the folder was refused")

    monkeypatch.setattr("edm_sampling.evaluation.models._load_component", no_loading)
    for argv in (["bench"], ["tune", "--schedule"]):
        with pytest.raises(SystemExit) as error:
            main([*argv, "--model", str(path), "--prompt", "a cat", "--output-dir", str(tmp_path / "out"), "--no-progress"])
        assert error.value.code == 2
        err = capsys.readouterr().err
        assert "--model: " in err and message in err and not (tmp_path / "out").exists()
