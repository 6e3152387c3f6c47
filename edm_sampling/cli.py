"""The `edm-sampling` command: `bench` (the main job), `tune` and `train`.

Each subcommand lives beside the code it drives and registers itself through a
`register(subparsers)` function; this module only dispatches, so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import NoReturn, Sequence

from .safety import InvalidArgument, NonFiniteOutputError, Stopped

_loaded_at: float | None = time.perf_counter()
"""When this module was loaded: the start of the process's first command, which `main` hands
to the subcommand as `args.started` so that its wall time includes the imports."""

EXAMPLES = """\
examples:
  edm-sampling bench                          low-NFE sampler benchmark on the built-in exact mixture
                                              (no download; about 20 s on 2 CPU cores)
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


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage of `train` alone is 20 lines)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    import importlib

    parser = _Parser(prog="edm-sampling", description=__doc__.splitlines()[0], epilog=EXAMPLES,
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


def subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (`train`, `bench`, `tune`)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def flag_as_typed(parser: argparse.ArgumentParser, name: str, argv: Sequence[str]) -> str:
    """The flag of parameter ``name`` (an argparse dest) as the user typed it in ``argv`` (an alias
    or an abbreviation), else its first spelling; ``name`` itself if no flag sets it."""
    for action in parser._actions:
        if action.dest == name and action.option_strings:
            typed = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
            for token in typed:
                if any(option.startswith(token) for option in action.option_strings):
                    return token
            return action.option_strings[0]
    return name


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns the process exit code.

    Errors a user can act on end the command with one line and no traceback: bad input
    (ValueError, named by the flag as typed), failed reads or writes (OSError, among them
    `WriteFailedError`: disk full) and a missing optional dependency (ImportError) with exit
    code 2, non-finite model outputs with 1, SIGINT / SIGTERM with 130 / 143 (the trainer first
    finishes its step and saves a checkpoint; files are written atomically, so none is left
    half-written)."""
    global _loaded_at
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started, _loaded_at = _loaded_at or time.perf_counter(), None
    args.argv = argv
    command = subcommand_parser(parser, args.command)
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        result = args.func(args)
    except InvalidArgument as error:
        command.exit(2, f"{command.prog}: error: {_one_line(error.renamed(flag_as_typed(command, error.name, argv)))}\n")
    except (ValueError, OSError) as error:
        command.exit(2, f"{command.prog}: error: {_one_line(error)}\n")
    except ImportError as error:  # an optional dependency (the extras of pyproject.toml)
        hint = "" if "pip install" in str(error) else " (an optional dependency: pip install 'edm_sampling[all]')"
        command.exit(2, f"{command.prog}: error: {_one_line(error)}{hint}\n")
    except NonFiniteOutputError as error:
        command.exit(1, f"{command.prog}: error: {_one_line(error)}\n")
    except (KeyboardInterrupt, Stopped) as stop:
        signum = stop.signum if isinstance(stop, Stopped) else signal.SIGINT
        command.exit(128 + signum, f"\n{command.prog}: stopped by {signal.Signals(signum).name}; every file written so far "
                                   "is complete (writes are atomic)\n")
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
        _close_process_group()
    return int(result or 0)


def _close_process_group() -> None:
    """Tear down the torch.distributed group a multi-process run (torchrun / accelerate launch)
    formed, before the interpreter exits: a gloo group left to process exit can abort it
    ("terminate called without an active exception") after the results are written."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def _one_line(error: BaseException) -> str:
    """The error's text on one line (an OSError without a message: its class name)."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
