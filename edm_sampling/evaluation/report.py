"""Writing a sweep's results: the screen table, CSV, JSON, the quality-vs-NFE plot, sample grids.

Everything goes into one output folder, which `check_output_dir` refuses to reuse unless the
user passed `--overwrite`, and then only the package's own files are replaced (`sweep.open_output_folder`).
Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from ..safety import InvalidArgument, atomic_write, atomic_write_text

COLUMNS = (
    "sampler",
    "family",
    "stochastic",
    "steps",
    "nfe_target",
    "nfe",
    "error_mean",
    "error_median",
    "error_p90",
    "mode_mismatch",
    "fd",
    "sec_per_sample",
    "num_samples",
    "start_sigma",
    "from_prior",
)
OURS, DIFFUSERS = "edm_sampling", "diffusers"
OUTPUT_FILES = ("results.csv", "results.json", "quality_vs_nfe.png")


def check_output_dir(path: str | Path, overwrite: bool = False) -> None:
    """`InvalidArgument` if ``path`` is a file, or a folder holding files (other than the safety
    layer's own) and ``overwrite`` is not set: results are never replaced without --overwrite.
    With it, `sweep.open_output_folder` replaces only what edm_sampling wrote."""
    from ..safety.inputs import output_folder
    from ..safety.runfolder import files_below

    path = output_folder("output", path)
    if path.is_dir() and files_below(path) and not overwrite:
        raise InvalidArgument("output", f"{path} already exists and is not empty; pass --overwrite to replace its results "
                                        "(files edm_sampling did not write there are kept)")


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


METRIC_LABELS = {
    "error_mean": "mean per-sample RMSE to the ODE solution from the same noise",
    "error_median": "median per-sample RMSE to the ODE solution from the same noise",
    "mode_mismatch": "fraction of samples that end in another mode than their reference",
    "fd": "Frechet distance to the data",
}
STOCHASTIC_MARK = "(stoch.)"
NOT_FROM_PRIOR_MARK = "!"
PRIOR_START_FRACTION = 0.5
"""A run starts from the prior when its first noise level is at least this fraction of the
model's sigma_max (every sampler's grid starts at or near it; diffusers' linspace Euler / Heun
at one step start at sigma(t = 0) = 0.01 instead)."""
REFERENCE_MARK = "(ref)"


def starts_from_prior(start_sigma: float | None, sigma_max: float) -> bool:
    """start_sigma >= PRIOR_START_FRACTION x sigma_max (True where the start is unknown)."""
    return start_sigma is None or start_sigma >= PRIOR_START_FRACTION * sigma_max


def from_prior(row: dict) -> bool:
    """A result row's `from_prior` flag (`starts_from_prior`); rows without it count as such."""
    return bool(row.get("from_prior", True))


def best_per_nfe(rows: Sequence[dict], value: str) -> dict[int, float]:
    """The smallest finite `value` at each target NFE over the samplers that start from the
    prior: one that starts near sigma = 0 (diffusers' linspace Euler / Heun at one step) returns
    almost its input, which lies near its own ODE solution, and would win with garbage."""
    best: dict[int, float] = {}
    for r in rows:
        v = float(r.get(value, math.nan))
        if math.isfinite(v) and from_prior(r):
            best[r["nfe_target"]] = min(v, best.get(r["nfe_target"], math.inf))
    return best


def family_ratio(rows: Sequence[dict], value: str, skip: Collection[int] = ()) -> dict[int, float]:
    """Per target NFE: best of our samplers / best of diffusers' (< 1: ours is better), each
    over the rows that start from the prior; NaN where either family has no finite value,
    diffusers' best is 0, or the NFE is in `skip`."""
    best = {family: best_per_nfe([r for r in rows if r.get("family") == family], value) for family in (OURS, DIFFUSERS)}
    ratios = {}
    for nfe in sorted({r["nfe_target"] for r in rows}):
        ours, theirs = best[OURS].get(nfe, math.nan), best[DIFFUSERS].get(nfe, math.nan)
        ratios[nfe] = ours / theirs if theirs > 0 and nfe not in skip else math.nan
    return ratios


