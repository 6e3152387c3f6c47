"""`edm-sampling tune`: settings that give the same sampler on the NFE's grid run once, and the
FD's noise (bootstrap std, and of the paired difference to the deterministic sampler) is
reported so a real win can be told from noise."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edm_sampling.cli import main
from edm_sampling.evaluation.tune import DETERMINISTIC, bootstrap_fd, churn_grid, distinct_settings, win_threshold, win_verdict
from edm_sampling.schedules import karras_sigmas


def test_settings_with_the_same_per_step_churn_are_grouped():
    sigmas = karras_sigmas(5, 0.002, 80.0)  # 80, 17.5, 2.6, 0.23, 0.002
    grid = churn_grid([0, 10, 40, 80], [0.05, 0.01], [50, 100], [1.0, 1.007])
    groups = distinct_settings(grid, sigmas)
    members = {m: first for first, group in groups.items() for m in group}
    assert sorted(members) == sorted(grid)
    # gamma = min(S_churn / 5, sqrt(2) - 1): 10 -> 2 is capped like 40 and 80
    assert members[(40.0, 0.05, 50.0, 1.0)] == members[(80.0, 0.05, 50.0, 1.0)] == members[(10.0, 0.05, 50.0, 1.0)]
    # S_tmin 0.05 and 0.01 include the same levels (none lies between them)
    assert members[(40.0, 0.01, 50.0, 1.007)] == members[(40.0, 0.05, 50.0, 1.007)]
    # S_tmax 100 also churns sigma = 80: a different sampler; S_noise matters where churn acts
    assert members[(40.0, 0.05, 100.0, 1.0)] != members[(40.0, 0.05, 50.0, 1.0)]
    assert members[(40.0, 0.05, 50.0, 1.0)] != members[(40.0, 0.05, 50.0, 1.007)]
    assert len(groups) == 5  # deterministic + {tmax 50, 100} x {noise 1, 1.007}
    assert next(iter(groups)) == DETERMINISTIC


def test_settings_that_churn_no_grid_level_are_the_deterministic_sampler():
    sigmas = karras_sigmas(5, 0.002, 80.0)
    groups = distinct_settings(churn_grid([30], [20.0], [50.0], [1.0, 1.007]), sigmas)  # [20, 50] holds no level
    assert list(groups) == [DETERMINISTIC] and len(groups[DETERMINISTIC]) == 3


def test_bootstrap_fd_noise():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 4))
    std, diff = bootstrap_fd({DETERMINISTIC: features, (1.0, 0.0, 1.0, 1.0): features.copy(),
                              (2.0, 0.0, 1.0, 1.0): rng.normal(size=(200, 4))}, np.zeros(4), np.eye(4), resamples=50)
    assert all(v > 0 for v in std.values())
    assert diff[(1.0, 0.0, 1.0, 1.0)] == 0.0 and diff[(2.0, 0.0, 1.0, 1.0)] > 0  # identical samples: no noise in the difference


def test_tune_runs_each_distinct_setting_once_and_reports_the_noise(tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", "--model", "gaussian", "--nfe", "9", "--num-samples", "24", "--s-churn", "0,20,80", "--s-tmin",
                 "0.05", "--s-tmax", "1,2,50", "--s-noise", "1.007", "--bootstrap", "20", "--output-dir", str(out),
                 "--stats-cache", str(tmp_path / "cache"), "--no-progress", "--grid-images", "0"])
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "note:" not in captured.err  # tune scores by FD by design: nothing to warn about
    assert "7 settings, 3 distinct on this grid" in printed  # 20 and 80 capped alike; S_tmax 1 and 2 hold the same levels
    assert "S_churn=20,80 S_tmin=0.05 S_tmax=1,2 S_noise=1.007: 4 settings" in printed
    assert "best at NFE 9" in printed and "+-" in printed
    payload = json.loads((out / "tune.json").read_text())
    grid = payload["grid"]
    assert len(grid) == 3 and payload["tested"] == 7 and payload["run"] == 3
    assert grid == sorted(grid, key=lambda r: r["fd"])
    assert all(r["fd_std"] > 0 for r in grid)
    assert all(math.isnan(r["fd_delta_std"] or math.nan) == (r["s_churn"] == 0) for r in grid)
    assert (out / "tune.png").exists() and (out / "tune.csv").exists()


def test_the_best_of_k_churn_settings_is_a_win_only_past_the_bonferroni_threshold():
    assert win_threshold(1) == pytest.approx(1.959964, abs=1e-6)  # Phi^-1(0.975)
    assert win_threshold(5) == pytest.approx(2.575829, abs=1e-6)  # Phi^-1(1 - 0.005)
    assert win_threshold(20) == pytest.approx(3.023341, abs=1e-6)
    assert "a real win" in win_verdict(2.3, 1.0, 1)
    line = win_verdict(2.3, 1.0, 5)  # 2.3 std: the best of 5 settings gets that far by chance too often
    assert "within the noise" in line and "threshold 2.58 std" in line and "K = 5 churn settings" in line
    assert "a real win" in win_verdict(2.6, 1.0, 5)
    with pytest.raises(ValueError):
        win_threshold(0)


def test_tune_without_duplicate_settings_lists_no_groups(tmp_path, capsys):
    code = main(["tune", "--model", "gaussian", "--nfe", "9", "--num-samples", "8", "--s-churn", "0,20", "--s-tmin", "0.05",
                 "--s-tmax", "50", "--s-noise", "1.007", "--bootstrap", "0", "--output-dir", str(tmp_path / "tune"),
                 "--stats-cache", str(tmp_path / "cache"), "--no-progress", "--grid-images", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "2 settings, 2 distinct on this grid" in printed and "each group below ran once" not in printed
