"""Bad input, tried as a new user would: every CLI flag of train / bench / tune and every
parameter of the public Python entry points (TrainConfig, SweepConfig, EDMScheduler,
EDMPipeline, samplers.sample) with negative, zero, inf, nan, a string where a number belongs,
a missing or unreadable path and a malformed file. Each is refused before any work with one
clear line naming the flag as the user typed it (exit code 2), or in Python a ValueError naming
the parameter, and nothing is written. The flag lists come from the parsers themselves, so a
new flag without bad-value cases fails `test_bad_value_cases_cover_every_flag`."""

from __future__ import annotations

import inspect
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edm_sampling.cli import build_parser, main, subcommand_parser

INF, NAN = math.inf, math.nan
COMMON_TRAIN = ["--resolution", "8", "--channels", "8,16", "--steps", "2", "--batch-size", "8", "--num-samples", "0",
                "--no-export", "--no-progress"]
COMMON_BENCH = ["--nfe", "3", "--num-samples", "4", "--samplers", "edm-heun", "--grid-images", "0", "--no-progress"]
COMMON_TUNE = ["--nfe", "3", "--num-samples", "4", "--bootstrap", "0", "--s-churn", "0,10", "--s-tmin", "0.05",
               "--s-tmax", "50", "--s-noise", "1", "--no-progress"]
COMMON = {"train": COMMON_TRAIN, "bench": COMMON_BENCH, "tune": COMMON_TUNE}


# ---- files a user may give: missing, of the wrong kind, malformed ----------------------------------

