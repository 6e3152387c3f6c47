"""Small jobs that tests/test_faults.py runs in their own processes, to be killed, signalled
or raced: ``python tests/fault_jobs.py JOB FOLDER [ARGS...]``. Each prints a line when it
reaches the point where the test acts, and flushes it."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def say(text: str) -> None:
    print(text, flush=True)


def hold(folder: str, command: str) -> None:
    """Hold the run folder (having written a file in it) until stdin closes or a kill."""
    from edm_sampling.safety import RunFolder, atomic_write_text

    with RunFolder(folder, command):
        atomic_write_text(Path(folder) / "written-by-holder.txt", "holder\n")
        say("held")
        sys.stdin.read()


def churn(folder: str, log: str, rounds: str) -> None:
    """Take and give back the folder's lock ``rounds`` times, logging enter / leave with
    O_APPEND: the test checks no two holders ever overlap."""
    from edm_sampling.safety import FolderLock, FolderLockedError

    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    done = 0
    while done < int(rounds):
        try:
            lock = FolderLock(folder, "churn").acquire()
        except FolderLockedError:
            time.sleep(0.0002)
            continue
        os.write(fd, f"enter {os.getpid()}\n".encode())
        time.sleep(0.0005)
        os.write(fd, f"leave {os.getpid()}\n".encode())
        lock.release()
        done += 1
    say("done")


def checkpoint_mid_write(folder: str) -> None:
    """Save step 2 over the step-1 checkpoint, pausing once the temporary file is complete
    and before it replaces anything, so the test can SIGKILL it there."""
    import torch

    import edm_sampling.training.checkpoint as checkpoint
    from edm_sampling.safety import RunFolder

    real = checkpoint._save_file

    def slow(tensors, path, metadata):
        real(tensors, path, metadata)
        say("mid-write")
        time.sleep(60)

    checkpoint._save_file = slow
    with RunFolder(folder, "train --resume", resume=True, outputs=(checkpoint.CHECKPOINT_NAME,)):
        checkpoint.save_checkpoint(Path(folder) / checkpoint.CHECKPOINT_NAME, **toy_state(torch, 2))


def toy_state(torch, step: int, width: int = 64, rng: bool = True) -> dict:
    """A small training state whose values depend on ``step``."""
    model = torch.nn.Linear(width, width)
    torch.nn.init.constant_(model.weight, float(step))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, width)).sum().backward()
    opt.step()
    return dict(model=model.state_dict(), ema=model.state_dict(), optimizer=opt.state_dict(),
                rng={"torch_cpu": torch.get_rng_state()} if rng else {}, state={"step": step})


def folder_swap(folder: str) -> None:
    """Replace FOLDER/pipeline by a new version, pausing between the two renames of the swap."""
    import edm_sampling.safety.atomic as atomic
    from edm_sampling.safety import RunFolder, atomic_write

    real = os.replace

    def pausing(src, dst):
        real(src, dst)
        if str(dst).endswith(".edm-old"):
            say("between")
            time.sleep(60)

    def writer(tmp: Path) -> None:
        (tmp / "model.txt").write_text("new model\n")

    with RunFolder(folder, "folder-swap", outputs=("pipeline/",)):
        atomic.os.replace = pausing
        atomic_write(Path(folder) / "pipeline", writer, folder=True)


def pause_after_replace(folder: str) -> None:
    """Rewrite FOLDER/results.json under a RunFolder, pausing right after the file is replaced
    and before the manifest learns it (the test SIGKILLs it there)."""
    from edm_sampling.safety import RunFolder, atomic_write_text

    def pause(self, path):
        say("replaced")
        time.sleep(60)

    RunFolder.after_replace = pause
    with RunFolder(folder, "rewrite", outputs=("results.json",)):
        atomic_write_text(Path(folder) / "results.json", '{"new": true}')


def double_signal(name: str) -> None:
    """Signal itself twice under GracefulStop: the first only sets the flag, the second kills."""
    import signal

    from edm_sampling.safety import GracefulStop

    signum = signal.Signals[name]
    with GracefulStop() as stop:
        os.kill(os.getpid(), signum)
        time.sleep(0.2)
        say(f"first: requested={stop.requested}")
        os.kill(os.getpid(), signum)
        time.sleep(5)
        say("still running")


def big_checkpoint_over_file_size_limit(folder: str, limit: str) -> None:
    """Save a checkpoint larger than RLIMIT_FSIZE: the kernel refuses the write (EFBIG)."""
    import resource
    import signal

    import torch

    from edm_sampling.safety import WriteFailedError
    from edm_sampling.training.checkpoint import save_checkpoint

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    big = torch.nn.Linear(1024, 1024)
    try:
        save_checkpoint(Path(folder) / "checkpoint.safetensors", model=big.state_dict(), ema=big.state_dict(),
                        optimizer={"state": {}, "param_groups": []}, rng={}, state={"step": 2})
    except WriteFailedError as error:
        say(json.dumps({"errno": error.errno, "message": str(error)}))


def stoppable_loop(folder: str, *argv: str) -> None:
    """A fake training loop under GracefulStop: each step sets ``a``, works, then sets ``b``;
    on a stop request it writes {"a", "b"} as its checkpoint and exits as the trainer will."""
    from edm_sampling.safety import GracefulStop, RunFolder, atomic_write_text, resume_command

    state = {"a": 0, "b": 0}
    with RunFolder(folder, "stoppable-loop"), GracefulStop() as stop:
        for step in range(1, 100_000):
            state["a"] = step
            time.sleep(0.02)
            state["b"] = step
            say(f"step {step}")
            if stop.requested:
                atomic_write_text(Path(folder) / "checkpoint.json", json.dumps(state))
                stop.exit(f"checkpoint written at step {step}", resume_command(argv))


def train_saying_steps(*argv: str) -> None:
    """`edm-sampling train ARGV`, saying "logged N" each time the trainer records step N for its
    log (written, or held until its first checkpoint), so the test can kill it past a step."""
    from edm_sampling.cli import main
    from edm_sampling.training.trainer import Trainer

    real = Trainer._write_log

    def write_log(self, record, start_step):
        real(self, record, start_step)
        say(f"logged {record['step']}")

    Trainer._write_log = write_log
    sys.exit(main(["train", *argv]))


if __name__ == "__main__":
    jobs = {"hold": hold, "churn": churn, "checkpoint-mid-write": checkpoint_mid_write, "folder-swap": folder_swap,
            "efbig": big_checkpoint_over_file_size_limit, "loop": stoppable_loop,
            "pause-after-replace": pause_after_replace, "double-signal": double_signal,
            "train-saying-steps": train_saying_steps}
    jobs[sys.argv[1]](*sys.argv[2:])
