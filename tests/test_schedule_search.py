"""`edm-sampling tune --schedule`: the GITS-style search (teacher, local costs, dynamic
programming, the solver's own error), the schedule file it writes, EDMScheduler and bench
reading it back, and bad input rejected before any work."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch

from edm_sampling.cli import main
from edm_sampling.evaluation.models import load_model
from edm_sampling.evaluation.schedule_search import (
    ERROR_FLOOR,
    SearchSettings,
    best_path,
    candidate_levels,
    cost_matrix,
    model_problem,
    refine_grid,
    search_schedules,
    improves,
    teacher_trajectory,
    typical_error,
)
from edm_sampling.samplers import sample

SMALL = SearchSettings(candidates=30, search_samples=16, holdout_samples=16, batch_size=16, max_evals=40)


@pytest.fixture(scope="module")
def gaussian():
    return load_model("gaussian")


def _brute_force(cost: np.ndarray, num_steps: int, coeff: float) -> tuple[list[int], float]:
    n = len(cost)
    best = (None, math.inf)
    for middle in itertools.combinations(range(1, n - 1), num_steps - 1):
        path = [0, *middle, n - 1]
        value = sum(coeff**m * cost[a, b] for m, (a, b) in enumerate(zip(path[:-1], path[1:])))
        if value < best[1]:
            best = (path, value)
    return best


@pytest.mark.parametrize("coeff", [0.8, 1.0, 1.15])
def test_dynamic_programming_finds_the_optimal_path_of_a_hand_made_cost_matrix(coeff):
    rng = np.random.default_rng(0)
    n = 9
    cost = np.triu(rng.random((n, n)) * rng.choice([1.0, 10.0], size=(n, n)), k=1)
    cost[np.tril_indices(n)] = np.inf
    for num_steps in range(1, n):
        path, value = best_path(cost, num_steps, coeff)
        expected_path, expected_value = _brute_force(cost, num_steps, coeff)
        assert path == expected_path and value == pytest.approx(expected_value, rel=1e-12)
    # a step that is not allowed (inf) is never taken, and a path that cannot exist is an error
    cost[0, n - 1] = np.inf
    with pytest.raises(ValueError, match="no path of 1 steps"):
        best_path(cost, 1, coeff)
    with pytest.raises(ValueError, match="num_steps"):
        best_path(cost, n, coeff)


def test_teacher_is_the_exact_ode_solution_and_local_costs_are_one_solver_step(gaussian):
    """On the Gaussian the teacher matches the closed-form ODE map at every candidate, and each
    local cost equals a one-step run of the core sampler from the teacher's state (Euler for
    the multistep solvers' base step, Algorithm 1 for heun): a second path through the code."""
    oracle = gaussian.denoiser
    levels = candidate_levels(6, 0.01, 80.0)
    z = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    teacher = teacher_trajectory(oracle, 80.0 * z, levels)
    exact = torch.stack([oracle.ode_solution(80.0 * z, 80.0, float(s)) for s in levels])
    relative = (teacher.states - exact).pow(2).flatten(2).mean(2).sqrt() / exact.pow(2).flatten(2).mean(2).sqrt()
    assert float(relative.max()) < 3e-6  # per level and sample: the integrator's tolerance, 1e-6 of the sample's size
    for solver, core in (("ipndm", "euler"), ("heun", "heun")):
        cost = cost_matrix(teacher, solver, denoiser=oracle)
        assert torch.isinf(cost[np.tril_indices(len(levels))]).all()
        for i, j in ((0, 1), (1, 4), (2, 5), (3, 6)):
            grid = [float(levels[i]), float(levels[j])]
            one_step = sample(oracle, teacher.states[i] / grid[0], grid, solver=core, state_dtype=torch.float64).sample
            rmse = (one_step - teacher.states[j]).pow(2).flatten(1).mean(1).sqrt().mean()
            assert float(cost[i, j]) == pytest.approx(float(rmse), rel=1e-9)
    # the analytical first step: D = 0 at sigma_max, x scaled by sigma_j / sigma_max
    afs = cost_matrix(teacher, "ipndm", afs=True)
    rmse = (teacher.states[0] * levels[2] / levels[0] - teacher.states[2]).pow(2).flatten(1).mean(1).sqrt().mean()
    assert float(afs[0, 2]) == pytest.approx(float(rmse), rel=1e-9)
    torch.testing.assert_close(afs[1:], cost_matrix(teacher, "ipndm")[1:])
    # a network (no exact denoiser below its trained range) ends at sigma_min with x = D(x; sigma_min)
    network = teacher_trajectory(oracle, 80.0 * z, levels, exact_to_zero=False)
    torch.testing.assert_close(network.states[:-1], teacher.states[:-1])
    torch.testing.assert_close(network.states[-1], oracle(teacher.states[-2], torch.full((8,), float(levels[-2]))))


