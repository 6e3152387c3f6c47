"""`edm-sampling bench` and `edm-sampling tune`: argument parsing only (heavy imports happen
when a command runs, so `edm-sampling --help` stays fast)."""

from __future__ import annotations

import argparse
import sys
import time

BENCH_DESCRIPTION = """\
Sweep samplers and step counts on a model and report quality, model calls (NFE) and time.

Without --model it runs on the built-in exact model "mixture": the ideal denoiser of a
6-component Gaussian mixture of 3x16x16 images, whose ODE is solved to ~1e-7 from the same
noise (no download, CPU). `--model gaussian` is a 64-d Gaussian with a closed-form ODE
solution; `--model digits` the ideal denoiser of scikit-learn's 8x8 digits. It compares our
EDM samplers (run as plain functions, and as EDMScheduler in a diffusers loop) with
diffusers' DDIM, Euler, Heun, DPM-Solver++ 2M / 3M, UniPC and DEIS at equal NFE. By
default it runs the first screen: the paper's Heun, our recommended EDMScheduler configurations
(iPNDM and UniPC order 3, each with and without the analytical first step, and
adams_alpha_adaptive) and diffusers' seven anchors; `--samplers paper | core | scheduler |
diffusers | all` (or names) shows the others
(DPM-Solver++ 3M through EDMScheduler is in the group "scheduler").

Quality, lower is better everywhere: the per-sample RMSE to the ODE solution from the same
noise; the share of samples that end in another mode (mixture component, training image)
than that solution; and the Frechet distance to the data (FID with --inception weights, else
FD on pooled pixels), beside the FD of as many true data draws. Prints one table per
metric with the best sampler per NFE marked and the ratio best edm_sampling / best diffusers;
writes results.csv, results.json, quality_vs_nfe.png and titled sample grids into
--output-dir (never overwritten without --overwrite). Under `accelerate launch` the seeds are
split across processes."""