def _png(path: Path, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8), "L").save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    from diffusers import DDPMPipeline, DDPMScheduler, StableDiffusionPipeline
    from tiny_models import tiny_sd_components, tiny_unet2d

    root = tmp_path_factory.mktemp("inputs")
    (root / "notes.txt").write_text("a text file where a folder, an image or a model belongs\n")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "corrupt" / "b.png").write_bytes(b"")
    for i in range(2):
        _png(root / "flat" / f"{i}.png")
    _png(root / "one" / "0.png")
    (root / "bad.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    np.savez(root / "nokeys.npz", x=np.zeros(3))
    (root / "inception.pth").write_bytes(b"not a state dict")
    (root / "bad.json").write_text("{bad json")
    DDPMPipeline(unet=tiny_unet2d(in_channels=3), scheduler=DDPMScheduler()).save_pretrained(root / "ddpm")
    for name, part, text in [("index_list", "model_index.json", "[1, 2]"), ("index_bad", "model_index.json", "{bad"),
                             ("unet_config_bad", "unet/config.json", "{bad"),
                             ("scheduler_config_list", "scheduler/scheduler_config.json", "[]")]:
        shutil.copytree(root / "ddpm", root / name)
        (root / name / part).write_text(text)
    StableDiffusionPipeline(**tiny_sd_components(root)).save_pretrained(root / "sd")
    paths = {p.name.replace(".", "_"): str(p) for p in root.iterdir()}
    paths.update(missing=str(root / "missing"), under_file=str(root / "notes.txt" / "out"), bare_unet=str(root / "ddpm" / "unet"))
    return paths


# ---- the CLI: (command, arguments, what the error line must name) -------------------------------------

NUMBER_FLAGS = {  # flag: values each command must refuse
    "train": {
        "--caption-dropout": ["-0.1", "1.5", "inf", "nan", "abc"], "--num-workers": ["-1", "1.5", "abc"],
        "--p-mean": ["inf", "nan", "abc"], "--p-std": ["0", "-1", "inf", "nan", "abc"],
        "--sigma-data": ["0", "-0.5", "inf", "nan", "abc"], "--layers-per-block": ["0", "-1", "1.5", "abc"],
        "--dropout": ["-0.1", "1", "inf", "nan", "abc"], "--steps": ["0", "-1", "1.5", "inf", "abc"],
        "--batch-size": ["0", "-1", "1.5", "abc"], "--grad-accum": ["0", "-1", "abc"],
        "--lr": ["0", "-1", "inf", "nan", "abc"], "--lr-warmup-images": ["-1", "1.5", "abc"],
        "--max-grad-norm": ["0", "-1", "inf", "nan", "abc"], "--ema-halflife-images": ["-1", "inf", "nan", "abc"],
        "--ema-rampup-ratio": ["0", "-1", "inf", "nan", "abc"], "--augment-p": ["-0.1", "1.5", "nan", "abc"],
        "--seed": ["-1", "1.5", "inf", "abc"], "--checkpoint-every": ["0", "-1", "abc"], "--log-every": ["0", "-1", "abc"],
        "--sample-steps": ["0", "-1", "abc"], "--num-samples": ["-1", "1.5", "abc"],
        "--guidance-scale": ["0.5", "-1", "inf", "nan", "abc"],
        "--resolution": ["0", "-8", "7", "abc", "inf", "nan", "8,8,8", "1.5"],
        "--channels": ["abc", "7", "0", "-8", "", "8,abc"],
        "--loss": ["l1", ""], "--noise-distribution": ["x"], "--loss-weighting": ["x"],
        "--mixed-precision": ["fp8", "fp16"],  # fp16 on a CPU: no loss scaling, so no skipped non-finite steps
        "--export-scheduler": ["x"], "--image-column": [""], "--caption-column": [""],
    },
    "bench": {"--nfe": ["0", "-1", "abc", "1.5", "", "inf"], "--samplers": ["nope", ""],
              "--reference-steps": ["-1", "2", "abc", "1.5"],
              "--schedule-file": ["{missing}", "{bad_json}", "{notes_txt}", "{empty}"]},
    "tune": {"--nfe": ["0", "-1", "abc", "inf"], "--sampler": ["edm-dpmpp-2m", "nope"],
             "--s-churn": ["-1", "nan", "abc", ""], "--s-tmin": ["-1", "nan", "abc"], "--s-tmax": ["-1", "nan", "abc"],
             "--s-noise": ["0", "-1", "nan", "inf", "abc"], "--bootstrap": ["-1", "1", "abc", "1.5"],
             # the schedule search's own flags: refused in a churn search (and checked again with --schedule
             # in tests/test_schedule_search.py)
             "--solver": ["nope", "heun"], "--candidates": ["1", "-1", "abc"], "--coeff": ["0", "-1", "abc"],
             "--holdout-samples": ["-1", "abc"], "--max-evals": ["-1", "abc"]},
}
MODEL_FLAGS = {  # bench and tune share these
    "--guidance-scale": ["-1", "inf", "nan", "abc"], "--dtype": ["float8"], "--num-samples": ["1", "0", "-1", "abc", "inf"],
    "--batch-size": ["0", "-1", "abc"], "--seed": ["-1", "abc", "1.5"], "--grid-images": ["-1", "abc", "1.5"],
    "--model": ["nope", "{missing}", "{notes_txt}", "{empty}", "{index_list}", "{index_bad}", "{unet_config_bad}",
                "{scheduler_config_list}"],
    "--inception": ["{missing}", "{empty}", "{inception_pth}"],
    "--reference": ["{missing}", "{notes_txt}", "{bad_npz}", "{nokeys_npz}", "{corrupt}", "{one}", "{empty}"],
    "--stats-cache": ["{notes_txt}", "{under_file}"],
    "--output-dir": ["{notes_txt}", "{under_file}"],
    "--output": ["{notes_txt}"],  # the alias is named as typed
}
PATH_CASES = [  # (command, arguments, what the line names)
    ("train", ["--output-dir", "{notes_txt}"], "--output-dir"),
    ("train", ["--output-dir", "{under_file}"], "--output-dir"),
    *[("train", ["--data", value], "--data") for value in ("{missing}", "{notes_txt}", "{empty}", "{corrupt}")],
    ("train", ["--dataset", "{missing}"], "--dataset"),
    *[("train", ["--pretrained", value, "--data", "{flat}"], "--pretrained")
      for value in ("{missing}", "{notes_txt}", "{empty}", "{index_list}", "{index_bad}", "{unet_config_bad}",
                    "{scheduler_config_list}")],
    ("train", ["--scheduler-config", "{bad_json}"], "--scheduler-config"),  # without --pretrained
    ("train", ["--pretrained", "{bare_unet}", "--data", "{flat}", "--scheduler-config", "{missing}"], "--scheduler-config"),
    ("train", ["--pretrained", "{bare_unet}", "--data", "{flat}", "--scheduler-config", "{bad_json}"], "--scheduler-config"),
    ("train", ["--resume"], "--resume"),  # no checkpoint to resume
    ("train", ["--resume", "--overwrite"], "--overwrite"),
    ("train", ["--class-conditional", "--data", "{flat}"], "--class-conditional"),  # no class subfolders
    ("train", ["--cache-latents"], "--cache-latents"),  # a pixel model has no latents
    ("bench", ["--model", "{sd}"], "--prompt"),  # a text-to-image model needs one
    ("tune", ["--model", "{sd}"], "--prompt"),
]
NO_BAD_VALUE = {  # flags that take no value and cannot be wrong on their own, and --prompt (any text)
    "train": {"--random-flip", "--attention", "--gradient-checkpointing", "--no-gradient-checkpointing", "--export",
              "--no-export", "--progress", "--no-progress", "--no-cache-latents", "--overwrite"},
    "bench": {"--no-progress", "--overwrite"},
    "tune": {"--no-progress", "--overwrite", "--schedule", "--afs", "--no-refine"},
}


def _cli_cases() -> list[tuple[str, list[str], str]]:
    cases = list(PATH_CASES)
    for command, flags in NUMBER_FLAGS.items():
        cases += [(command, [flag, value], flag) for flag, values in flags.items() for value in values]
    for command in ("bench", "tune"):
        cases += [(command, [flag, value], flag) for flag, values in MODEL_FLAGS.items() for value in values]
    return cases


CLI_CASES = _cli_cases()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def test_bad_value_cases_cover_every_flag():
    parser = build_parser()
    for command in ("train", "bench", "tune"):
        flags = {o for a in subcommand_parser(parser, command)._actions for o in a.option_strings if o not in ("-h", "--help")}
        named = {expected for c, _, expected in CLI_CASES if c == command}
        named |= {a for c, args, _ in CLI_CASES if c == command for a in args if a.startswith("--")}
        assert flags - named - NO_BAD_VALUE[command] == set(), f"{command}: flags without bad-value cases"


@pytest.mark.parametrize("command, args, expected", CLI_CASES,
                         ids=[f"{c} {' '.join(a)}" for c, a, _ in CLI_CASES])
def test_every_flag_refuses_bad_values_in_one_line_naming_it(command, args, expected, files, tmp_path, monkeypatch,
                                                                capsys):
    """One line on stderr naming the flag as typed, exit code 2, nothing written anywhere (the
    work folder, the given files, the statistics cache)."""
    import edm_sampling.evaluation.sweep as sweep

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sweep, "run_sampler", lambda *a, **k: pytest.fail("sampling started"))
    (tmp_path / "mine.txt").write_text("the user's file")
    given = Path(files["missing"]).parent
    before, given_before = snapshot(tmp_path), snapshot(given)
    argv = [command, "--output-dir", str(tmp_path / "out"), *COMMON[command], *[a.format(**files) for a in args]]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"edm-sampling {command}: error: "), lines
    assert expected in lines[0] and "Traceback" not in err
    assert snapshot(tmp_path) == before and snapshot(given) == given_before