REFERENCE_ACCURACY_FACTOR = 0.1
"""An NFE's ODE errors measure the samplers only where the reference's own estimated error is at
most this fraction of the best median error there (else it is as much the reference's error)."""


def reference_limited_nfes(rows: Sequence[dict], check: dict | None) -> list[int]:
    """The target NFEs where the Heun reference's estimated error (`check`, from `sweep`'s step
    halving) exceeds REFERENCE_ACCURACY_FACTOR x the best median ODE error: there the error
    table cannot rank the samplers. Empty without a check (exact references)."""
    if not check:
        return []
    best = best_per_nfe(rows, "error_median")
    return sorted(n for n, v in best.items() if check["estimated_error"] > REFERENCE_ACCURACY_FACTOR * v)


def _not_from_prior_note(rows: Sequence[dict], sigma_max: float | None) -> str | None:
    """The report's line naming the rows that do not start from the prior, or None."""
    starts: dict[tuple[str, float], list[int]] = {}
    for r in rows:
        if not from_prior(r):
            starts.setdefault((r["sampler"], float(r["start_sigma"])), []).append(r["nfe_target"])
    if not starts:
        return None
    below = f" (below {PRIOR_START_FRACTION:g} x the model's sigma_max {sigma_max:.4g})" if sigma_max else ""
    runs = "; ".join(f"{name} at NFE {', '.join(map(str, nfes))} starts at sigma {start:.3g}"
                     for (name, start), nfes in starts.items())
    return (f"{NOT_FROM_PRIOR_MARK}: not from the prior{below}: {runs}; such a run returns almost its input, which is "
            "close to the ODE solution from that start: left out of the best marks (*) and the ratio lines")


def _cell(value: str, row: dict) -> str:
    v = float(row.get(value, math.nan))
    if math.isnan(v):
        return STOCHASTIC_MARK if row.get("stochastic") and value != "fd" else "-"
    return f"{100 * v:.1f}%" if value == "mode_mismatch" else _format(v)