TUNE_DESCRIPTION = """\
Two searches on a model, each scored on the model itself.

Churn (the default): grid search of the stochastic sampler's S_churn, S_tmin, S_tmax and
S_noise at one NFE (the procedure behind the paper's Figure 4 / Table 5), scored by the Frechet
distance to the data. Settings that give the same per-step churn on the NFE's grid (gamma is
capped at sqrt(2) - 1, and S_tmin / S_tmax act only through the grid levels they include) are
run once. Reports the best setting with the FD's noise (a bootstrap std over the samples, and of
the difference to the deterministic sampler on the same seeds), and writes the full grid
(tune.csv, tune.json, tune.png).

--schedule: a step schedule (sampling grid) per NFE for one solver, GITS-style (Chen et al.
2024): a teacher solves the ODE to ~1e-6 on --num-samples search seeds through a fine grid of
candidate noise levels; dynamic programming picks the path of exactly N steps with the least
summed one-step error (weighted by GITS's coefficient, chosen by the solver's own error); a
pattern search then moves the levels of that grid, and of the solver's default grid, while the
solver's mean error to the teacher falls. The better grid per NFE goes into one schedule file
(JSON, with the search's settings and the error of the searched and the default grid on
held-out seeds). Load it with EDMScheduler(solver=..., schedule_file=FILE); compare it with
`edm-sampling bench --schedule-file FILE`."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from error
    if not values:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from error
    if not values:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    names = [v for v in text.replace(",", " ").split() if v]
    if not names:
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return names


def _add_model_arguments(parser: argparse.ArgumentParser, num_samples: int | None, batch_size: int,
                         samples_help: str | None = None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="mixture",
                       help="'mixture' (default), 'gaussian' or 'digits' (built-in exact models), or a local diffusers folder "
                            "(DDPM/DDIM UNet + scheduler, NCSN++ VE, an EDM model trained with this package, Stable Diffusion "
                            "1.x / 2.x; not SDXL or transformer pipelines such as SD3 and Flux)")
    group.add_argument("--prompt", default=None, help="text prompt for a Stable Diffusion folder")
    group.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance for --prompt (default 7.5)")
    group.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    group = parser.add_argument_group("metrics")
    group.add_argument("--num-samples", type=int, default=num_samples,
                       help=samples_help or f"samples per sampler and NFE (default {num_samples})")
    group.add_argument("--batch-size", type=int, default=batch_size,
                       help=f"seeds per batch (default {batch_size}); the progress bar moves per batch, batches are split across processes")
    group.add_argument("--seed", type=int, default=0, help="first seed; sample i uses seed + i")
    group.add_argument("--inception", default=None, metavar="PATH",
                       help="local Inception-v3 FID weights (a state dict, .pth or .safetensors): report FID; "
                            "without it, FD on pooled pixels")
    group.add_argument("--reference", default=None, metavar="PATH",
                       help="data for the Frechet distance: an .npz with mu and sigma, or a folder of images "
                            "(default: the built-in model's data; none for --model folders)")
    group.add_argument("--stats-cache", default=None, metavar="DIR",
                       help="where reference statistics are cached (default ~/.cache/edm_sampling/fd_stats)")
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", "--output", dest="output", default=None, metavar="DIR",
                       help="output folder (default bench_results/<model>); --output is an alias")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the results in an existing output folder (only files edm_sampling wrote; yours are kept)")
    group.add_argument("--grid-images", type=int, default=None,
                       help=f"images per sample grid (default {GRID_IMAGES}; 0: no grids)")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def register(subparsers) -> None:
    """Add the `bench` and `tune` subcommands."""
    from .samplers_registry import DEFAULT_NFE, SAMPLER_GROUPS, SAMPLERS, ours_names

    bench = subparsers.add_parser("bench", help="sweep samplers x NFE on a model: quality, NFE, time",
                                  description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--samplers", type=_str_list, default=None,
                       help="comma-separated sampler names and groups (default: the group 'default': "
                            f"{', '.join(SAMPLER_GROUPS['default'])}); groups: "
                            + "; ".join(f"{g} ({len(n)} samplers)" for g, n in SAMPLER_GROUPS.items())
                            + "; names: " + ", ".join(SAMPLERS))
    bench.add_argument("--nfe", type=_int_list, default=None,
                       help=f"target model calls, comma-separated (default {','.join(map(str, DEFAULT_NFE))}; "
                            "with --schedule-file: the NFEs its grids serve)")
    bench.add_argument("--schedule-file", default=None, metavar="FILE",
                       help="a schedule file of `edm-sampling tune --schedule`: adds rows for its grids (through "
                            "EDMScheduler(schedule_file=FILE)) and for its solver on its default grid")
    bench.add_argument("--reference-steps", type=int, default=256,
                       help="Heun steps of the reference ODE solution of a --model folder (the built-in models have an "
                            "exact one); 0: skip the ODE error (default 256)")
    _add_model_arguments(bench, num_samples=256, batch_size=256)
    bench.set_defaults(func=bench_main)

    tune = subparsers.add_parser("tune", help="churn grid search at one NFE, or (--schedule) a step schedule searched per NFE",
                                 description=TUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    tune.add_argument("--nfe", type=_int_list, default=None,
                      help=f"model calls per sample: one NFE for the churn search (default {CHURN_NFE}: 18 Heun steps), "
                           f"a comma-separated list with --schedule (default {','.join(map(str, SCHEDULE_NFE))})")
    group = tune.add_argument_group("churn search (the default)")
    for flag, default, text in CHURN_FLAGS:
        group.add_argument(flag, type=_float_list, default=None, help=f"{text} (default {','.join(f'{v:g}' for v in default)})")
    group.add_argument("--sampler", default=None, choices=ours_names(), help="the base sampler whose churn is tuned (default edm-heun)")
    group.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples for the FD's noise (default 200; 0: none)")
    group = tune.add_argument_group("step schedule search (--schedule)")
    group.add_argument("--schedule", action="store_true",
                       help="search a step schedule (see above) instead of churn; writes a schedule file")
    group.add_argument("--solver", default=None,
                       help="the solver the schedule is for: heun, euler, ipndm, ipndm_v, dpmpp_2m, dpmpp_3m, unipc, deis, adams_alpha, "
                            "adams_alpha_adaptive "
                            "(default ipndm)")
    group.add_argument("--afs", action="store_true", help="the solver takes the analytical first step")
    group.add_argument("--candidates", type=int, default=None, help="candidate noise levels of the search (default 100)")
    group.add_argument("--coeff", type=_float_list, default=None,
                       help="GITS cost adjustments tried (default 0.8,0.85,...,1.2)")
    group.add_argument("--holdout-samples", type=int, default=None,
                       help="held-out seeds the grids are compared on, from --seed on (the seeds bench samples); the "
                            "--num-samples search seeds follow them (default 256)")
    group.add_argument("--max-evals", type=int, default=None, help="solver runs of the pattern search per NFE (default 200)")
    group.add_argument("--no-refine", action="store_true", help="GITS's dynamic-programming grid only, no pattern search")
    _add_model_arguments(tune, num_samples=None, batch_size=128,
                         samples_help=f"samples per churn setting (default {CHURN_SAMPLES}); with --schedule: the search "
                                      f"seeds (default {SCHEDULE_SAMPLES})")
    tune.set_defaults(func=tune_main)


GRID_IMAGES = 64
SCHEDULE_NFE = (5, 9, 17)
SCHEDULE_SAMPLES = 256
CHURN_NFE = 35
CHURN_SAMPLES = 512
CHURN_FLAGS = (("--s-churn", (0, 10, 30, 80), "S_churn values"), ("--s-tmin", (0.01, 0.05), "S_tmin values"),
               ("--s-tmax", (1, 50), "S_tmax values"), ("--s-noise", (1.0, 1.007), "S_noise values"))
SCHEDULE_ONLY = ("solver", "candidates", "coeff", "holdout_samples", "max_evals", "afs", "no_refine")
CHURN_ONLY = ("s_churn", "s_tmin", "s_tmax", "s_noise", "sampler", "bootstrap")


def _given(args, names: tuple[str, ...]) -> list[str]:
    """The flags among `names` the user gave (their default is None or False)."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False)]