def test_flags_are_named_as_typed(tmp_path, capsys):
    """An error about a value is shown under the flag the user typed: --lr, not learning_rate or lr;
    --channels, not block_out_channels; an alias or an abbreviation as given."""
    cases = [(["train", "--lr", "inf"], "edm-sampling train: error: --lr: must be a finite number > 0 (or None), got inf"),
             (["train", "--channels", "7"], "edm-sampling train: error: --channels: must be one or more multiples of 8"),
             (["bench", "--output", str(tmp_path / "f")], "edm-sampling bench: error: --output: "),
             (["train", "--sigma-dat", "inf"], "edm-sampling train: error: --sigma-dat: must be a finite number > 0")]
    (tmp_path / "f").write_text("a file")
    for argv, start in cases:
        with pytest.raises(SystemExit):
            main([*argv, "--no-progress"])
        assert capsys.readouterr().err.startswith(start)


def test_train_refuses_a_model_and_a_run_folder_inside_each_other(files, tmp_path, capsys):
    """--pretrained inside --output-dir (the run replaces that folder's files) or the same folder,
    and --output-dir inside --pretrained (the export copies the model's folder whole): one line
    naming the flag, exit 2, before anything is written; the user's files byte-identical."""
    runs = tmp_path / "runs"
    shutil.copytree(files["ddpm"], runs / "model")
    shutil.copytree(files["ddpm"], tmp_path / "model")
    (runs / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)
    model, outside = str(runs / "model"), str(tmp_path / "model")
    cases = [([model, str(runs)], f"--pretrained: {model!r} is inside --output-dir {str(runs)!r}"),
             ([outside, outside], f"--pretrained: {outside!r} is inside --output-dir {outside!r}"),
             ([outside, str(tmp_path / "model" / "run")],
              f"--output-dir: {str(tmp_path / 'model' / 'run')!r} is inside --pretrained {outside!r}")]
    for (pretrained, output_dir), named in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--pretrained", pretrained, "--output-dir", output_dir, "--data", files["flat"], "--overwrite",
                  "--no-progress"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"edm-sampling train: error: {named}")
        assert snapshot(tmp_path) == before


