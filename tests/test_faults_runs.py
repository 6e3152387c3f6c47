"""Faults through the commands a user runs: `edm-sampling train`, `bench`, `tune`, EDMPipeline and
samplers.sample. Kills and signals hit real `train` processes (tiny runs: 8x8 digits, a 2-block
UNet); everything else runs in this process through `cli.main` or the Python API. Every test that
starts from a user's files checks that they are byte-identical afterwards."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edm_sampling.cli import main
from edm_sampling.safety import MANIFEST_NAME, NonFiniteOutputError, NonFiniteWeightsError, lock_path
from edm_sampling.safety.atomic import TEMP_PATTERN
from edm_sampling.training.checkpoint import CHECKPOINT_NAME, previous_checkpoint_path, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--resolution", "8", "--channels", "8,16", "--batch-size", "8", "--no-progress"]
LONG = [*TINY, "--steps", "100000", "--checkpoint-every", "100000", "--num-samples", "0", "--no-export"]
BENCH = ["--model", "gaussian", "--nfe", "3", "--num-samples", "4", "--no-progress"]


def snapshot(folder: Path, manifest: bool = True) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and (manifest or p.name != MANIFEST_NAME)}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if TEMP_PATTERN.match(p.name)]


def train_job(*args: str, saying_steps: bool = False) -> subprocess.Popen:
    """`edm-sampling train ARGS` in its own process (this checkout's package); ``saying_steps``:
    printing "logged N" as it records step N (tests/fault_jobs.py)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [str(ROOT / "tests" / "fault_jobs.py"), "train-saying-steps"] if saying_steps else ["-m", "edm_sampling.cli", "train"]
    return subprocess.Popen([sys.executable, *command, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until(condition, job: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if job.poll() is not None:
            break
        time.sleep(0.05)
    job.kill()
    raise AssertionError(f"never saw {what}; stderr: {job.communicate()[1][-3000:]}")


def first_line(job: subprocess.Popen, prefix: str) -> str:
    """Read the job's stdout until a line starting with ``prefix``."""
    for line in job.stdout:
        if line.startswith(prefix):
            return line.rstrip("\n")
    raise AssertionError(f"no line {prefix!r}; stderr: {job.communicate()[1][-3000:]}")


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`edm-sampling ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one error line of a refused command (a warning about a stale lock may precede it)."""
    lines = [line for line in err.strip().splitlines() if "taking over the lock" not in line]
    assert len(lines) == 1, lines
    return lines[0]


def log_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]


# ---- train: kills, signals, a second job ----------------------------------------------------------

def test_train_killed_before_its_first_checkpoint_keeps_the_old_run_and_says_what_it_found(tmp_path, capsys, caplog):
    """kill -9 before the first checkpoint, with --overwrite over a finished run (its files stay,
    byte-identical: nothing is deleted at the start, and the steps it logged wait for its first
    checkpoint) and in a new folder (it wrote its log). The next start takes over the dead job's
    lock, says once what it found, and the flags it asks for work: --resume continues the old run
    (its log and sample grids kept, none of the killed run's records); the temporary file of an
    interrupted write is removed."""
    old, new = tmp_path / "old", tmp_path / "new"
    samples = ["--num-samples", "4", "--sample-steps", "2", "--log-every", "1", "--checkpoint-every", "1"]
    assert run_cli(["train", "--output-dir", str(old), *TINY, "--steps", "2", *samples], capsys)[0] == 0
    (old / "notes.txt").write_text("my notes")
    before = snapshot(old)
    assert {CHECKPOINT_NAME, previous_checkpoint_path(CHECKPOINT_NAME).name, "pipeline/model_index.json",
            "samples/step-0000001.png", "log.jsonl"} <= set(before) and log_steps(old) == [1, 2]
    overwrite = train_job("--output-dir", str(old), *LONG, "--log-every", "1", "--overwrite", "--seed", "7",
                          saying_steps=True)
    fresh = train_job("--output-dir", str(new), *LONG, "--log-every", "1")
    said = first_line(overwrite, "--overwrite: ")
    assert said == (f"--overwrite: starting a new run in {old}; the checkpoint at step 2 stays until this run's "
                    "first checkpoint replaces it")
    first_line(overwrite, "logged 3")  # it has trained and logged 3 steps
    wait_until(lambda: (new / "log.jsonl").is_file(), fresh, "the new run's first log line")
    for job in (overwrite, fresh):
        job.kill()
        job.communicate()
    assert snapshot(old) == before and lock_path(old).exists()  # the dead job's lock is left behind

    (old / ".checkpoint.safetensors.4242-0123abcd.edm-tmp").write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="edm_sampling"):
        code, _, err = run_cli(["train", "--output-dir", str(old), *TINY, "--steps", "3"], capsys)
    assert code == 2 and f"(pid {overwrite.pid} on host {socket.gethostname()}" in caplog.text
    assert "is no longer running" in caplog.text
    assert error_line(err) == (f"edm-sampling train: error: --output-dir: {str(old)!r} holds a run with a checkpoint at "
                               "step 2; pass --resume to continue it, or --overwrite to start over (its files stay until "
                               "the new run replaces them)")
    code, out, _ = run_cli(["train", "--output-dir", str(old), *TINY, "--steps", "4", *samples, "--resume"], capsys)
    assert code == 0 and f"found a checkpoint at step 2 in {old}: resuming to step 4" in out
    assert verify_checkpoint(old / CHECKPOINT_NAME)["step"] == 4 and (old / "notes.txt").read_text() == "my notes"
    assert not leftovers(old) and not lock_path(old).exists()
    log = (old / "log.jsonl").read_bytes().splitlines(keepends=True)
    assert log_steps(old) == [1, 2, 3, 4] and b"".join(log[:2]) == before["log.jsonl"]  # the old run's, continued
    assert (old / "samples/step-0000001.png").read_bytes() == before["samples/step-0000001.png"]
    assert (old / "samples/step-0000003.png").is_file() and (old / "samples.png").read_bytes() != before["samples.png"]

    code, _, err = run_cli(["train", "--output-dir", str(new), *TINY, "--steps", "2", "--resume"], capsys)
    assert code == 2 and error_line(err) == (
        f"edm-sampling train: error: --resume: no checkpoint {CHECKPOINT_NAME} in {str(new)!r} to resume (an earlier "
        "run stopped before writing one); run without --resume to start a new run there")
    code, out, _ = run_cli(["train", "--output-dir", str(new), *TINY, "--steps", "2", "--num-samples", "0",
                            "--log-every", "1"], capsys)
    assert code == 0 and f"no checkpoint in {new} (an earlier run stopped before writing one): starting a new run" in out
    assert "resuming" not in out and log_steps(new) == [1, 2]  # the killed run's log records are not kept


def test_train_sigint_or_sigterm_saves_and_prints_the_resume_command_and_a_second_job_is_refused(tmp_path, capsys):
    """SIGINT and SIGTERM (two real runs at once): the step finishes, the checkpoint is written,
    the exact resume command is printed, exit 130 / 143, no traceback. While they run, a second
    `train` or `train --resume` on the folder is refused naming the holder. The printed command
    resumes the run where it stopped (log records neither lost nor repeated)."""
    jobs = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / signal.Signals(signum).name
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        jobs[signum] = (out, train_job("--output-dir", str(out), *LONG, "--log-every", "1", "--overwrite"))
    for out, job in jobs.values():
        wait_until(lambda: (out / "log.jsonl").is_file(), job, "the first log line")
    out, job = jobs[signal.SIGTERM]
    for flag in ("--resume", "--overwrite"):
        code, _, err = run_cli(["train", "--output-dir", str(out), *LONG, flag], capsys)
        assert code == 2
        line = error_line(err)
        assert line.startswith(f"edm-sampling train: error: {out} is in use by another edm_sampling job "
                               f"(pid {job.pid} on host {socket.gethostname()}, started ")
        assert f"command: edm-sampling train --output-dir {out} " in line
    for signum, (out, job) in jobs.items():
        job.send_signal(signum)
    for signum, (out, job) in jobs.items():
        _, stderr = job.communicate(timeout=120)
        name = signal.Signals(signum).name
        assert job.returncode == 128 + signum and "Traceback" not in stderr, stderr
        step = verify_checkpoint(out / CHECKPOINT_NAME)["step"]
        assert log_steps(out) == list(range(1, step + 1))
        assert f"stopped by {name}: checkpoint written at step {step} of 100000 in {out}" in stderr
        command = re.search(r"^resume with: (.*)$", stderr, re.M).group(1)
        assert command == shlex.join(["edm-sampling", "train", "--output-dir", str(out), *LONG, "--log-every", "1",
                                      "--resume"])
        args = shlex.split(command)[1:]
        args[args.index("--steps") + 1] = str(step + 2)
        code, printed, _ = run_cli(args, capsys)
        assert code == 0 and f"found a checkpoint at step {step} in {out}: resuming to step {step + 2}" in printed
        assert log_steps(out) == list(range(1, step + 3))
        assert (out / "notes.txt").read_text() == "mine" and not lock_path(out).exists()


def test_train_in_a_folder_whose_parent_is_read_only_locks_inside_it(tmp_path, capsys, monkeypatch):
    """A run folder whose parent the user may not write (a Docker volume mounted at /output, a
    non-root user): the lock goes inside the folder, a second job is refused by it, the run
    works and leaves nothing in the parent. A folder that cannot hold its lock (not created yet
    under that parent) is one line naming --output-dir and why, with nothing written."""
    from edm_sampling.safety import FolderLock

    volume = tmp_path / "volume"
    out = volume / "out"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    real_access, real_open = os.access, os.open

    def access(path, mode, **kwargs):  # what the kernel answers a non-root user (root ignores chmod)
        return not (mode & os.W_OK and Path(path) == volume.resolve()) and real_access(path, mode, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).resolve().parent == volume.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "open", open_)
    volume.chmod(0o555)
    try:
        assert lock_path(out) == out / ".out.edm-lock"
        args = ["train", "--output-dir", str(out), *TINY, "--steps", "1", "--num-samples", "0", "--no-export"]
        with FolderLock(out, "the other job"):
            code, _, err = run_cli([*args, "--overwrite"], capsys)
        assert code == 2 and "is in use by another edm_sampling job" in err and "the other job" in err
        code, _, err = run_cli([*args, "--overwrite"], capsys)
        assert code == 0, err
        assert verify_checkpoint(out / CHECKPOINT_NAME)["step"] == 1 and (out / "notes.txt").read_text() == "mine"
        assert sorted(os.listdir(volume)) == ["out"] and not lock_path(out).exists()

        new = volume / "new"
        code, _, err = run_cli(["train", "--output-dir", str(new), *TINY, "--steps", "1"], capsys)
        assert code == 2 and error_line(err) == (
            f"edm-sampling train: error: --output-dir: {str(new)!r}: cannot create its lock {volume / '.new.edm-lock'} "
            "(Permission denied); a run folder needs a writable parent folder for its lock, or must exist and be "
            "writable itself (its lock then goes inside it)")
        assert sorted(os.listdir(volume)) == ["out"]
    finally:
        volume.chmod(0o755)


def test_train_overwrite_refuses_a_users_file_inside_pipeline_and_exports_with_the_users_umask(tmp_path, capsys):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert run_cli(["train", "--output-dir", str(out), *TINY, "--steps", "1", "--num-samples", "0"], capsys)[0] == 0
    finally:
        os.umask(old)
    for path in [out / "pipeline", *(out / "pipeline").rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    (out / "pipeline" / "notes.txt").write_text("my notes about this model")
    before = snapshot(out)
    code, _, err = run_cli(["train", "--output-dir", str(out), *TINY, "--steps", "1", "--overwrite"], capsys)
    assert code == 2 and "pipeline/notes.txt would be replaced, but edm_sampling did not write it" in error_line(err)
    assert snapshot(out) == before

    from edm_sampling.safety import FolderContentsError
    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.export import export_pipeline
    from edm_sampling.training.trainer import Trainer

    elsewhere = tmp_path / "exported"
    with Trainer(TrainConfig(output_dir=str(tmp_path / "second"), resolution=8, block_out_channels=(8, 16), steps=1,
                             batch_size=8, num_samples=0, progress=False)) as trainer:
        export_pipeline(trainer, elsewhere)
        (elsewhere / "notes.txt").write_text("mine")
        exported = snapshot(elsewhere)
        with pytest.raises(FolderContentsError, match="replacing it would delete notes.txt"):
            export_pipeline(trainer, elsewhere, overwrite=True)
    assert snapshot(elsewhere) == exported and not leftovers(tmp_path)


def test_train_resume_from_the_previous_checkpoint_when_the_last_is_damaged(tmp_path, capsys):
    """The damaged-checkpoint message names the intact previous checkpoint and the `mv` that
    restores it (also for a bare --resume, which reads the settings from the damaged file's
    header); after that `mv`, --resume continues from it (the manifest does not get in the way)."""
    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out), *TINY, "--steps", "4", "--checkpoint-every", "2", "--num-samples", "0",
            "--no-export"]
    assert run_cli(args, capsys)[0] == 0
    path = out / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    before = snapshot(out)
    code, _, err = run_cli([*args, "--resume"], capsys)
    move = re.search(r"run `(mv [^`]*)`", error_line(err)).group(1)
    assert code == 2 and f"the previous checkpoint {previous_checkpoint_path(path)} (step 2) is intact" in err
    assert snapshot(out) == before
    code, _, alone = run_cli(["train", "--resume", "--output-dir", str(out)], capsys)  # settings from its header
    assert code == 2 and error_line(alone) == error_line(err) and snapshot(out) == before
    subprocess.run(shlex.split(move), check=True)
    code, out_text, _ = run_cli([*args, "--resume"], capsys)
    assert code == 0 and f"found a checkpoint at step 2 in {out}: resuming to step 4" in out_text
    assert verify_checkpoint(path)["step"] == 4


def test_non_finite_weights_are_never_exported(tmp_path):
    """An EMA with a NaN (a run that diverged) is refused before the pipeline or a sample grid is
    written, naming the tensor; the checkpoint of the step is kept for inspection."""
    from edm_sampling.training.config import TrainConfig
    from edm_sampling.training.trainer import Trainer

    trainer = Trainer(TrainConfig(output_dir=str(tmp_path / "run"), resolution=8, block_out_channels=(8, 16), steps=1,
                                  batch_size=8, num_samples=2, sample_steps=2, progress=False))
    with torch.no_grad():
        trainer.ema.net.unet.conv_in.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteWeightsError, match=r"the EMA weights at step 1 in .*not exported\): tensor "
                                                    r"'net.unet.conv_in.weight' holds 1 NaN/inf values"):
        trainer.run()
    names = set(snapshot(tmp_path / "run", manifest=False))
    assert CHECKPOINT_NAME in names and not {"pipeline/model_index.json", "samples.png"} & names


# ---- bench / tune -------------------------------------------------------------------------------------

def test_bench_overwrite_replaces_only_its_own_files(tmp_path, capsys, monkeypatch):
    """A second run with --overwrite keeps the user's files (in grids/ too) byte-identical,
    replaces its own results and deletes the grids of samplers it no longer runs; a user's file
    where a grid would go is refused before any sampling, naming it."""
    import edm_sampling.evaluation.sweep as sweep

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    args = ["bench", *BENCH, "--grid-images", "4", "--output-dir", str(out)]
    assert run_cli([*args, "--samplers", "edm-heun,edm-euler"], capsys)[0] == 0
    assert {"grids/edm-heun_nfe3.png", "grids/edm-euler_nfe3.png", "results.csv"} <= set(snapshot(out))
    (out / "grids" / "mine.png").write_bytes(b"my picture")
    (out / "notes.txt").write_text("my notes")
    first = snapshot(out)
    code, _, err = run_cli([*args, "--samplers", "edm-heun"], capsys)  # never replaced without --overwrite
    assert code == 2 and "already exists and is not empty; pass --overwrite" in error_line(err) and snapshot(out) == first
    assert run_cli([*args, "--samplers", "edm-heun", "--overwrite"], capsys)[0] == 0
    second = snapshot(out)
    assert "grids/edm-euler_nfe3.png" not in second and second["grids/mine.png"] == b"my picture"
    assert second["notes.txt"] == b"my notes" and second["results.csv"] != first["results.csv"]

    (out / "grids" / "edm-heun_nfe3.png").write_bytes(b"the user's own image under that name")
    before = snapshot(out)
    monkeypatch.setattr(sweep, "run_sampler", lambda *a, **k: pytest.fail("sampling started"))
    code, _, err = run_cli([*args, "--samplers", "edm-heun", "--overwrite"], capsys)
    assert code == 2 and "grids/edm-heun_nfe3.png would be replaced, but edm_sampling did not write it" in error_line(err)
    assert snapshot(out) == before and not lock_path(out).exists()


def _damaged_idat(png: bytes) -> bytes:
    """The PNG with its compressed pixels garbled but every chunk checksum valid: the file passes
    PIL's integrity check and fails only when its pixels are decoded."""
    head, chunks, at = png[:8], [], 8
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        kind, data = png[at + 4:at + 8], bytearray(png[at + 8:at + 8 + length])
        if kind == b"IDAT":
            data[2:10] = b"\xff" * 8
        chunks.append(len(data).to_bytes(4, "big") + kind + bytes(data) + zlib.crc32(kind + bytes(data)).to_bytes(4, "big"))
        at += 12 + length
    return head + b"".join(chunks)


@pytest.mark.parametrize("damage", ["truncated", "garbled-pixels"])
def test_bench_reference_with_a_damaged_image_fails_before_sampling(tmp_path, capsys, monkeypatch, damage):
    import edm_sampling.evaluation.sweep as sweep

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sweep, "run_sampler", lambda *a, **k: pytest.fail("sampling started"))
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8), dtype=np.uint8), "L").save(reference / f"{i}.png")
    good = (reference / "2.png").read_bytes()
    (reference / "2.png").write_bytes(good[:-30] if damage == "truncated" else _damaged_idat(good))
    before = snapshot(reference)
    code, _, err = run_cli(["bench", *BENCH, "--samplers", "edm-heun", "--reference", str(reference), "--output-dir",
                            str(tmp_path / "out")], capsys)
    assert code == 2 and error_line(err).startswith(f"edm-sampling bench: error: --reference: cannot read the image "
                                                    f"{reference / '2.png'}: ")
    assert snapshot(reference) == before and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_bench_disk_full_is_one_line_and_keeps_the_previous_results(tmp_path, capsys, monkeypatch):
    import pathlib

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    args = ["bench", *BENCH, "--samplers", "edm-heun", "--grid-images", "0", "--output-dir", str(out)]
    assert run_cli(args, capsys)[0] == 0
    before = snapshot(out)

    def disk_full(self, data):
        with open(self, "wb") as handle:
            handle.write(data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full)
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 2 and error_line(err) == (f"edm-sampling bench: error: [Errno {errno.ENOSPC}] could not write "
                                             f"{out / 'results.csv'}: No space left on device; the previous one is unchanged")
    assert snapshot(out) == before and not leftovers(out) and not lock_path(out).exists()


@pytest.mark.parametrize("command", ["bench", "tune"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_bench_and_tune_stopped_by_a_signal_end_in_one_line(tmp_path, capsys, monkeypatch, command, signum):
    """SIGINT / SIGTERM during sampling: one line, exit 130 / 143, the lock given back, no
    temporary left, the user's files byte-identical."""
    import edm_sampling.evaluation.sweep as sweep

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the signal arrives first
        pytest.fail("the signal did not stop the command")

    monkeypatch.setattr(sweep, "run_sampler", interrupted)
    extra = ["--samplers", "edm-heun"] if command == "bench" else ["--bootstrap", "0"]
    # a test process started in the background of a non-interactive shell (as some CI runners
    # start it) inherits SIGINT ignored: give this one Python's own Ctrl-C handler, as a terminal does
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, _, err = run_cli([command, *BENCH, *extra, "--output-dir", str(out), "--overwrite"], capsys)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 128 + signum
    assert error_line(err) == (f"edm-sampling {command}: stopped by {signal.Signals(signum).name}; every file written so "
                               "far is complete (writes are atomic)")
    assert snapshot(out) == {"notes.txt": b"mine"} and not lock_path(out).exists()


# ---- sampling --------------------------------------------------------------------------------------

def test_model_returning_nan_raises_naming_the_step(recwarn):
    """EDMPipeline (one host sync per generation) and samplers.sample (checked per call) raise
    NonFiniteOutputError naming the first step whose model output held NaN or inf."""
    from diffusers import UNet2DModel

    from edm_sampling.pipelines import EDMPipeline
    from edm_sampling.samplers import sample
    from edm_sampling.schedulers import EDMScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    calls = []

    def nan_at_third_call(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            output.sample[0, 0, 0, 0] = math.nan
        return output

    unet.register_forward_hook(nan_at_third_call)
    pipe = EDMPipeline(unet=unet, scheduler=EDMScheduler(model_family="edm"))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(NonFiniteOutputError) as info:
        pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    timestep = float(pipe.scheduler.timesteps[2])
    assert str(info.value) == (f"the model returned NaN or inf at step 2 of 7 (timestep {timestep:.6g}); "
                               "no images are returned")
    assert len(calls) == 7 and not [w for w in recwarn if "NaN" in str(w.message)]  # one error, not also a warning

    def denoiser(x, sigma):
        return torch.full_like(x, math.inf) if float(sigma[0]) < 1 else x * 0

    with pytest.raises(NonFiniteOutputError, match=r"the model returned NaN or inf at step 2 \(sigma = 0\.6"):
        sample(denoiser, torch.randn(2, 3), [80.0, 5.0, 0.6, 0.1, 0.0], solver="euler")