def test_a_diffusers_folder_is_searched_on_the_range_edm_scheduler_samples_it_in(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler
    from tiny_models import tiny_unet2d

    DDPMPipeline(unet=tiny_unet2d(in_channels=1, num_class_embeds=3), scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    model = load_model(str(tmp_path / "ddpm"))
    problem = model_problem(model, "unipc", afs=False)
    assert not problem.exact_to_zero  # the UNet is never called below its smallest trained sigma
    assert (problem.sigma_min, problem.sigma_max) == pytest.approx((0.0100005, 80.0), rel=1e-5)
    grid = problem.default_grid(5)
    assert len(grid) == 6 and float(grid[0]) == 80.0 and float(grid[-2]) == pytest.approx(problem.sigma_min)
    assert set(problem.model_kwargs([0, 1])) == {"class_labels"}


def test_pattern_search_keeps_the_order_and_finds_a_known_minimum():
    target = torch.tensor([80.0, 7.0, 0.5, 0.03, 0.0], dtype=torch.float64)

    def errors_of(grid: torch.Tensor) -> np.ndarray:  # two "samples", both smallest at the target grid
        distance = float((torch.log(grid[1:-1]) - torch.log(target[1:-1])).abs().sum())
        return np.array([distance, 2 * distance])

    start = torch.tensor([80.0, 20.0, 2.0, 0.2, 0.0], dtype=torch.float64)
    grid, errors, evals = refine_grid(start, errors_of, sigma_min=0.01, min_log_step=0.05, max_evals=500)
    assert errors[0] < 0.1 * errors_of(start)[0] and evals <= 500
    assert grid[0] == 80.0 and grid[-1] == 0.0 and bool((grid[1:] < grid[:-1]).all()) and float(grid[-2]) >= 0.01
    # a step shorter than min_log_step is never made, and the smallest positive level stays above sigma_min
    tight, _, _ = refine_grid(start, errors_of, sigma_min=0.1, min_log_step=1.0, max_evals=500)
    assert bool((torch.log(tight[:-2]) - torch.log(tight[1:-1]) >= 1.0 - 1e-12).all()) and float(tight[-2]) >= 0.1


def test_a_move_is_kept_only_when_the_typical_error_falls_and_the_mean_does_not_rise():
    old = np.array([1e-3, 1e-3, 1e-3, 1.0])
    assert typical_error(old) == pytest.approx(1e-3 ** 0.75)
    assert improves(np.array([5e-4, 5e-4, 5e-4, 1.0]), old)  # every typical sample better
    assert not improves(np.array([1e-4, 1e-4, 1e-4, 1.5]), old)  # typical better, but one sample pushed further away
    assert not improves(np.array([2e-3, 2e-3, 2e-3, 0.5]), old)  # mean better, typical worse
    assert typical_error(np.array([1e-9, 1e-6])) == pytest.approx(ERROR_FLOOR)  # below the floor all errors are equal


def test_search_is_deterministic_and_beats_the_default_grid_on_held_out_seeds(gaussian):
    for solver, nfe in (("ipndm", 5), ("heun", 5)):
        problem = model_problem(gaussian, solver, afs=False)
        first = search_schedules(problem, [nfe], SMALL)["results"][0]
        again = search_schedules(problem, [nfe], SMALL)["results"][0]
        assert first["grid"] == again["grid"]
        assert first["grid"][0] == problem.sigma_max and first["grid"][-1] == 0.0
        assert first["steps"] == len(first["grid"]) - 1 == (3 if solver == "heun" else 5)
        assert first["holdout_error_mean"] < 0.8 * first["default_holdout_error_mean"], (solver, first)
        assert first["holdout_error_median"] < first["default_holdout_error_median"]
    # GITS's grid alone (no pattern search) is found too, and seeds are what the settings say
    gits = search_schedules(problem, [nfe], dataclasses.replace(SMALL, refine=False))["results"][0]
    assert gits["start"] == "dp" and gits["grid"] == gits["dp_grid"]
    assert SMALL.holdout_seeds() == list(range(16)) and SMALL.search_seeds() == list(range(16, 32))


def _tune(tmp_path, *extra: str) -> list[str]:
    return ["tune", "--schedule", "--model", "gaussian", "--num-samples", "16", "--holdout-samples", "16", "--candidates", "30",
            "--max-evals", "40", "--no-progress", "--output-dir", str(tmp_path / "schedule"), *extra]


def test_schedule_file_round_trips_through_edm_scheduler_and_bench(tmp_path, capsys, gaussian):
    from diffusers import DDPMScheduler

    from edm_sampling.schedulers import EDMScheduler

    assert main(_tune(tmp_path, "--solver", "ipndm", "--afs", "--nfe", "5,9")) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "schedule" / "schedule_ipndm_afs.json"
    assert f"schedule file: {path}" in printed and "searched_median" in printed
    data = json.loads(path.read_text())
    assert data["solver"] == "ipndm" and data["afs"] is True and data["nfe"] == [5, 9] and data["steps"] == [6, 10]
    assert data["model"] == "gaussian" and data["teacher"]["rtol"] == 1e-6 and data["search"]["candidates"] == 30
    results = {r["nfe"]: r for r in data["results"]}
    for grid, nfe in zip(data["grids"], (5, 9)):
        scheduler = EDMScheduler.from_config(DDPMScheduler().config, solver="ipndm", afs=True, schedule_file=str(path))
        scheduler.set_timesteps(nfe)  # nfe model calls: one step more under afs
        assert len(scheduler.timesteps) == nfe and scheduler.plan.nfe == nfe
        np.testing.assert_allclose(scheduler.plan.sigmas, grid, rtol=1e-12)
        custom = EDMScheduler.from_config(DDPMScheduler().config, solver="ipndm", afs=True)
        custom.set_timesteps(sigmas=grid)
        assert custom.plan.sigmas == scheduler.plan.sigmas
        assert results[nfe]["holdout_error_mean"] < results[nfe]["default_holdout_error_mean"]
    # bench compares the file's grids (through EDMScheduler in the diffusers loop) with the default grid,
    # on the held-out seeds: its errors are the search's held-out errors, measured another way
    assert main(["bench", "--model", "gaussian", "--schedule-file", str(path), "--samplers", "ddim", "--num-samples", "16",
                 "--no-progress", "--grid-images", "0", "--output-dir", str(tmp_path / "bench"),
                 "--stats-cache", str(tmp_path / "cache")]) == 0
    assert (f"samplers: the samplers named with --samplers (1 row), plus edm-ipndm-afs-scheduler, "
            f"edm-ipndm-afs-searched-scheduler for --schedule-file {path}") in capsys.readouterr().out
    rows = json.loads((tmp_path / "bench" / "results.json").read_text())["rows"]
    assert [r["sampler"] for r in rows[::2]] == ["ddim", "edm-ipndm-afs-scheduler", "edm-ipndm-afs-searched-scheduler"]
    by_name = {(r["sampler"], r["nfe_target"]): r for r in rows}
    assert sorted({r["nfe_target"] for r in rows}) == [5, 9]  # the file's NFEs
    for nfe in (5, 9):
        searched, default = by_name[("edm-ipndm-afs-searched-scheduler", nfe)], by_name[("edm-ipndm-afs-scheduler", nfe)]
        assert searched["nfe"] == default["nfe"] == nfe
        assert searched["error_median"] == pytest.approx(results[nfe]["holdout_error_median"], rel=1e-4)
        assert default["error_median"] == pytest.approx(results[nfe]["default_holdout_error_median"], rel=1e-4)


def test_schedule_file_rows_run_on_the_core_for_models_without_the_diffusers_loop(tmp_path, gaussian):
    from edm_sampling.evaluation.schedule_search import schedule_file_specs

    assert main(_tune(tmp_path, "--solver", "heun", "--nfe", "5")) == 0
    path = str(tmp_path / "schedule" / "schedule_heun.json")
    from edm_sampling.evaluation.sweep import SweepConfig, run_sweep

    result = run_sweep(SweepConfig(model="digits", samplers=["edm-heun"], schedule_file=path, nfe=[5], num_samples=4,
                                   progress=False, quiet=True))
    assert [r["sampler"] for r in result["rows"]] == ["edm-heun", "edm-heun-scheduler", "edm-heun-searched-scheduler"]
    assert any(n.startswith(f"--schedule-file {path} was searched on gaussian, not digits") for n in result["meta"]["notes"])
    default, searched = schedule_file_specs(path, [5], scheduler_loop=False)
    assert (searched.name, searched.runner, default.name, default.runner) == ("edm-heun-searched", "core", "edm-heun", "core")
    from edm_sampling.evaluation.samplers_registry import run_sampler

    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = run_sampler(searched, gaussian, latents, searched.steps_for_nfe(5), [torch.Generator() for _ in range(4)])
    grid = json.loads(open(path).read())["grids"][0]
    assert out.nfe == 5 and out.start_sigma == grid[0]
    expected = sample(gaussian.denoiser, latents, grid, solver="heun")
    torch.testing.assert_close(out.sample, expected.sample)


def _malformed(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    no_solver = tmp_path / "no_solver.json"
    no_solver.write_text(json.dumps({"format": "edm_sampling.schedule/1", "grids": [[80.0, 1.0, 0.0]]}))
    increasing = tmp_path / "increasing.json"
    increasing.write_text(json.dumps({"format": "edm_sampling.schedule/1", "solver": "ipndm", "grids": [[1.0, 80.0, 0.0]]}))
    two_steps = tmp_path / "two_steps.json"
    two_steps.write_text(json.dumps({"format": "edm_sampling.schedule/1", "solver": "ipndm", "grids": [[80.0, 1.0, 0.0]]}))
    return {"bad": bad_json, "no_solver": no_solver, "increasing": increasing, "two_steps": two_steps}


@pytest.mark.parametrize(
    "args, message",
    [
        (["tune", "--schedule", "--solver", "plms"], "--solver must be one of"),
        (["tune", "--schedule", "--nfe", "0"], "--nfe: every NFE must be an integer in [1, 200]"),
        (["tune", "--schedule", "--nfe", "5,500"], "--nfe: every NFE must be an integer in [1, 200]"),
        (["tune", "--schedule", "--solver", "heun", "--nfe", "6"], "--nfe: heun makes 2N - 1 model calls"),
        (["tune", "--schedule", "--solver", "heun", "--afs"], "--afs applies to the solvers"),
        (["tune", "--schedule", "--nfe", "40", "--candidates", "30"], "--candidates must be at least"),
        (["tune", "--schedule", "--coeff", "0,1"], "--coeff: give positive numbers"),
        (["tune", "--schedule", "--coeff", ""], "argument --coeff: expected numbers separated by commas, got ''"),
        (["tune", "--schedule", "--seed", "-5"], "--seed: "),
        (["tune", "--schedule", "--s-churn", "10"], "--s-churn: for the churn search only"),
        (["tune", "--solver", "ipndm"], "--solver: for the step schedule search only"),
        (["tune", "--nfe", "9,17"], "--nfe: the churn search runs at one NFE"),
        (["bench", "--schedule-file", "MISSING"], "--schedule-file: no such file"),
        (["bench", "--schedule-file", "bad"], "is not a readable JSON file"),
        (["bench", "--schedule-file", "no_solver"], "does not name the solver its grids are for"),
        (["bench", "--schedule-file", "increasing"], "holds a bad grid"),
        (["bench", "--schedule-file", "two_steps", "--nfe", "2,5"], "--nfe 5: --schedule-file"),
    ],
)
def test_bad_input_is_one_clear_error_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    files = _malformed(tmp_path)
    args = [str(files.get(a, tmp_path / a)) if a in files or a == "MISSING" else a for a in args]
    out = tmp_path / "out"

    def no_work(*unused, **kwargs):
        raise AssertionError("work started before the bad input was rejected")

    monkeypatch.setattr("edm_sampling.evaluation.schedule_search.prepare_search", no_work)
    monkeypatch.setattr("edm_sampling.evaluation.sweep.run_sampler", no_work)
    monkeypatch.setattr("edm_sampling.evaluation.models.load_model", no_work)
    with pytest.raises(SystemExit) as error:
        main([*args, "--model", "gaussian", "--no-progress", "--output-dir", str(out)])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1
    assert not out.exists()


def test_schedule_files_of_other_solvers_stay_beside_a_new_one(tmp_path, capsys):
    folder = tmp_path / "schedule"
    quick = ("--nfe", "3", "--candidates", "8", "--no-refine")
    assert main(_tune(tmp_path, "--solver", "euler", *quick, "--grid-images", "8")) == 0
    assert "note: --grid-images does nothing with --schedule" in capsys.readouterr().err
    euler = (folder / "schedule_euler.json").read_text()
    assert main(_tune(tmp_path, "--solver", "ipndm", "--overwrite", *quick)) == 0
    assert main(_tune(tmp_path, "--solver", "ipndm", "--overwrite", *quick, "--seed", "1")) == 0  # its own file is replaced
    capsys.readouterr()
    assert sorted(p.name for p in folder.glob("schedule_*.json")) == ["schedule_euler.json", "schedule_ipndm.json"]
    assert (folder / "schedule_euler.json").read_text() == euler
    assert json.loads((folder / "schedule_ipndm.json").read_text())["search"]["seed"] == 1