# ---- Python: the public constructors name the parameter ---------------------------------------------

TRAIN_CONFIG_BAD = {
    "output_dir": ["", 5, None, "{notes_txt}"], "data": [5, "{missing}", "{notes_txt}", "{empty}"],
    "dataset": [5, "{missing}"], "image_column": ["", 5], "caption_column": ["", None],
    "pretrained": [5, "{missing}", "{index_list}", "{unet_config_bad}"], "scheduler_config": [5, "{notes_txt}"],
    "resolution": [0, -8, 7, "abc", 8.5, (8, 8, 8), True], "loss": ["l1", 5, ""], "noise_distribution": ["x", 5],
    "loss_weighting": ["x"], "p_mean": [INF, NAN, "abc", None], "p_std": [0, -1, INF, NAN, "1.2"],
    "steps": [0, -1, 1.5, INF, "10", True], "batch_size": [0, -1, 2.5, "8"], "grad_accum": [0, -1, "2"],
    "lr": [0, -1, INF, NAN, "1e-3"], "lr_warmup_images": [-1, 1.5, "10"], "max_grad_norm": [0, -1, INF, NAN, "1"],
    "ema_halflife_images": [-1, INF, NAN, "10"], "ema_rampup_ratio": [0, -1, INF, NAN, "0.05"],
    "augment_p": [-0.1, 1.5, NAN, "0.5"], "random_flip": ["yes", 1, None], "caption_dropout": [-0.1, 1.5, NAN, "0.1"],
    "cache_latents": ["yes", True], "num_workers": [-1, 1.5, "2"], "class_conditional": ["yes"],
    "sigma_data": [0, -0.5, INF, NAN, "0.5"], "block_out_channels": [(), (7,), (0,), (-8,), "16,32", (8.0,), None],
    "layers_per_block": [0, -1, 1.5, "1"], "attention": ["yes"], "dropout": [-0.1, 1.0, INF, NAN, "0.1"],
    "gradient_checkpointing": ["yes"], "mixed_precision": ["fp8", None, "fp16"], "seed": [-1, 1.5, "0", 2**64, True],
    "checkpoint_every": [0, -1, "5"], "log_every": [0, -1, "5"], "resume": ["yes", True], "overwrite": ["yes"],
    "sample_steps": [0, -1, "18"], "num_samples": [-1, 1.5, "4"], "guidance_scale": [0.5, -1, INF, NAN, "5"],
    "export": ["yes"], "export_scheduler": ["x", None], "progress": ["yes"],
}


def assert_each_refused(bad: dict, call, files: dict, prefix: bool = True) -> None:
    """``call(name, value)`` raises a ValueError naming ``name`` (its message starts "name: " with
    ``prefix``, else names it anywhere) for every value of ``bad[name]``; "{key}" values are
    paths from ``files``."""
    import warnings

    for name, values in bad.items():
        for value in values:
            value = value.format(**files) if isinstance(value, str) else value
            with pytest.raises(ValueError) as info, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call(name, value)
            message = str(info.value)
            assert message.startswith(f"{name}: ") if prefix else re.search(rf"\b{name}\b", message), (name, value, message)


