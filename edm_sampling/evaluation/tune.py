"""`edm-sampling tune`: grid search of the churn parameters at one NFE (the paper's Figure 4 /
Table 5 procedure: the best S_churn, S_tmin, S_tmax, S_noise are model-specific and found by
search, scoring each setting by the Frechet distance of its samples to the data).

Two things keep the search honest:

- Duplicates are run once. Churn acts only through the per-step gamma_i = min(S_churn / N,
  sqrt(2) - 1) on the grid levels in [S_tmin, S_tmax]: S_churn values past the cap, and
  S_tmin / S_tmax values that include the same grid levels, give the same sampler. Settings
  are grouped by their sigma_hat list on the NFE's grid (and S_noise, where any churn acts);
  each group runs once and lists the settings it stands for.
- The FD's noise is reported: a bootstrap over the samples gives each setting's FD std, and
  resampling the same seeds for every setting (the runs share their noise seeds) gives the std
  of its FD difference to the deterministic sampler. The best of K settings counts as a real
  win only past Bonferroni's threshold, Phi^-1(1 - 0.025 / K) of those std (`win_threshold`).
"""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist
from typing import Any, Sequence

import numpy as np

from ..safety.inputs import InvalidArgument, Number
from . import module_available
from .samplers_registry import SAMPLERS, ours_names, with_churn

Setting = tuple[float, float, float, float]
CHURN_VALUES = {"s_churn": Number(0, allow_inf=True), "s_tmin": Number(0, allow_inf=True),
                "s_tmax": Number(0, allow_inf=True), "s_noise": Number(0, low_open=True)}
DETERMINISTIC: Setting = (0.0, 0.0, math.inf, 1.0)