def _config_from_args(args, **overrides):
    from pathlib import Path

    from .sweep import SweepConfig

    model_name = Path(str(args.model)).name or "model"
    output = args.output or str(Path("bench_results") / (model_name + ("_tune" if overrides.get("tune") else "")))
    overrides.pop("tune", None)
    return SweepConfig(
        model=args.model, num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
        inception=args.inception, reference=args.reference, stats_cache=args.stats_cache, output=output,
        overwrite=args.overwrite, prompt=args.prompt, guidance_scale=args.guidance_scale, dtype=args.dtype,
        grid_images=GRID_IMAGES if args.grid_images is None else args.grid_images, progress=not args.no_progress,
        **overrides,
    )


def _since_start(args) -> float:
    """Seconds since the command started (imports included; from now when called without `edm_sampling.cli`)."""
    return time.perf_counter() - getattr(args, "started", time.perf_counter())


def bench_main(args) -> int:
    """Run `edm-sampling bench` and print the tables and the wall time."""
    from .report import format_report
    from .samplers_registry import DEFAULT_NFE
    from .sweep import run_sweep

    nfe = args.nfe
    if nfe is None and args.schedule_file is not None:
        from .schedule_search import schedule_file_nfes

        nfe = schedule_file_nfes(args.schedule_file)[2]
    config = _config_from_args(args, samplers=args.samplers, nfe=list(nfe or DEFAULT_NFE), reference_steps=args.reference_steps,
                               schedule_file=args.schedule_file)
    result = run_sweep(config)
    if not result:
        return 0
    print()
    print(format_report(result))
    print(f"outputs: {config.output} (results.csv has every metric per sampler and NFE)")
    print(f"wall time: {_since_start(args):.1f} s since the command started ({result['meta']['num_processes']} process(es))")
    return 0


def _setting_group(members: list[list[float]]) -> str:
    """'S_churn=10,30 S_tmin=0.01 ...: 2 settings' when the members are every combination of
    their values, else the members one by one."""
    names = ("S_churn", "S_tmin", "S_tmax", "S_noise")
    values = [sorted({m[i] for m in members}) for i in range(4)]
    if len(members) == len(values[0]) * len(values[1]) * len(values[2]) * len(values[3]):
        return " ".join(f"{n}={','.join(f'{v:g}' for v in vs)}" for n, vs in zip(names, values)) + f": {len(members)} settings"
    return " = ".join("(" + " ".join(f"{n}={v:g}" for n, v in zip(names, m)) + ")" for m in members)