def test_train_config_names_every_bad_field(files, tmp_path):
    import dataclasses

    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.trainer import Trainer

    assert set(TRAIN_CONFIG_BAD) == {f.name for f in dataclasses.fields(TrainConfig)}
    base = dict(output_dir=str(tmp_path / "out"), resolution=8, block_out_channels=(8, 16), steps=2, batch_size=8,
                num_samples=0, export=False, progress=False)
    assert_each_refused(TRAIN_CONFIG_BAD, lambda name, value: Trainer(TrainConfig(**{**base, name: value})), files)
    assert list(tmp_path.iterdir()) == []


SWEEP_CONFIG_BAD = {
    "model": [5, "", "nope", "{index_list}", "{notes_txt}"], "samplers": ["edm-heun", ["nope"], [5]],
    "nfe": [[], [0], [-1], [1.5], ["3"], "3", 3], "num_samples": [1, 0, -1, 2.5, "4", INF], "batch_size": [0, -1, "8"],
    "seed": [-1, 1.5, "0"], "reference_steps": [-1, 2, 1.5, "256"], "inception": [5, "{missing}", "{empty}"],
    "reference": [5, "{missing}", "{notes_txt}", "{bad_npz}", "{nokeys_npz}", "{corrupt}", "{one}"],
    "stats_cache": ["{notes_txt}", 5], "output": ["{notes_txt}", 5], "overwrite": ["yes"], "prompt": [5],
    "guidance_scale": [-1, INF, NAN, "7.5"], "dtype": ["float8", None], "grid_images": [-1, 1.5, "64"],
    "progress": ["yes"], "quiet": ["yes"], "ode_errors": ["yes"], "schedule_file": [5, "{missing}", "{bad_json}"],
}


