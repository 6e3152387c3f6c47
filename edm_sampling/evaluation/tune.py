"""`edm-sampling tune`: grid search of the churn parameters at one NFE (the paper's Figure 4 /
Table 5 procedure: the best S_churn, S_tmin, S_tmax, S_noise are model-specific and found by
search, scoring each setting by the Frechet distance of its samples to the data)."""

from __future__ import annotations

import itertools
import math
from typing import Any, Sequence

from .samplers_registry import SAMPLERS, with_churn


def churn_grid(
    s_churn: Sequence[float], s_tmin: Sequence[float], s_tmax: Sequence[float], s_noise: Sequence[float]
) -> list[tuple[float, float, float, float]]:
    """All combinations; S_churn = 0 (deterministic, where the others do nothing) appears once."""
    for name, values in (("--s-churn", s_churn), ("--s-tmin", s_tmin), ("--s-tmax", s_tmax), ("--s-noise", s_noise)):
        if not values:
            raise ValueError(f"{name}: give at least one value")
        if any(not math.isfinite(v) and v != math.inf or v < 0 for v in values):
            raise ValueError(f"{name}: values must be >= 0, got {list(values)}")
    if any(v <= 0 for v in s_noise):
        raise ValueError(f"--s-noise: values must be > 0, got {list(s_noise)}")
    grid = [(0.0, 0.0, math.inf, 1.0)]
    for churn, tmin, tmax, noise in itertools.product(s_churn, s_tmin, s_tmax, s_noise):
        if churn == 0:
            continue
        if tmax < tmin:
            raise ValueError(f"--s-tmax: every S_tmax must be >= every S_tmin, got S_tmin={tmin} > S_tmax={tmax}")
        grid.append((float(churn), float(tmin), float(tmax), float(noise)))
    return list(dict.fromkeys(grid))


def run_tune(config, base: str = "edm-heun", s_churn=(0, 10, 30, 80), s_tmin=(0.01, 0.05), s_tmax=(1, 50),
             s_noise=(1.0, 1.007)) -> dict[str, Any]:
    """Run every churn setting of `base` at config.nfe[0] on the same seeds; returns
    {"grid": rows sorted by FD, "best": row, "deterministic_fd": float} on the main process."""
    from .report import write_csv, write_json
    from .sweep import run_sweep

    if base not in SAMPLERS or SAMPLERS[base].family != "edm_sampling":
        raise ValueError(f"--sampler: tune works on our samplers {[n for n, s in SAMPLERS.items() if s.family == 'edm_sampling']}, got {base!r}")
    if len(list(config.nfe)) != 1:
        raise ValueError("--nfe: tune takes a single NFE")
    grid = churn_grid(s_churn, s_tmin, s_tmax, s_noise)
    specs = [with_churn(SAMPLERS[base], *setting) for setting in grid]
    config.samplers = []
    config.extra_specs = specs
    config.reference_steps = 0
    result = run_sweep(config)
    if not result:
        return {}
    rows = []
    for setting, row in zip(grid, result["rows"]):
        rows.append({"s_churn": setting[0], "s_tmin": setting[1], "s_tmax": setting[2], "s_noise": setting[3], **row})
    if all(math.isnan(r["fd"]) for r in rows):
        raise ValueError("tune needs reference data for the Frechet distance: give --reference for a --model folder")
    ranked = sorted(rows, key=lambda r: (math.isnan(r["fd"]), r["fd"]))
    deterministic = next(r["fd"] for r in rows if r["s_churn"] == 0)
    out = {"grid": ranked, "best": ranked[0], "deterministic_fd": deterministic, "meta": result["meta"]}
    if config.output is not None:
        from pathlib import Path

        folder = Path(config.output)
        write_csv(ranked, folder / "tune.csv", ["s_churn", "s_tmin", "s_tmax", "s_noise", "steps", "nfe", "fd", "sec_per_sample", "num_samples", "sampler"])
        write_json({"best": ranked[0], "deterministic_fd": deterministic, "grid": ranked, "meta": result["meta"]}, folder / "tune.json")
        plot_tune(rows, folder / "tune.png")
    return out


def plot_tune(rows: list[dict], path) -> None:
    """FD against S_churn, one line per (S_tmin, S_tmax, S_noise); the deterministic FD dashed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    fig, axis = plt.subplots(figsize=(6.4, 4.8))
    deterministic = next(r["fd"] for r in rows if r["s_churn"] == 0)
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["s_churn"] > 0:
            groups.setdefault((r["s_tmin"], r["s_tmax"], r["s_noise"]), []).append((r["s_churn"], r["fd"]))
    for (tmin, tmax, noise), points in groups.items():
        x, y = zip(*sorted([(0.0, deterministic)] + points))
        axis.plot(x, y, marker="o", markersize=4, label=f"S_tmin={tmin:g} S_tmax={tmax:g} S_noise={noise:g}")
    axis.axhline(deterministic, color="k", linestyle="--", linewidth=1, label="deterministic (S_churn=0)")
    axis.set_xlabel("S_churn")
    axis.set_ylabel("Frechet distance")
    axis.set_title(f"churn grid at NFE {rows[0]['nfe']}")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