def pivot_table(rows: Sequence[dict], value: str = "error_median", skip_ratio: Collection[int] = ()) -> str:
    """Samplers as rows, target NFE as columns, `value` in the cells, lower is better: '*'
    marks the best at each NFE, '!' a run that does not start from the prior (never marked
    best), the measured NFE follows in brackets where it differs from the target, stochastic
    samplers say so where they have no value, and a last row gives best edm_sampling / best
    diffusers when both families are present ("(ref)" at the NFEs of `skip_ratio`, where the
    ODE reference is not accurate enough to rank them)."""
    targets = sorted({r["nfe_target"] for r in rows})
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    lookup = {(r["sampler"], r["nfe_target"]): r for r in rows}
    best = best_per_nfe(rows, value)
    header = ["sampler \\ NFE"] + [str(t) for t in targets]
    body = []
    for name in samplers:
        line = [name]
        for t in targets:
            r = lookup.get((name, t))
            if r is None:
                line.append("")
                continue
            text = _cell(value, r)
            v = float(r.get(value, math.nan))
            if not from_prior(r):
                text += NOT_FROM_PRIOR_MARK
            else:
                text += "*" if math.isfinite(v) and v <= best.get(t, math.nan) else " "
            if r.get("nfe") != t:
                text = f"({r.get('nfe')}) " + text
            line.append(text)
        body.append(line)
    families = {r.get("family") for r in rows}
    footer = []
    if {OURS, DIFFUSERS} <= families:
        ratios = family_ratio(rows, value, skip_ratio)
        footer.append(["best edm_sampling / best diffusers"] + [_format(ratios[t]) + "x" if math.isfinite(ratios[t])
                                                                else REFERENCE_MARK if t in skip_ratio else "- "
                                                                for t in targets])
    table = [header] + body + footer
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def render(row: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    lines = [f"{value}: {METRIC_LABELS.get(value, value)} (lower is better; * = best at this NFE)", render(header), rule]
    lines += [render(row) for row in body]
    if footer:
        lines += [rule] + [render(row) for row in footer]
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """What `edm-sampling bench` prints: which sampler set ran, the pivot tables, what is missing
    and why, the FD of true data with its noise, the reference's accuracy, and the notes."""
    rows, meta = result["rows"], result["meta"]
    check = meta.get("ode_reference_check")
    limited = reference_limited_nfes(rows, check)
    parts = [meta["sampler_set"]] if meta.get("sampler_set") else []
    if any(math.isfinite(float(r["error_median"])) for r in rows):
        parts.append(pivot_table(rows, "error_median", limited))
    if any(math.isfinite(float(r.get("mode_mismatch", math.nan))) for r in rows):
        parts.append(pivot_table(rows, "mode_mismatch", limited))
    if any(math.isfinite(float(r["fd"])) for r in rows):
        parts.append(pivot_table(rows, "fd"))
    legend = [f"model: {meta['model']} ({meta['model_info'].get('model', '')})",
              f"ODE reference: {meta['ode_reference']}; Frechet distance on {meta['features']}"]
    if any(r.get("stochastic") for r in rows):
        legend.append(f"{STOCHASTIC_MARK}: a stochastic sampler has no single ODE solution to compare with (FD only)")
    if any(r.get("nfe") != r["nfe_target"] for r in rows):
        legend.append("(n): the measured NFE where a sampler cannot make exactly the target (Heun-type: 2N - 1 calls)")
    if any(float(r["error_median"]) < 1e-6 for r in rows):
        legend.append("error below 1e-6: at least half the samples equal their reference within its accuracy (the ideal "
                      "denoiser of a finite dataset snaps onto training images): the mode table tells these samplers apart")
    if meta.get("has_modes"):
        n = max(int(r.get("num_samples", 0)) for r in rows)
        legend.append("mode: the mixture component (most likely at noise 0.2) or the nearest training image of a sample; "
                      f"a fraction p of {n} samples is uncertain by +- sqrt(p (1 - p) / {n}) "
                      f"(2% +- {100 * math.sqrt(0.02 * 0.98 / max(n, 1)):.1f}%)")
    prior = _not_from_prior_note(rows, meta.get("sigma_max"))
    if prior:
        legend.append(prior)
    if check:
        text = (f"reference accuracy: {check['steps']} vs {check['steps'] // 2} Heun steps differ by at most "
                f"{check['half_steps_rmse_max']:.2e} RMSE (its own error ~{check['estimated_error']:.1e})")
        legend.append(text)
    if limited:
        legend.append(f"note: the ODE reference is not accurate enough at NFE {', '.join(map(str, limited))}: its estimated "
                      f"error {check['estimated_error']:.2g} is more than {REFERENCE_ACCURACY_FACTOR:g} x the best median "
                      f"error there, so those errors are as much the reference's: {REFERENCE_MARK} in the ratio lines; "
                      f"raise --reference-steps (now {check['steps']})")
    floor = meta.get("fd_floor")
    if floor:
        legend.append(f"FD of {floor['num_samples']} true data draws (no sampler error, only sampling noise): "
                      f"{floor['fd_mean']:.4g} +- {floor['fd_std']:.2g} (mean +- std over {floor['draws']} draws); "
                      "samplers within ~2 std of it are as good as the data by this metric")
    legend += [f"note: {note}" for note in meta.get("notes", [])]
    return "\n\n".join(parts + ["\n".join(legend)])


def write_csv(rows: Sequence[dict], path: str | Path, columns: Sequence[str] | None = None) -> None:
    """One line per row, written atomically; the columns are `columns` or the union of the rows'
    keys; NaN is left blank."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if _is_nan(row.get(k)) else row.get(k, "") for k in columns})
    atomic_write_text(path, text.getvalue())


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
    """`payload` as indented JSON (NaN and inf written as null), written atomically."""
    atomic_write_text(path, json.dumps(_json_safe(payload), indent=2) + "\n")


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "*", "p", "d", "8")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#000000", "#8db600", "#882d17", "#f3c300", "#604e97", "#00a86b", "#ff1493", "#654522", "#a1caf1", "#f99379",
           "#000080", "#808000", "#00ced1", "#b03060", "#ff8c00", "#2f4f4f", "#7cfc00", "#da70d6", "#4682b4", "#a0522d",
           "#ffd700", "#008b8b", "#c71585", "#556b2f", "#ff6347", "#4b0082")
"""tab10, then twenty-six more of high mutual contrast (Kelly's list and named web colours): 36."""


def sampler_styles(names: Sequence[str], families: dict[str, str]) -> dict[str, dict]:
    """A distinct colour and marker per sampler (distinct colours for up to 36 samplers, distinct
    pairs for up to 252), a solid line for ours and a dashed one for diffusers'."""
    return {
        name: {"color": COLOURS[i % len(COLOURS)], "marker": MARKERS[i % len(MARKERS)],
               "linestyle": "--" if families.get(name) == DIFFUSERS else "-"}
        for i, name in enumerate(names)
    }


def _label_log_y(axis) -> None:
    """Plain-number labels on a log y axis: at 1, 2 and 5 times the powers of ten when it spans
    up to 3 decades, else at every power of ten (call after the data are plotted)."""
    from matplotlib import ticker

    low, high = axis.get_ylim()
    decades = math.log10(max(high, 1e-300)) - math.log10(max(low, 1e-300))
    target = axis.yaxis
    target.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,), numticks=30))
    target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    target.set_minor_formatter(ticker.NullFormatter())


