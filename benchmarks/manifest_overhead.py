"""What the run folder's manifest costs on a bench run: writing a sweep's outputs (results.csv,
results.json, the plot, one titled grid per sampler and NFE) inside `open_output_folder` (lock,
temporaries cleaned, every file checked against the manifest, a write-ahead manifest record with
sha256 and fsync before each replace, `commit` at the end) vs the same atomic writes with no run
folder.

Peers, same result, same process, fresh folders, rounds alternating so machine load hits both
alike; reported as median seconds, the ratio manifest / plain, and the extra time as a share of
the sweep that produced the outputs (measured once, in the same run).

    python benchmarks/manifest_overhead.py                      # the default samplers and NFEs, 64 samples
    python benchmarks/manifest_overhead.py --num-samples 256 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixture")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from edm_sampling.evaluation.models import load_model
    from edm_sampling.evaluation.sweep import SweepConfig, open_output_folder, run_sweep, sweep_outputs, write_outputs

    config = SweepConfig(model=args.model, num_samples=args.num_samples, batch_size=args.num_samples, progress=False,
                         quiet=True)
    model = load_model(args.model)
    start = time.perf_counter()
    result = run_sweep(config, model=model)
    sweep_seconds = time.perf_counter() - start
    specs, nfes = config.validate(), sorted(config.nfe)
    files = len(sweep_outputs(config, specs, nfes))

    def plain(folder: Path) -> None:
        write_outputs(replace(config, output=str(folder)), result, model)

    def recorded(folder: Path) -> None:
        out = replace(config, output=str(folder))
        run = open_output_folder(out, sweep_outputs(out, specs, nfes))
        try:
            write_outputs(out, result, model)
            run.commit()
        finally:
            run.__exit__(None, None, None)

    times: dict[str, list[float]] = {"plain": [], "manifest": []}
    with tempfile.TemporaryDirectory(prefix="edm-manifest-") as tmp:
        for round_ in range(args.rounds):
            for name, write in (("plain", plain), ("manifest", recorded))[:: 1 if round_ % 2 == 0 else -1]:
                folder = Path(tmp) / f"{name}-{round_}"
                start = time.perf_counter()
                write(folder)
                times[name].append(time.perf_counter() - start)
    plain_s, manifest_s = statistics.median(times["plain"]), statistics.median(times["manifest"])
    print(f"bench on {args.model}: {len(result['rows'])} sampler x NFE runs, {args.num_samples} samples, "
          f"{files} output files; the sweep took {sweep_seconds:.1f} s")
    print(f"writing the outputs, median of {args.rounds}: plain atomic writes {plain_s:.3f} s, "
          f"inside a run folder with its manifest {manifest_s:.3f} s")
    print(f"ratio manifest / plain: {manifest_s / plain_s:.2f}x; extra {manifest_s - plain_s:.3f} s = "
          f"{100 * (manifest_s - plain_s) / sweep_seconds:.2f}% of the sweep")


if __name__ == "__main__":
    main()