def tune_main(args) -> int:
    """Run `edm-sampling tune`: the churn search (print the grid, the best churn setting and
    whether its win is larger than the metric's noise), or with --schedule the step schedule
    search."""
    if args.schedule:
        return schedule_main(args)
    wrong = _given(args, SCHEDULE_ONLY)
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: for the step schedule search only (tune --schedule)")
    nfe = args.nfe or [CHURN_NFE]
    if len(nfe) != 1:
        raise ValueError(f"--nfe: the churn search runs at one NFE, got {nfe} (several NFEs: tune --schedule)")
    from ..safety import InvalidArgument
    from .tune import run_tune, win_verdict

    churn = {flag[2:].replace("-", "_"): list(default) for flag, default, _ in CHURN_FLAGS}
    churn.update({k: v for k, v in vars(args).items() if k in churn and v is not None})
    args.num_samples = CHURN_SAMPLES if args.num_samples is None else args.num_samples
    config = _config_from_args(args, nfe=nfe, samplers=[], tune=True)
    try:
        result = run_tune(config, base=args.sampler or "edm-heun", bootstrap=200 if args.bootstrap is None else args.bootstrap,
                          **churn)
    except InvalidArgument as error:  # run_tune's `base` is the flag --sampler
        raise error.renamed("sampler") if error.name == "base" else error
    if not result:
        return 0
    from .report import format_table

    columns = ("s_churn", "s_tmin", "s_tmax", "s_noise", "steps", "nfe", "fd", "fd_std", "fd_delta", "fd_delta_std", "sec_per_sample")
    print()
    print("fd: Frechet distance to the data (lower is better); fd_std: its bootstrap std; fd_delta: fd minus the "
          "deterministic sampler's, fd_delta_std: the std of that difference (same seeds)")
    print(format_table(result["grid"], columns))
    print()
    grouped = [row for row in result["grid"] if row["same_as"]]
    print(f"{result['tested']} settings, {result['run']} distinct on this grid (gamma = min(S_churn/N, sqrt(2)-1) on the "
          f"levels in [S_tmin, S_tmax])" + ("; each group below ran once:" if grouped else ""))
    for row in grouped:
        print(f"  {_setting_group([[row['s_churn'], row['s_tmin'], row['s_tmax'], row['s_noise']]] + row['same_as'])}")
    best = result["best"]
    print()
    print(f"best at NFE {best['nfe']}: S_churn={best['s_churn']:g} S_tmin={best['s_tmin']:g} S_tmax={best['s_tmax']:g} "
          f"S_noise={best['s_noise']:g}  FD {best['fd']:.4g} +- {best['fd_std']:.2g} "
          f"(deterministic: {result['deterministic_fd']:.4g})")
    churned = [r for r in result["grid"] if r["s_churn"] > 0 and r["fd_delta_std"] == r["fd_delta_std"]]
    if best["s_churn"] > 0 and churned:
        print(win_verdict(-best["fd_delta"], best["fd_delta_std"], len(churned)))
    elif churned:
        nearest = churned[0]
        print(f"no churn setting beats the deterministic sampler; the best one is worse by {nearest['fd_delta']:.3g} "
              f"= {nearest['fd_delta'] / max(nearest['fd_delta_std'], 1e-12):.1f} std of the paired difference")
    print(f"outputs: {config.output}")
    print(f"wall time: {_since_start(args):.1f} s since the command started")
    return 0


def schedule_main(args) -> int:
    """Run `edm-sampling tune --schedule`: search, print the comparison and write the schedule file."""
    wrong = _given(args, CHURN_ONLY)
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: for the churn search only (tune without --schedule)")
    from pathlib import Path

    from .schedule_search import SearchSettings, format_search_report, run_schedule_search

    solver = args.solver or "ipndm"
    given = {"candidates": args.candidates, "coeffs": tuple(args.coeff) if args.coeff else None,
             "holdout_samples": args.holdout_samples, "max_evals": args.max_evals}
    settings = SearchSettings(search_samples=SCHEDULE_SAMPLES if args.num_samples is None else args.num_samples, seed=args.seed, batch_size=args.batch_size,
                              refine=not args.no_refine, **{k: v for k, v in given.items() if v is not None})
    output = args.output or str(Path("bench_results") / f"{Path(str(args.model)).name or 'model'}_schedule_{solver}")
    for flag, value in (("--inception", args.inception), ("--reference", args.reference), ("--stats-cache", args.stats_cache)):
        if value is not None:
            print(f"note: {flag} does nothing with --schedule: grids are scored by their error to the ODE solution",
                  file=sys.stderr)
    if args.grid_images is not None:
        print("note: --grid-images does nothing with --schedule: the search writes a schedule file, no samples",
              file=sys.stderr)
    result = run_schedule_search(args.model, solver, args.afs, args.nfe or list(SCHEDULE_NFE), settings, output,
                                 overwrite=args.overwrite, prompt=args.prompt, guidance_scale=args.guidance_scale,
                                 dtype=args.dtype, progress=not args.no_progress)
    print()
    print(format_search_report(result))
    print(f"wall time: {_since_start(args):.1f} s since the command started")
    return 0