def plot_quality_vs_nfe(rows: Sequence[dict], path: str | Path, title: str = "", fd_floor: dict | None = None) -> None:
    """Quality against measured NFE, one line per sampler, lower is better in every panel:
    the median per-sample ODE error (log-log; zeros are left out), the mode-mismatch fraction (where the model has
    modes) and the Frechet distance (log-log, with the FD of true data draws as a band);
    panels with no value are left out. One legend for all panels, on the right."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    panels = [
        (key, label, log)
        for key, label, log in (
            ("error_median", "median RMSE to the ODE solution\nfrom the same noise", True),
            ("mode_mismatch", "samples ending in another mode\nthan their reference (%)", False),
            ("fd", "Frechet distance to the data", True),
        )
        if any(_finite(r.get(key)) and (not log or float(r[key]) > 0) for r in rows)
    ]
    count = max(len(panels), 1)
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    # tall enough for the legend: a line per sampler, two for the true-data band, four for the title
    height = max(4.4, 0.17 * (len(samplers) + 6) + 0.6)
    fig, axes = plt.subplots(1, count, figsize=(4.6 * count + 2.6, height), squeeze=False)
    families = {r["sampler"]: r.get("family", "") for r in rows}
    styles = sampler_styles(samplers, families)
    handles: dict[str, Any] = {}
    nfes = sorted({r["nfe"] for r in rows})
    for axis, (key, label, log) in zip(axes[0], panels):
        for name in samplers:
            points = sorted((r["nfe"], float(r[key]) * (1 if log else 100)) for r in rows
                            if r["sampler"] == name and _finite(r.get(key)) and (not log or float(r[key]) > 0))
            if points:
                x, y = zip(*points)
                (handles[name],) = axis.plot(x, y, markersize=5, linewidth=1.4, label=name, **styles[name])
        if key == "fd" and fd_floor:
            low, high = fd_floor["fd_mean"] - 2 * fd_floor["fd_std"], fd_floor["fd_mean"] + 2 * fd_floor["fd_std"]
            band = axis.axhspan(max(low, 1e-12), high, color="0.6", alpha=0.35, zorder=0)
            handles["true data"] = band
        axis.set_xscale("log")
        axis.set_xticks(nfes)
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if log:
            axis.set_yscale("log")
            _label_log_y(axis)
        else:
            axis.set_ylim(bottom=0)
        axis.set_xlabel("model calls (NFE)")
        axis.set_title(label + " (lower is better)", fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
    if handles:
        names = [n for n in samplers if n in handles]
        labels = names[:]
        if "true data" in handles:
            names.append("true data")
            labels.append(f"FD of {fd_floor['num_samples']} true data draws\n(mean +- 2 std: no sampler error)")
        fig.legend([handles[n] for n in names], labels, loc="center right", fontsize=8, frameon=False,
                   title="solid: edm_sampling\ndashed: diffusers", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.4 / (4.6 * count + 2.6), 1))
    save_figure(fig, path)
    plt.close(fig)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
