"""What `edm-sampling bench` shows a user: the tables (lower is better, best marked, the ratio
best edm_sampling / best diffusers, missing values explained), the plot (one legend, a
distinct colour and marker per sampler) and the titled sample grids beside true data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edm_sampling.evaluation.report import (
    STOCHASTIC_MARK,
    family_ratio,
    format_report,
    pivot_table,
    plot_quality_vs_nfe,
    reference_limited_nfes,
    sampler_styles,
)
from edm_sampling.evaluation.samplers_registry import SAMPLERS


def _row(sampler, family, nfe, error, fd, stochastic=False, nfe_measured=None, mismatch=math.nan):
    return {"sampler": sampler, "family": family, "stochastic": stochastic, "nfe_target": nfe,
            "nfe": nfe if nfe_measured is None else nfe_measured, "error_median": error, "error_mean": error,
            "mode_mismatch": mismatch, "fd": fd, "num_samples": 256}


ROWS = [
    _row("ours-a", "edm_sampling", 5, 0.4, 3.0, mismatch=0.1), _row("ours-a", "edm_sampling", 9, 0.1, 1.0, mismatch=0.0),
    _row("ours-heun", "edm_sampling", 4, 0.9, 9.0, nfe_measured=3, mismatch=0.2),
    _row("ours-churn", "edm_sampling", 5, math.nan, 2.0, stochastic=True),
    _row("ours-churn", "edm_sampling", 9, math.nan, 0.5, stochastic=True),
    _row("theirs", "diffusers", 5, 0.2, 2.5, mismatch=0.05), _row("theirs", "diffusers", 9, 0.2, 1.5, mismatch=0.0),
]


def test_pivot_table_says_lower_is_better_marks_the_best_and_prints_the_family_ratio():
    text = pivot_table(ROWS, "error_median")
    lines = text.splitlines()
    assert "lower is better" in lines[0] and "* = best at this NFE" in lines[0]
    row = {line.split()[0]: line for line in lines[3:]}
    assert row["theirs"].split()[1:] == ["0.2*", "0.2"]  # no NFE-4 run; NFE 5: diffusers best
    assert row["ours-a"].split()[-1] == "0.1*"  # NFE 9: ours best
    assert "(3)" in row["ours-heun"]  # measured NFE where it differs from the target
    assert row["ours-churn"].count(STOCHASTIC_MARK) == 2  # no ODE error: says why
    ratio = lines[-1]
    assert ratio.startswith("best edm_sampling / best diffusers")
    assert ratio.split()[-3:] == ["-", "2x", "0.5x"]  # NFE 4: no diffusers value; 0.4 / 0.2; 0.1 / 0.2
    assert family_ratio(ROWS, "error_median") == pytest.approx({4: math.nan, 5: 2.0, 9: 0.5}, nan_ok=True)
    # FD: stochastic samplers have values, and a tie at 0% marks every tied sampler
    assert STOCHASTIC_MARK not in pivot_table(ROWS, "fd")
    mismatch = pivot_table(ROWS, "mode_mismatch").splitlines()
    assert sum(line.split().count("0.0%*") for line in mismatch) == 2


def test_report_explains_missing_values_and_gives_the_fd_of_true_data_with_its_noise():
    meta = {"model": "m", "model_info": {"model": "a model"}, "ode_reference": "exact", "features": "FD-pixels",
            "has_modes": True, "notes": ["Frechet distance skipped: ..."],
            "fd_floor": {"num_samples": 256, "draws": 5, "fd_mean": 0.39, "fd_std": 0.1, "fd_values": []}}
    text = format_report({"rows": ROWS, "meta": meta})
    assert "error_median:" in text and "mode_mismatch:" in text and "fd:" in text
    assert f"{STOCHASTIC_MARK}: a stochastic sampler has no single ODE solution" in text
    assert "(n): the measured NFE" in text
    assert "FD of 256 true data draws" in text and "0.39 +- 0.1 (mean +- std over 5 draws)" in text
    assert "note: Frechet distance skipped" in text
    assert "uncertain by +- sqrt(p (1 - p) / 256) (2% +- 0.9%)" in text


def test_every_sampler_gets_its_own_colour_and_marker():
    names = list(SAMPLERS) + [f"extra-{i}" for i in range(30 - len(SAMPLERS))]  # 30 samplers
    styles = sampler_styles(names, {n: s.family for n, s in SAMPLERS.items()})
    assert len({s["color"] for s in styles.values()}) == len(names)
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(names)
    assert {styles[n]["linestyle"] for n, s in SAMPLERS.items() if s.family == "diffusers"} == {"--"}
    assert {styles[n]["linestyle"] for n, s in SAMPLERS.items() if s.family == "edm_sampling"} == {"-"}


def test_plot_has_one_legend_labelled_log_ticks_and_a_true_data_band(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    floor = {"num_samples": 256, "fd_mean": 1.2, "fd_std": 0.2}
    plot_quality_vs_nfe(ROWS, tmp_path / "plot.png", title="t", fd_floor=floor)
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    fig = figures[0]
    assert len(fig.legends) == 1 and all(axis.get_legend() is None for axis in fig.axes)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:4] == ["ours-a", "ours-heun", "ours-churn", "theirs"] and "FD of 256 true data draws" in legend[-1]
    assert "solid: edm_sampling" in fig.legends[0].get_title().get_text()
    titles = [axis.get_title() for axis in fig.axes]
    assert len(titles) == 3 and all("lower is better" in t for t in titles)
    fig.canvas.draw()
    for axis in fig.axes:
        assert [t.get_text() for t in axis.get_xticklabels() if t.get_text()] == ["3", "5", "9"]
        if axis.get_yscale() == "log":
            assert any(t.get_text() for t in axis.get_yticklabels())
    plt.close(fig)


def test_grid_images_are_titled_and_show_true_data_beside_the_samples(tmp_path):
    import torch
    from PIL import Image

    from edm_sampling.images import save_titled_grids

    samples, truth = torch.rand(16, 3, 8, 8) * 2 - 1, torch.rand(9, 3, 8, 8) * 2 - 1
    long_title = ", ".join(["edm-heun at 9 model calls"] + [f"metric {i} 0.123" for i in range(12)])
    path = save_titled_grids([("edm-heun: 16 of 256 samples", samples), ("true data: 9 draws", truth)], tmp_path / "g.png",
                             title=long_title)
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[1] > 2 * 4 * 33  # two 4-cell-wide grids of 32-pixel cells side by side
    dark_rows = np.nonzero((image < 128).any(axis=1))[0]
    assert dark_rows[0] < 20  # text at the top
    # the long title wraps onto several lines instead of running off the image
    assert (image[:, -8:] < 128).sum() == 0


def test_runs_that_do_not_start_from_the_prior_never_win(tmp_path):
    """diffusers' linspace Euler at one step starts at sigma(t = 0) = 0.01: it returns almost its
    input, close to the ODE solution from that start, and must not be marked best nor enter the ratio."""
    from edm_sampling.evaluation.sweep import SweepConfig, run_sweep

    result = run_sweep(SweepConfig(model="gaussian", samplers=["edm-euler", "euler-karras", "ddim"], nfe=[1, 2],
                                   num_samples=4, progress=False, quiet=True, stats_cache=str(tmp_path)))
    rows = {(r["sampler"], r["nfe_target"]): r for r in result["rows"]}
    low = rows[("euler-karras", 1)]
    assert not low["from_prior"] and low["start_sigma"] == pytest.approx(0.01, rel=0.01)
    assert low["error_median"] < rows[("ddim", 1)]["error_median"]  # the garbage that used to win
    assert all(r["from_prior"] for key, r in rows.items() if key != ("euler-karras", 1))
    ratio = family_ratio(result["rows"], "error_median")[1]
    assert ratio == pytest.approx(rows[("edm-euler", 1)]["error_median"] / rows[("ddim", 1)]["error_median"])
    text = format_report(result)
    table = text.split("\n\n")[1].splitlines()
    line = next(line for line in table if line.startswith("euler-karras"))
    assert line.split()[1].endswith("!") and "*" not in line.split()[1]
    assert "!: not from the prior (below 0.5 x the model's sigma_max 80): euler-karras at NFE 1 starts at sigma 0.01" in text


def test_nfes_where_the_reference_is_not_accurate_enough_leave_the_ratio_line():
    check = {"steps": 4, "half_steps_rmse_median": 0.01, "half_steps_rmse_max": 0.045, "estimated_error": 0.015}
    meta = {"model": "m", "model_info": {"model": "a model"}, "ode_reference": "Heun, 4 steps", "features": "FD-pixels",
            "ode_reference_check": check}
    rows = [r for r in ROWS if r["sampler"] != "ours-heun"]  # best median error: 0.2 at NFE 5, 0.1 at NFE 9
    assert reference_limited_nfes(rows, check) == [9]  # 0.015 > 0.1 x 0.1; not > 0.1 x 0.2
    text = format_report({"rows": rows, "meta": meta})
    ratio = next(line for line in text.splitlines() if line.startswith("best edm_sampling / best diffusers"))
    assert ratio.split()[-2:] == ["2x", "(ref)"]
    assert "note: the ODE reference is not accurate enough at NFE 9" in text and "raise --reference-steps (now 4)" in text
    assert reference_limited_nfes(rows, None) == [] and reference_limited_nfes(rows, {**check, "estimated_error": 1e-3}) == []