def churn_grid(s_churn: Sequence[float], s_tmin: Sequence[float], s_tmax: Sequence[float], s_noise: Sequence[float]) -> list[Setting]:
    """All combinations; S_churn = 0 (deterministic, where the others do nothing) appears once.
    Each list must hold one or more values allowed by `CHURN_VALUES` (`InvalidArgument` otherwise)."""
    for name, values in (("s_churn", s_churn), ("s_tmin", s_tmin), ("s_tmax", s_tmax), ("s_noise", s_noise)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise InvalidArgument(name, f"give a list of one or more values, got {values!r}")
        for value in values:
            CHURN_VALUES[name].check(name, value)
    grid = [DETERMINISTIC]
    for churn, tmin, tmax, noise in itertools.product(s_churn, s_tmin, s_tmax, s_noise):
        if churn == 0:
            continue
        if tmax < tmin:
            raise InvalidArgument("s_tmax", f"every S_tmax must be >= every S_tmin, got S_tmin={tmin} > S_tmax={tmax}")
        grid.append((float(churn), float(tmin), float(tmax), float(noise)))
    return list(dict.fromkeys(grid))


def distinct_settings(grid: Sequence[Setting], sigmas, round_sigma=None, sigma_max: float = math.inf) -> dict[Setting, list[Setting]]:
    """Group the settings that give the same sampler on the grid `sigmas`: the same sigma_hat
    at every step (`samplers.churned_grid`) and, where any step is churned, the same S_noise.
    Returns {the setting that runs: every setting it stands for}, in grid order."""
    from ..samplers import churned_grid

    round_sigma = round_sigma or (lambda s: s)
    groups: dict[tuple, list[Setting]] = {}
    for setting in grid:
        churn, tmin, tmax, noise = setting
        levels, hats = churned_grid(sigmas, round_sigma, churn, tmin, tmax, sigma_max)
        churned = any(h > float(s) for h, s in zip(hats, levels))
        key = (tuple(round(h, 12) for h in hats), noise if churned else None)
        groups.setdefault(key, []).append(setting)
    return {members[0]: members for members in groups.values()}


def bootstrap_fd(features: dict[Setting, np.ndarray], mu: np.ndarray, sigma: np.ndarray, resamples: int,
                 seed: int = 0) -> tuple[dict[Setting, float], dict[Setting, float]]:
    """Bootstrap std of each setting's FD, and of its FD minus the deterministic setting's,
    resampling the same sample indices for every setting (they share their noise seeds)."""
    from .metrics import FrechetReference

    reference = FrechetReference(mu, sigma)
    n = len(next(iter(features.values())))
    rng = np.random.default_rng(seed)
    draws: dict[Setting, list[float]] = {s: [] for s in features}
    for _ in range(resamples):
        index = rng.integers(0, n, n)
        for setting, feats in features.items():
            draws[setting].append(reference.distance_of_features(feats[index]))
    base = np.array(draws[DETERMINISTIC])
    std = {s: float(np.std(v, ddof=1)) for s, v in draws.items()}
    diff_std = {s: float(np.std(np.array(v) - base, ddof=1)) for s, v in draws.items()}
    return std, diff_std


def win_threshold(comparisons: int) -> float:
    """z = Phi^-1(1 - 0.025 / K): how many std of the paired difference the best of K churn
    settings must gain over the deterministic sampler to count as a real win (Bonferroni's
    correction of the one-sided 2.5% test for picking the best of K; K = 1: 1.96)."""
    if isinstance(comparisons, bool) or not isinstance(comparisons, int) or comparisons < 1:
        raise ValueError(f"comparisons must be an integer >= 1, got {comparisons!r}")
    return NormalDist().inv_cdf(1 - 0.025 / comparisons)


def win_verdict(gain: float, std: float, comparisons: int) -> str:
    """The line `tune` prints for the best churn setting's FD gain over the deterministic
    sampler (`std`: of their paired difference), best of `comparisons` settings."""
    margin = gain / std if std > 0 else math.inf
    threshold = win_threshold(comparisons)
    verdict = "a real win" if margin >= threshold else "within the noise: not a reliable win"
    return (f"its gain over the deterministic sampler: {gain:.3g} = {margin:.1f} std of the paired difference: {verdict} "
            f"(threshold {threshold:.2f} std: Phi^-1(1 - 0.025 / K), Bonferroni for the best of K = {comparisons} "
            f"churn setting{'s' if comparisons > 1 else ''})")


def run_tune(config, base: str = "edm-heun", s_churn=(0, 10, 30, 80), s_tmin=(0.01, 0.05), s_tmax=(1, 50),
             s_noise=(1.0, 1.007), bootstrap: int = 200) -> dict[str, Any]:
    """Run every distinct churn setting of `base` at config.nfe[0] on the same seeds; returns
    {"grid": rows sorted by FD, "best": row, "deterministic_fd", "duplicates", "meta"} on the
    main process (rows carry fd_std and fd_delta_std from `bootstrap` resamples)."""
    from ..solvers import solver_info
    from .sweep import _distributed, agree, open_output_folder, sweep_outputs

    churn_capable = [n for n in ours_names() if solver_info(SAMPLERS[n].solver).churn]
    if base not in churn_capable:
        raise InvalidArgument("base", f"churn applies to {churn_capable} (Euler and Heun), got {base!r}")
    if isinstance(config.nfe, (str, bytes)) or len(list(config.nfe)) != 1:
        raise InvalidArgument("nfe", "tune takes a single NFE")
    if not Number(0, integer=True).accepts(bootstrap) or bootstrap == 1:
        raise InvalidArgument("bootstrap", f"must be 0 (none) or an integer >= 2, got {bootstrap!r}")
    grid = churn_grid(s_churn, s_tmin, s_tmax, s_noise)
    config.samplers, config.ode_errors = [], False  # scored by FD only
    config.extra_specs = [SAMPLERS[base]]
    config.validate()  # every bad option fails here, before the model is loaded
    rank, _, device, gather, _ = _distributed()
    folder = None
    if config.output is not None and rank == 0:
        folder = agree(gather, lambda: open_output_folder(config, sweep_outputs(config, [], config.nfe) + list(TUNE_FILES)))
    else:
        agree(gather, lambda: None)
    try:
        out = _tune(config, base, grid, bootstrap, folder, rank, device, gather)
        if folder is not None and out:
            folder.commit()
        return out
    finally:
        if folder is not None:
            folder.__exit__(None, None, None)


TUNE_FILES = ("tune.csv", "tune.json", "tune.png")


def _tune(config, base: str, grid: list[Setting], bootstrap: int, folder, rank: int, device, gather) -> dict[str, Any]:
    from .models import load_model
    from .report import write_csv, write_json
    from .samplers_registry import core_sigmas
    from .sweep import DTYPES, agree, grid_name, run_sweep

    model = load_model(config.model, prompt=config.prompt, guidance_scale=config.guidance_scale, device=device,
                       dtype=DTYPES[config.dtype])
    if config.reference is None and model.reference_images is None:
        raise InvalidArgument("reference", f"tune scores by the Frechet distance to the data, and {config.model} has no "
                                           "data of its own: give --reference (a folder of images or an .npz)")
    spec = SAMPLERS[base]
    steps = spec.steps_for_nfe(int(config.nfe[0]))
    sigmas = core_sigmas(spec, steps, model.sigma_min, model.sigma_max)
    groups = distinct_settings(grid, sigmas, getattr(model.denoiser, "round_sigma", None),
                               getattr(model.denoiser, "sigma_max", math.inf))
    config.extra_specs = [with_churn(spec, *setting) for setting in groups]
    if folder is not None and config.grid_images:
        grids = [folder.root / grid_name(s.name, n) for s in config.extra_specs for n in config.nfe]
        agree(gather, lambda: folder.check_replaceable(grids))
    else:
        agree(gather, lambda: None)
    result = run_sweep(config, model=model, folder=folder)
    if not result:
        return {}
    features = {setting: result["features"][(row["sampler"], row["nfe_target"])] for setting, row in zip(groups, result["rows"])}
    std = diff_std = {}
    if bootstrap:
        std, diff_std = bootstrap_fd(features, *result["reference_statistics"], resamples=bootstrap)
    deterministic = result["rows"][0]["fd"]
    rows = []
    for (setting, members), row in zip(groups.items(), result["rows"]):
        rows.append({"s_churn": setting[0], "s_tmin": setting[1], "s_tmax": setting[2], "s_noise": setting[3], **row,
                     "fd_std": std.get(setting, math.nan), "fd_delta": row["fd"] - deterministic,
                     "fd_delta_std": diff_std.get(setting, math.nan) if setting != DETERMINISTIC else math.nan,
                     "same_as": [list(m) for m in members[1:]]})
    ranked = sorted(rows, key=lambda r: (math.isnan(r["fd"]), r["fd"]))
    out = {"grid": ranked, "best": ranked[0], "deterministic_fd": deterministic, "tested": len(grid),
           "run": len(groups), "meta": result["meta"]}
    if config.output is not None:
        from pathlib import Path

        output = Path(config.output)
        write_csv(ranked, output / "tune.csv", ["s_churn", "s_tmin", "s_tmax", "s_noise", "steps", "nfe", "fd", "fd_std",
                                                "fd_delta", "fd_delta_std", "sec_per_sample", "num_samples", "same_as", "sampler"])
        write_json({key: value for key, value in out.items() if key != "meta"} | {"meta": result["meta"]}, output / "tune.json")
        if module_available("matplotlib"):  # else the sweep's note says so
            plot_tune(rows, output / "tune.png")
    return out


def plot_tune(rows: list[dict], path) -> None:
    """FD against S_churn with bootstrap error bars, one line per (S_tmin, S_tmax, S_noise);
    the deterministic FD dashed with its noise band."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    from .report import save_figure

    fig, axis = plt.subplots(figsize=(7.4, 4.8))
    deterministic = next(r for r in rows if r["s_churn"] == 0)
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["s_churn"] > 0:
            groups.setdefault((r["s_tmin"], r["s_tmax"], r["s_noise"]), []).append((r["s_churn"], r["fd"], r["fd_std"]))
    for (tmin, tmax, noise), points in groups.items():
        x, y, err = zip(*sorted(points))
        axis.errorbar(x, y, yerr=[0 if math.isnan(e) else e for e in err], marker="o", markersize=4, capsize=3,
                      label=f"S_tmin={tmin:g} S_tmax={tmax:g} S_noise={noise:g}")
    fd, std = deterministic["fd"], deterministic["fd_std"]
    axis.axhline(fd, color="k", linestyle="--", linewidth=1, label="deterministic (S_churn=0)")
    if math.isfinite(std):
        axis.axhspan(fd - std, fd + std, color="0.7", alpha=0.4, label="deterministic +- 1 bootstrap std")
    axis.set_xlabel("S_churn (settings that repeat another's per-step churn are run once)")
    axis.set_ylabel("Frechet distance (lower is better)")
    axis.set_title(f"churn grid at NFE {rows[0]['nfe']}, {rows[0]['num_samples']} samples")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
