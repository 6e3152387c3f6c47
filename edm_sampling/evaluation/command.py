"""`edm-sampling bench` and `edm-sampling tune`: argument parsing only (heavy imports happen
when a command runs, so `edm-sampling --help` stays fast)."""

from __future__ import annotations

import argparse
import time

BENCH_DESCRIPTION = """\
Sweep samplers and step counts on a model and report quality, model calls (NFE) and time.

Without --model it runs on the built-in exact model "gaussian" (the ideal denoiser of a 64-d
anisotropic Gaussian, whose ODE has a closed-form solution; no download, CPU, under a
minute); `--model digits` uses the ideal denoiser of scikit-learn's 8x8 digits. It compares our EDM samplers with diffusers'
DDIM, DPM-Solver++ 2M, Euler, Heun and UniPC at equal NFE. Quality is the per-sample RMSE to a
high-accuracy solution of the same ODE from the same noise, and the Frechet distance to the
data (FID with --inception weights, else FD on pooled pixels). Writes a table, results.csv,
results.json, quality_vs_nfe.png and sample grids into --output (never overwritten without
--overwrite). Under `accelerate launch` the seeds are split across processes."""

TUNE_DESCRIPTION = """\
Grid search of the stochastic sampler's S_churn, S_tmin, S_tmax and S_noise at one NFE
(the procedure behind the paper's Figure 4 / Table 5), scored by the Frechet distance to
the data. Reports the best setting and writes the full grid (tune.csv, tune.json, tune.png)."""


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from error


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from error


def _str_list(text: str) -> list[str]:
    return [v for v in text.replace(",", " ").split() if v]


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="gaussian",
                       help="'gaussian' (default) or 'digits' (built-in exact models), or a local diffusers folder "
                            "(DDPM/DDIM UNet + scheduler, NCSN++ VE, an EDM model trained with this package, Stable Diffusion)")
    group.add_argument("--prompt", default=None, help="text prompt for a Stable Diffusion folder")
    group.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance for --prompt (default 7.5)")
    group.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    group = parser.add_argument_group("metrics")
    group.add_argument("--num-samples", type=int, default=256, help="samples per sampler and NFE (default 256)")
    group.add_argument("--batch-size", type=int, default=256, help="seeds per batch; batches are split across processes")
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
    group.add_argument("--output", default=None, metavar="DIR", help="output folder (default bench_results/<model>)")
    group.add_argument("--overwrite", action="store_true", help="replace the results in an existing output folder")
    group.add_argument("--grid-images", type=int, default=64, help="images per sample grid (0: no grids)")
    group.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def register(subparsers) -> None:
    """Add the `bench` and `tune` subcommands."""
    from .samplers_registry import DEFAULT_NFE, SAMPLERS

    bench = subparsers.add_parser("bench", help="sweep samplers x NFE on a model: quality, NFE, time",
                                  description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--samplers", type=_str_list, default=None,
                       help="comma-separated sampler names (default: all): " + ", ".join(SAMPLERS))
    bench.add_argument("--nfe", type=_int_list, default=list(DEFAULT_NFE),
                       help=f"target model calls, comma-separated (default {','.join(map(str, DEFAULT_NFE))})")
    bench.add_argument("--reference-steps", type=int, default=256,
                       help="Heun steps of the reference ODE solution (0: skip the ODE error; default 256)")
    _add_model_arguments(bench)
    bench.set_defaults(func=bench_main)

    tune = subparsers.add_parser("tune", help="grid search of S_churn, S_tmin, S_tmax, S_noise at one NFE",
                                 description=TUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    tune.add_argument("--nfe", type=int, default=35, help="model calls per sample (default 35: 18 Heun steps)")
    tune.add_argument("--sampler", default="edm-heun", choices=[n for n, s in SAMPLERS.items() if s.family == "edm_sampling"],
                      help="the base sampler whose churn is tuned (default edm-heun)")
    tune.add_argument("--s-churn", type=_float_list, default=[0, 10, 30, 80], help="S_churn values (default 0,10,30,80)")
    tune.add_argument("--s-tmin", type=_float_list, default=[0.01, 0.05], help="S_tmin values (default 0.01,0.05)")
    tune.add_argument("--s-tmax", type=_float_list, default=[1, 50], help="S_tmax values (default 1,50)")
    tune.add_argument("--s-noise", type=_float_list, default=[1.0, 1.007], help="S_noise values (default 1,1.007)")
    _add_model_arguments(tune)
    tune.set_defaults(func=tune_main, num_samples=512, batch_size=512)


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
        grid_images=args.grid_images, progress=not args.no_progress, **overrides,
    )


def bench_main(args) -> int:
    """Run `edm-sampling bench` and print the table and the wall time."""
    start = time.perf_counter()
    from .report import format_table, pivot_table
    from .sweep import run_sweep

    config = _config_from_args(args, samplers=args.samplers, nfe=args.nfe, reference_steps=args.reference_steps)
    result = run_sweep(config)
    if not result:
        return 0
    rows, meta = result["rows"], result["meta"]
    print()
    print(format_table(rows))
    print()
    print(pivot_table(rows, "error_median"))
    print()
    print(pivot_table(rows, "fd"))
    print()
    print(f"model: {meta['model']} ({meta['model_info'].get('model', '')})")
    print(f"error: per-sample RMSE to the ODE solution from the same noise ({meta['ode_reference']}); "
          f"Frechet distance: {meta['features']}")
    if meta.get("ode_reference_check"):
        check = meta["ode_reference_check"]
        print(f"reference accuracy: {check['steps']} vs {check['steps'] // 2} Heun steps differ by "
              f"{check['half_steps_rmse_max']:.2e} RMSE at most (its own error ~{check['estimated_error']:.1e})")
    if meta.get("fd_floor"):
        print(f"FD of {meta['fd_floor']['num_samples']} true data samples (the floor at this sample count): "
              f"{meta['fd_floor']['fd']:.4g}")
    print(f"outputs: {config.output}")
    print(f"wall time: {time.perf_counter() - start:.1f} s ({meta['num_processes']} process(es))")
    return 0


def tune_main(args) -> int:
    """Run `edm-sampling tune`: print the best churn setting and the grid."""
    start = time.perf_counter()
    from .tune import run_tune

    config = _config_from_args(args, nfe=[args.nfe], reference_steps=0, samplers=[], tune=True)
    result = run_tune(config, base=args.sampler, s_churn=args.s_churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax,
                      s_noise=args.s_noise)
    if not result:
        return 0
    from .report import format_table

    columns = ("s_churn", "s_tmin", "s_tmax", "s_noise", "steps", "nfe", "fd", "sec_per_sample")
    print()
    print(format_table(result["grid"], columns))
    best = result["best"]
    print()
    print(f"best at NFE {best['nfe']}: S_churn={best['s_churn']:g} S_tmin={best['s_tmin']:g} S_tmax={best['s_tmax']:g} "
          f"S_noise={best['s_noise']:g}  FD {best['fd']:.4g} (deterministic: {result['deterministic_fd']:.4g})")
    print(f"outputs: {config.output}")
    print(f"wall time: {time.perf_counter() - start:.1f} s")
    return 0
