"""Writing a sweep's results: the screen table, CSV, JSON, the quality-vs-NFE plot, sample grids.

Everything goes into one output folder, which `prepare_output_dir` refuses to reuse unless the
user passed `--overwrite`, so nothing a user saved is replaced silently.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

COLUMNS = (
    "sampler",
    "family",
    "steps",
    "nfe_target",
    "nfe",
    "error_mean",
    "error_median",
    "error_p90",
    "fd",
    "sec_per_sample",
    "num_samples",
)
OUTPUT_FILES = ("results.csv", "results.json", "quality_vs_nfe.png")


def prepare_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create the output folder; a non-empty existing one is an error unless `overwrite`.

    With `overwrite`, only the files this tool writes (results.*, the plot, grids/) are
    removed; anything else the user keeps there stays.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output: {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"--output: {path} already exists and is not empty; pass --overwrite to replace its results")
        for name in OUTPUT_FILES + ("tune.csv", "tune.json"):
            (path / name).unlink(missing_ok=True)
        shutil.rmtree(path / "grids", ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_output_dir(path: str | Path, overwrite: bool = False) -> None:
    """The check of `prepare_output_dir` without creating anything (run before any sampling)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output: {path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"--output: {path} already exists and is not empty; pass --overwrite to replace its results")


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == 0:
            return "0"
        if abs(value) >= 1000 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """A fixed-width text table of `rows` (missing values and NaN shown as '-')."""
    cells = [[_format(row.get(c, math.nan)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if i > 1 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))) for r in cells]
    return "\n".join(out)


def pivot_table(rows: Sequence[dict], value: str = "error_median") -> str:
    """Samplers as rows, target NFE as columns, `value` in the cells (measured NFE in brackets
    when it differs from the target)."""
    targets = sorted({r["nfe_target"] for r in rows})
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    lookup = {(r["sampler"], r["nfe_target"]): r for r in rows}
    header = [f"{value} \\ NFE"] + [str(t) for t in targets]
    body = []
    for name in samplers:
        line = [name]
        for t in targets:
            r = lookup.get((name, t))
            if r is None:
                line.append("")
                continue
            text = _format(float(r.get(value, math.nan)))
            if r.get("nfe") != t:
                text += f" ({r.get('nfe')})"
            line.append(text)
        body.append(line)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(rows: Sequence[dict], path: str | Path, columns: Sequence[str] | None = None) -> None:
    """One line per row; the columns are `columns` or the union of the rows' keys; NaN is left blank."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if _is_nan(row.get(k)) else row.get(k, "") for k in columns})


def _is_nan(value: Any) -> bool:
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(payload: dict, path: str | Path) -> None:
    """`payload` as indented JSON (NaN and inf written as null)."""
    with open(path, "w") as handle:
        json.dump(_json_safe(payload), handle, indent=2)
        handle.write("\n")


def plot_quality_vs_nfe(rows: Sequence[dict], path: str | Path, title: str = "") -> None:
    """Quality against measured NFE on log-log axes, one line per sampler: the mean per-sample
    ODE error (left; the mean, because on multi-modal data most samples land exactly on their
    reference and the median is 0) and the Frechet distance (right); panels with no finite
    value are skipped."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    metrics = [
        (key, label)
        for key, label in (("error_mean", "mean RMSE vs reference ODE solution"), ("fd", "Frechet distance"))
        if any(_finite_positive(r.get(key)) for r in rows)
    ]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(6.4 * max(len(metrics), 1), 4.8), squeeze=False)
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    cmap = plt.get_cmap("tab10")
    for axis, (key, label) in zip(axes[0], metrics):
        for index, name in enumerate(samplers):
            points = sorted(
                (r["nfe"], r[key]) for r in rows if r["sampler"] == name and _finite_positive(r.get(key))
            )
            if not points:
                continue
            family = next(r.get("family", "") for r in rows if r["sampler"] == name)
            x, y = zip(*points)
            axis.plot(
                x, y, marker="o" if family != "diffusers" else "s", markersize=4,
                linestyle="-" if family != "diffusers" else "--", color=cmap(index % 10), label=name,
            )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("model calls (NFE, measured)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    if metrics:
        axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite_positive(value: Any) -> bool:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and value > 0
