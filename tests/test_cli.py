"""The `edm-sampling` command line: help that matches what runs, one spelling of the output
option (with its alias), and a one-line note for every option that does nothing."""

from __future__ import annotations

import pytest

from edm_sampling.cli import build_parser, main


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_only_commands_that_exist(capsys):
    text = _help(capsys)
    assert "demo" not in text
    for command in ("bench", "tune", "train"):
        assert command in text
    parser = build_parser()
    assert set(parser._subparsers._group_actions[0].choices) == {"bench", "tune", "train"}


def test_help_states_the_defaults_that_run(capsys):
    bench_help, tune_help = _help(capsys, "bench"), _help(capsys, "tune")
    assert "(default 256)" in bench_help and "(default 512)" in tune_help
    from edm_sampling.evaluation.schedule_search import DEFAULT_CANDIDATES, SearchSettings

    defaults = SearchSettings()
    for text in (f"(default {DEFAULT_CANDIDATES})", f"(default {defaults.holdout_samples})", f"(default {defaults.max_evals})",
                 "(default ipndm)", "(default 5,9,17)", "(default 35: 18 Heun steps)"):
        assert text in " ".join(tune_help.split()), text
    parser = build_parser()
    assert parser.parse_args(["bench"]).num_samples == 256
    assert "samples per churn setting (default 512); with --schedule: the search seeds (default 256)" in " ".join(tune_help.split())
    assert parser.parse_args(["bench"]).model == "mixture"
    assert "--output-dir" in bench_help and "--output-dir" in tune_help
    # the default set as the registry has it: iPNDM, UniPC-3 and adams_alpha_adaptive rows, DPM-Solver++ 3M in "scheduler"
    from edm_sampling.evaluation.samplers_registry import SAMPLER_GROUPS

    assert "edm-dpmpp-3m-scheduler" in SAMPLER_GROUPS["scheduler"] and "edm-dpmpp-3m-scheduler" not in SAMPLER_GROUPS["default"]
    assert ("(iPNDM and UniPC order 3, each with and without the analytical first step, and adams_alpha_adaptive)"
            in " ".join(bench_help.split()))
    assert "edm-adams-alpha-adaptive-scheduler" in SAMPLER_GROUPS["default"]
    assert "about 20 s on 2 CPU cores" in _help(capsys)


@pytest.mark.parametrize("command", ["bench", "tune"])
def test_output_dir_and_its_alias(command):
    parser = build_parser()
    assert parser.parse_args([command, "--output-dir", "a"]).output == "a"
    assert parser.parse_args([command, "--output", "b"]).output == "b"


def test_options_that_do_nothing_say_so(tmp_path, capsys):
    code = main(["bench", "--model", "gaussian", "--prompt", "a cat", "--samplers", "edm-heun,edm-euler", "--nfe", "4",
                 "--num-samples", "4", "--output-dir", str(tmp_path / "out"), "--stats-cache", str(tmp_path / "cache"),
                 "--no-progress", "--grid-images", "0"])
    assert code == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert any("--prompt ignored: gaussian is not a text-to-image model" in n for n in notes)
    assert any(n.startswith("note: NFE 4:") and "edm-heun (3)" in n and "edm-euler" not in n for n in notes)
    assert len(notes) == 2


def test_fd_skipped_without_reference_data_is_said(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler
    from tiny_models import tiny_unet2d

    from edm_sampling.evaluation.sweep import SweepConfig, run_sweep

    path = tmp_path / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet2d(in_channels=1), scheduler=DDPMScheduler()).save_pretrained(path)
    result = run_sweep(SweepConfig(model=str(path), samplers=["edm-euler"], nfe=[2], num_samples=2, reference_steps=4,
                                   progress=False, quiet=True))
    assert any(note.startswith("Frechet distance skipped") and "--reference" in note for note in result["meta"]["notes"])


def test_a_python_train_config_has_its_command_line():
    """`config_argv` (the lock holder's command and the resume hint of a run started from Python)
    gives arguments that the parser turns back into the same TrainConfig."""
    import dataclasses

    from edm_sampling.training.command import config_argv
    from edm_sampling.training.config import TrainConfig

    config = TrainConfig(output_dir="my run", lr=3e-4, steps=7, block_out_channels=(8, 16), resolution="8,16",
                         random_flip=True, export=False, progress=False, overwrite=True, p_mean=-1.0)
    argv = config_argv(config)
    assert argv[0] == "train" and "--lr" in argv and "--no-export" in argv and "--channels" in argv
    args = vars(build_parser().parse_args(argv))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig(**{k: v for k, v in args.items() if k in fields}) == config
    assert config_argv(TrainConfig()) == ["train"]


def test_bench_without_matplotlib_prints_the_tables_and_says_how_to_get_the_plot(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "out"
    assert main(["bench", "--model", "gaussian", "--samplers", "edm-euler,ddim", "--nfe", "3", "--num-samples", "4",
                 "--output-dir", str(out), "--stats-cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "best edm_sampling / best diffusers" in captured.out
    notes = [line for line in captured.err.splitlines() if "matplotlib is not installed" in line]
    assert len(notes) == 1 and "pip install 'edm_sampling[eval]'" in notes[0]
    assert (out / "results.csv").exists() and (out / "grids" / "ddim_nfe3.png").exists()
    assert not (out / "quality_vs_nfe.png").exists()


def test_digits_without_scikit_learn_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn", None)
    for argv in (["bench"], ["tune", "--schedule"]):
        with pytest.raises(SystemExit) as done:
            main([*argv, "--model", "digits", "--output-dir", str(tmp_path / "out"), "--no-progress"])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert "--model: the built-in digits need scikit-learn" in err and "pip install 'edm_sampling[eval]'" in err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_import_error_ends_the_command_with_one_line(tmp_path, capsys, monkeypatch):
    def missing(config, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'somepackage'", name="somepackage")

    monkeypatch.setattr("edm_sampling.evaluation.sweep.run_sweep", missing)
    with pytest.raises(SystemExit) as done:
        main(["bench", "--output-dir", str(tmp_path / "out")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("edm-sampling bench: error: No module named 'somepackage'") and len(err.strip().splitlines()) == 1
