"""The `edm-sampling` command: `bench` (the main job), `tune` and `train`.

Each subcommand lives beside the code it drives and registers itself through a
`register(subparsers)` function; this module only dispatches, so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

_loaded_at: float | None = time.perf_counter()
"""When this module was loaded: the start of the process's first command, which `main` hands
to the subcommand as `args.started` so that its wall time includes the imports."""

EXAMPLES = """\
examples:
  edm-sampling bench                          low-NFE sampler benchmark on the built-in exact mixture
                                              (no download; about 17 s on 2 CPU cores)
  edm-sampling bench --model digits           ... on the ideal denoiser of the 8x8 digits
  edm-sampling bench --model PATH --nfe 9,17,35   ... on a local diffusers folder
  edm-sampling tune --nfe 35                  churn grid search (S_churn, S_tmin, S_tmax, S_noise)
  edm-sampling tune --schedule --solver ipndm --nfe 5,9,17
                                              a step schedule searched per NFE (GITS-style), as a file
                                              for EDMScheduler(schedule_file=...) and bench --schedule-file
  edm-sampling train                          EDM training on the built-in digits (CPU)
"""

_SUBCOMMAND_MODULES = (
    "edm_sampling.evaluation.command",
    "edm_sampling.training.command",
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    import importlib

    parser = argparse.ArgumentParser(prog="edm-sampling", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns the process exit code."""
    global _loaded_at
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started, _loaded_at = _loaded_at or time.perf_counter(), None
    try:
        result = args.func(args)
    except ValueError as error:
        parser.exit(2, f"edm-sampling {args.command}: error: {error}\n")
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
