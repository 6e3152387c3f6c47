"""Stopping a long job cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler, ``kill``).

    with GracefulStop() as stop:
        while step < steps:
            train_step()
            if stop.requested:
                break
    if stop.requested:
        save_checkpoint(...)
        stop.exit(f"checkpoint written at step {step}", resume_command(argv))

The first signal only sets a flag, which the loop reads between steps, so a step is never
cut in half; the job then writes its checkpoint and `exit` prints how to resume and ends
with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a job
killed by that signal. A second signal of the same kind stops at once (the default action);
atomic writes keep every file whole even then.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from typing import NoReturn, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(BaseException):
    """SIGTERM outside a `GracefulStop` block, raised where the job is (as SIGINT raises
    KeyboardInterrupt), so that locks are released and temporaries removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = int(signum)


class GracefulStop:
    """Within the block, SIGINT / SIGTERM ask the loop to stop instead of interrupting it.

    Outside the main thread (where Python cannot set handlers) it does nothing.
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + int(self.signum) if self.signum is not None else 0

    def _handle(self, signum: int, frame) -> None:
        if self.signum == signum:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        name = signal.Signals(signum).name
        os.write(2, f"\n{name} received: stopping after the current step ({name} again stops at once)\n".encode())

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def exit(self, saved: str, resume: str | None = None) -> NoReturn:
        """Print what was saved and how to resume, then exit with `exit_code`."""
        lines = [f"stopped by {self.name}: {saved}"]
        if resume:
            lines.append(f"resume with: {resume}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        raise SystemExit(self.exit_code)


def resume_command(argv: Sequence[str], prog: str = "edm-sampling") -> str:
    """The command line that continues the run ``argv`` started: ``--overwrite`` becomes
    ``--resume`` (added if absent); everything else stays as the user typed it."""
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([*shlex.split(prog), *args])