def test_sweep_config_names_every_bad_field_before_sampling(files, tmp_path, monkeypatch):
    import dataclasses

    import edm_sampling.evaluation.sweep as sweep
    from edm_sampling.evaluation.sweep import SweepConfig, run_sweep

    monkeypatch.setattr(sweep, "run_sampler", lambda *a, **k: pytest.fail("sampling started"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    internal = {"extra_specs"}  # set by tune, not by users
    assert set(SWEEP_CONFIG_BAD) == {f.name for f in dataclasses.fields(SweepConfig)} - internal
    base = dict(nfe=[3], num_samples=4, samplers=["edm-heun"], progress=False, output=str(tmp_path / "out"))
    assert_each_refused(SWEEP_CONFIG_BAD, lambda name, value: run_sweep(SweepConfig(**{**base, name: value})), files)
    assert list(tmp_path.iterdir()) == []


SCHEDULER_BAD = {  # parameter: (bad values, other arguments that make the value matter)
    "solver": (["x", 5, None], {}), "sigma_min": ([0, -1, INF, NAN, "abc", None, True], {}),
    "sigma_max": ([0.001, -1, INF, NAN, "abc"], {}), "rho": ([0, -1, INF, NAN, "abc"], {}),
    "s_churn": ([-1, INF, NAN, "abc"], {}), "s_tmin": ([-1, NAN, "abc"], {}), "s_tmax": ([-1, NAN, "abc"], {}),
    "s_noise": ([0, -1, INF, NAN, "abc"], {}), "model_family": (["x", 5], {}), "timestep_mapping": (["x"], {}),
    "sigma_data": ([0, -1, INF, NAN, "abc"], {}), "num_train_timesteps": ([0, -1, 1.5, "1000", INF], {}),
    "beta_start": ([0, -1, INF, NAN, "abc"], {}), "beta_end": ([0, -1, INF, NAN, "abc"], {}),
    "beta_schedule": (["x", 5], {}), "trained_betas": (["abc", [0.5, 1.5], [NAN, 0.1]], {}),
    "prediction_type": (["x", 5], {}), "shift": ([0, -1, INF, NAN, "abc", None], {"model_family": "flow"}),
    "use_dynamic_shifting": (["yes", 1], {"model_family": "flow"}), "time_shift_type": (["x"], {"model_family": "flow"}),
    "solver_order": ([0, 9, "2", 1.5], {"solver": "ipndm"}), "afs": (["yes", 1, True], {}),
    "schedule": (["x", 5], {}), "schedule_file": ([5, "{missing}", "{bad_json}"], {}),
    "final_step": (["x", "denoise"], {}),
}


def test_scheduler_names_every_bad_parameter(files):
    from edm_sampling.schedulers import EDMScheduler

    params = set(inspect.signature(EDMScheduler.__init__).parameters) - {"self"}
    assert set(SCHEDULER_BAD) == params

    def build(name, value):
        EDMScheduler(**SCHEDULER_BAD[name][1], **{name: value}).set_timesteps(4)

    assert_each_refused({name: values for name, (values, _) in SCHEDULER_BAD.items()}, build, files, prefix=False)
    scheduler = EDMScheduler()
    for value in (0, -1, 1.5, INF, "4", None):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(value)
    for grid in ([], [80.0, NAN, 0.0], [1.0, 2.0, 0.0], [-1.0]):  # ([1.0] is valid: a final 0 is appended)
        with pytest.raises(ValueError, match="sigmas"):
            scheduler.set_timesteps(sigmas=grid)


def _pipeline(class_conditional: bool = False):
    from diffusers import UNet2DModel

    from edm_sampling.pipelines import EDMPipeline
    from edm_sampling.schedulers import EDMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, num_class_embeds=3 if class_conditional else None)
    pipe = EDMPipeline(unet=unet, scheduler=EDMScheduler(model_family="edm"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_names_every_bad_argument():
    from edm_sampling.pipelines import EDMPipeline
    from edm_sampling.schedulers import EDMScheduler

    pipe = _pipeline(class_conditional=True)
    good = dict(batch_size=2, num_inference_steps=2, class_labels=0, output_type="pt")
    bad = {
        "batch_size": [0, -1, 1.5, "2", True], "num_inference_steps": [0, -1, 1.5, "4", INF],
        "generator": [5, "abc", [torch.Generator()], [5, 6]], "class_labels": [-1, 3, "abc", 1.5, [0, 1, 2], None],
        "latents": ["abc", torch.full((2, 1, 8, 8), NAN), torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 8, 8, dtype=torch.long)],
        "output_type": ["x", 5], "return_dict": ["yes"],
    }
    assert set(bad) == set(inspect.signature(EDMPipeline.__call__).parameters) - {"self"}
    assert_each_refused(bad, lambda name, value: pipe(**{**good, name: value}), {}, prefix=False)
    with pytest.raises(ValueError, match="unet: must be a diffusers UNet2DModel"):
        EDMPipeline(unet=5, scheduler=EDMScheduler())
    with pytest.raises(ValueError, match="scheduler: must be a diffusers scheduler"):
        EDMPipeline(unet=pipe.unet, scheduler="heun")


def test_sample_names_every_bad_argument():
    """samplers.sample: every check runs before the first model call (`generator=5` included)."""
    from edm_sampling.samplers import sample

    calls = []

    def denoiser(x, sigma):
        calls.append(1)
        return x * 0

    latents = torch.randn(2, 3)
    bad = {
        "denoiser": [5, None], "latents": ["abc", None, torch.full((2, 3), NAN), torch.zeros(2, 3, dtype=torch.long)],
        "sigmas": [[], "abc", [80.0, NAN, 0.0], [1.0, 2.0, 0.0], ["a", "b"]], "solver": ["x", 5],
        "alpha": [0, -1, NAN, 2, "abc"], "order": [0, 9, 1.5, "abc"], "afs": ["yes"],
        "s_churn": [-1, INF, NAN, "abc", None], "s_tmin": [-1, NAN, "abc"], "s_tmax": [-1, NAN, "abc", None],
        "s_noise": [0, -1, INF, NAN, "abc"], "generator": [5, "abc", [torch.Generator()], [5, 6]],
        "state_dtype": ["abc", torch.int32], "callback": [5], "progress": ["yes"], "model_kwargs": ["abc", 5],
        "round_sigma": [5], "check_finite": [0, "yes"], "solver_options": ["abc", 5],
    }
    assert set(bad) == set(inspect.signature(sample).parameters)

    def run(name, value):
        args = dict(denoiser=denoiser, latents=latents, sigmas=[80.0, 1.0, 0.0], solver="ipndm" if name == "order" else "heun")
        sample(**{**args, name: value})

    assert_each_refused(bad, run, {}, prefix=False)
    assert calls == []
