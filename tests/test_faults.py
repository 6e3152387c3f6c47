"""Faults and what happens: each row of the "faults and what happens" table in README.md is a
test here or in tests/test_faults_*.py (the
commands: test_faults_runs.py; bad input: test_faults_inputs.py), and each test that starts
from files a user had checks that they are byte-identical afterwards. Kills, signals and races
of the safety layer run in their own processes (tests/fault_jobs.py)."""

from __future__ import annotations

import ast
import errno
import json
import logging
import os
import re
import select
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_jobs import toy_state

from edm_sampling.images import save_image_grid
from edm_sampling.safety import (
    MANIFEST_NAME,
    CheckpointDamagedError,
    FolderContentsError,
    FolderLock,
    FolderLockedError,
    NonFiniteWeightsError,
    RunFolder,
    WriteFailedError,
    append_text,
    assert_finite_state,
    atomic_write,
    atomic_write_text,
    lock_path,
    resume_command,
)
from edm_sampling.safety.atomic import TEMP_PATTERN
from edm_sampling.training.checkpoint import (
    CHECKPOINT_NAME,
    atomic_save_safetensors,
    load_checkpoint,
    previous_checkpoint_path,
    save_checkpoint,
    verify_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
JOBS = Path(__file__).with_name("fault_jobs.py")


# ---- helpers -------------------------------------------------------------------------------------

def snapshot(folder: Path, manifest: bool = True) -> dict[str, bytes]:
    """Every file below ``folder`` and its bytes (the manifest left out with manifest=False)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (manifest or p.name != MANIFEST_NAME)
    }


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of interrupted writes below ``folder``."""
    return [p.name for p in folder.rglob("*") if TEMP_PATTERN.match(p.name)]


def start_job(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.Popen([sys.executable, str(JOBS), *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(job: subprocess.Popen, line: str, timeout: float = 120) -> list[str]:
    """Read the job's output until ``line``; returns the lines read."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([job.stdout], [], [], 0.5)
        if ready:
            text = job.stdout.readline()
            if not text:
                break
            seen.append(text.rstrip("\n"))
            if seen[-1] == line:
                return seen
        elif job.poll() is not None:
            break
    job.kill()
    raise AssertionError(f"job never printed {line!r}; output {seen}, stderr: {job.stderr.read()[-3000:]}")


def kill(job: subprocess.Popen) -> None:
    job.kill()
    job.wait(30)
    job.stdout.close()
    job.stderr.close()
    job.stdin.close()


# ---- one job per folder --------------------------------------------------------------------------

def test_second_job_on_a_folder_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    holder = start_job("hold", folder, "edm-sampling train --output-dir run")
    try:
        wait_for(holder, "held")
        before = snapshot(folder)
        for mode in ({}, {"resume": True}):
            with pytest.raises(FolderLockedError) as info:
                with RunFolder(folder, "second", **mode):
                    pass
            message = str(info.value)
            assert f"pid {holder.pid} on host {socket.gethostname()}" in message
            assert re.search(r"started \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", message)
            assert "command: edm-sampling train --output-dir run" in message
            assert snapshot(folder) == before
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert holder.returncode == 0, holder.stderr.read()
    assert not lock_path(folder).exists()
    with RunFolder(folder, "third"):  # free again
        pass


def test_lock_is_exclusive_under_contention(tmp_path):
    """Four processes take and give back one folder 40 times each, as fast as they can: the
    enter / leave log never shows two holders at once (this also races the release, which
    deletes the lock file while others are opening it)."""
    log = tmp_path / "log"
    jobs = [start_job("churn", tmp_path / "run", log, 40) for _ in range(4)]
    for job in jobs:
        _, err = job.communicate(timeout=240)
        assert job.returncode == 0, err
    holder, rounds = None, 0
    for line in log.read_text().splitlines():
        kind, pid = line.split()
        if kind == "enter":
            assert holder is None, f"{pid} entered while {holder} held the folder"
            holder = pid
        else:
            assert holder == pid
            holder, rounds = None, rounds + 1
    assert rounds == 160
    assert not lock_path(tmp_path / "run").exists()


def test_stale_lock_of_a_dead_job_is_taken_over_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "run"
    holder = start_job("hold", folder, "the job that died")
    wait_for(holder, "held")
    kill(holder)
    assert lock_path(folder).exists()  # left behind by SIGKILL
    before = snapshot(folder)
    with caplog.at_level(logging.WARNING, logger="edm_sampling"):
        with RunFolder(folder, "next", resume=True):
            assert snapshot(folder) == before
    assert f"pid {holder.pid} on host {socket.gethostname()}" in caplog.text
    assert "the job that died) is no longer running" in caplog.text
    assert not lock_path(folder).exists()


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.csv").write_text("theirs")
    record = {"pid": 4242, "host": "another-host", "started": "2024-05-01T10:00:00+00:00", "command": "edm-sampling bench"}
    lock_path(folder).write_text(json.dumps(record))
    before, lock_before = snapshot(folder), lock_path(folder).read_bytes()
    with pytest.raises(FolderLockedError) as info:
        with RunFolder(folder, "here"):
            pass
    message = str(info.value)
    assert "pid 4242 on host another-host" in message and f"remove {lock_path(folder)}" in message
    assert snapshot(folder) == before and lock_path(folder).read_bytes() == lock_before


def test_lock_is_released_on_exit_and_on_exceptions(tmp_path):
    folder = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with RunFolder(folder, "fails"):
            assert lock_path(folder).exists()
            with pytest.raises(FolderLockedError):  # held, even against this same process
                RunFolder(folder, "again").__enter__()
            raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()  # nothing written, nothing left behind
    with RunFolder(folder, "works"):
        atomic_write_text(folder / "a.txt", "a")
    assert not lock_path(folder).exists() and (folder / "a.txt").read_text() == "a"
    lock = FolderLock(folder).acquire()
    lock.release()
    lock.release()
    assert not lock_path(folder).exists()


# ---- --overwrite: only the package's own files -----------------------------------------------------

def test_overwrite_keeps_user_files_and_old_results_until_replaced(tmp_path):
    out = tmp_path / "bench"
    with RunFolder(out, "first") as run:
        atomic_write_text(out / "results.csv", "old results\n")
        save_image_grid(torch.zeros(1, 1, 4, 4), out / "grids" / "a.png")
        save_image_grid(torch.ones(1, 1, 4, 4), out / "grids" / "b.png")
        run.commit()
    (out / "notes.txt").write_text("my notes")
    (out / "grids" / "mine.png").write_bytes(b"my picture")
    before = snapshot(out)
    with RunFolder(out, "second", outputs=("results.csv", "grids/a.png")) as run:
        assert snapshot(out) == before  # nothing is deleted at the start
        assert run.foreign_files() == ["grids/mine.png", "notes.txt"]
        atomic_write_text(out / "results.csv", "new results\n")
        save_image_grid(-torch.ones(1, 1, 4, 4), out / "grids" / "a.png")
        middle = snapshot(out)
        assert middle["grids/b.png"] == before["grids/b.png"]  # an old result stays until the run is done
        assert middle["grids/a.png"] != before["grids/a.png"]
        assert run.commit() == ["grids/b.png"]
    after = snapshot(out, manifest=False)
    assert sorted(after) == ["grids/a.png", "grids/mine.png", "notes.txt", "results.csv"]
    assert after["notes.txt"] == before["notes.txt"] and after["grids/mine.png"] == before["grids/mine.png"]
    assert after["results.csv"] == b"new results\n"


def test_resume_continues_the_run_that_wrote_the_checkpoint(tmp_path):
    """An --overwrite run that wrote a file (a latent cache) and died before its first checkpoint
    leaves the manifest naming it as the last run; resuming the checkpoint continues the run that
    wrote the checkpoint, so committing keeps that run's files (its sample grids)."""
    out = tmp_path / "run"
    with RunFolder(out, "first") as run:
        first = run.run_id
        atomic_write_text(out / "checkpoint.safetensors", "step 4")
        atomic_write_text(out / "samples" / "step-2.png", "grid at step 2")
        run.commit()
    with RunFolder(out, "second --overwrite") as run:  # writes its cache, then dies
        second = run.run_id
        atomic_write_text(out / "cache.npy", "the second run's cache")
    assert json.loads((out / MANIFEST_NAME).read_text())["run"] == second != first
    with RunFolder(out, "first --resume", resume="checkpoint.safetensors") as run:
        assert run.run_id == first and run.writer("samples/step-2.png") == first
        atomic_write_text(out / "checkpoint.safetensors", "step 6")
        assert run.commit() == ["cache.npy"]
    assert (out / "samples" / "step-2.png").read_text() == "grid at step 2"
    (out / "checkpoint.safetensors").write_text("changed by hand")  # not the package's: the manifest's run goes on
    with RunFolder(out, "resume", resume="checkpoint.safetensors") as run:
        assert run.run_id == first


def test_overwrite_refuses_to_replace_files_the_package_did_not_write(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, "first"):
        atomic_write(out / "pipeline", lambda tmp: (tmp / "model.txt").write_text("model v1"), folder=True)
        atomic_write_text(out / "results.csv", "results v1")
    outputs = ("pipeline/", "results.csv")

    (out / "pipeline" / "README.md").write_text("my notes on this model")  # inside a folder replaced whole
    before = snapshot(out)
    with pytest.raises(FolderContentsError, match=r"pipeline/README\.md would be replaced, but edm_sampling did not write it"):
        with RunFolder(out, "second", outputs=outputs):
            pass
    assert snapshot(out) == before
    (out / "pipeline" / "README.md").unlink()

    (out / "results.csv").write_text("results v1, corrected by hand")  # a result the user edited
    before = snapshot(out)
    for mode in ({}, {"resume": True}):
        with pytest.raises(FolderContentsError, match=r"results\.csv would be replaced.*changed since"):
            with RunFolder(out, "second", outputs=outputs, **mode):
                pass
        assert snapshot(out) == before

    (out / "summary.json").write_text('{"mine": 1}')  # an output nobody declared: the write itself refuses
    before = snapshot(out)
    with RunFolder(out, "third", outputs=("pipeline/",)):
        with pytest.raises(FolderContentsError, match=r"summary\.json"):
            atomic_write_text(out / "summary.json", "{}")
    assert snapshot(out) == before and not leftovers(out)

    legacy = tmp_path / "before-manifests"  # a folder written before the package kept a manifest
    legacy.mkdir()
    (legacy / "results.csv").write_text("old")
    with pytest.raises(FolderContentsError, match="results.csv"):
        with RunFolder(legacy, "fourth", outputs=("results.csv",)):
            pass
    assert (legacy / "results.csv").read_text() == "old"


# ---- kills and failed writes -----------------------------------------------------------------------

def test_kill_during_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, "train"):
        save_checkpoint(out / CHECKPOINT_NAME, **toy_state(torch, 1))
    before = snapshot(out, manifest=False)
    job = start_job("checkpoint-mid-write", out)
    wait_for(job, "mid-write")  # the new checkpoint is complete in its temporary file, not yet in place
    kill(job)
    assert leftovers(out)
    with RunFolder(out, "train --resume", resume=True, outputs=(CHECKPOINT_NAME,)) as run:
        assert run.cleaned and not leftovers(out)
        assert run.owned(CHECKPOINT_NAME)
    assert snapshot(out, manifest=False) == before
    assert verify_checkpoint(out / CHECKPOINT_NAME)["step"] == 1


def test_kill_during_folder_replacement_restores_the_old_folder(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, "first"):
        atomic_write(out / "pipeline", lambda tmp: (tmp / "model.txt").write_text("old model\n"), folder=True)
    before = snapshot(out, manifest=False)
    job = start_job("folder-swap", out)
    wait_for(job, "between")
    kill(job)
    assert not (out / "pipeline").exists()  # killed between moving the old folder aside and the new one in
    with RunFolder(out, "next", resume=True, outputs=("pipeline/",)) as run:
        assert any(line.startswith(f"restored {out.resolve() / 'pipeline'}") for line in run.cleaned)
        assert run.owned("pipeline/model.txt")
    assert snapshot(out, manifest=False) == before and not leftovers(out)


def test_kill_after_replace_before_manifest_update_keeps_the_file_recognised(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, "first"):
        atomic_write_text(out / "results.json", '{"old": true}')
    job = start_job("pause-after-replace", out)
    wait_for(job, "replaced")
    kill(job)
    assert (out / "results.json").read_text() == '{"new": true}'
    with RunFolder(out, "next", outputs=("results.json",)) as run:
        assert run.owned("results.json")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _partial_then_enospc(target) -> None:
    """A write that gets some bytes on disk, then finds the disk full."""
    with open(target, "wb") as handle:
        handle.write(b"partial")
    _enospc()


def _write_text(monkeypatch, folder):
    import pathlib

    monkeypatch.setattr(pathlib.Path, "write_bytes", lambda self, data: _partial_then_enospc(self))
    atomic_write_text(folder / "results.json", json.dumps({"new": 1}))


def _write_png(monkeypatch, folder):
    from PIL import Image

    monkeypatch.setattr(Image.Image, "save", lambda self, fp, *args, **kwargs: _partial_then_enospc(fp))
    save_image_grid(torch.zeros(2, 3, 4, 4), folder / "grid.png")


def _write_checkpoint(monkeypatch, folder):
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, filename, metadata=None: _partial_then_enospc(filename))
    save_checkpoint(folder / CHECKPOINT_NAME, **toy_state(torch, 3))


def _write_folder(monkeypatch, folder):
    def writer(tmp):
        (tmp / "model.txt").write_text("new model")
        _enospc()
    atomic_write(folder / "pipeline", writer, folder=True)


def _fsync_eio(monkeypatch, folder):
    def fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write_text(folder / "results.json", "{}")


@pytest.mark.parametrize("write, code, target", [
    (_write_text, errno.ENOSPC, "results.json"),
    (_write_png, errno.ENOSPC, "grid.png"),
    (_write_checkpoint, errno.ENOSPC, CHECKPOINT_NAME),
    (_write_folder, errno.ENOSPC, "pipeline"),
    (_fsync_eio, errno.EIO, "results.json"),
], ids=["json", "png", "safetensors", "folder", "fsync-eio"])
def test_disk_full_or_io_error_during_a_write_keeps_the_old_file(tmp_path, monkeypatch, write, code, target):
    folder = tmp_path / "run"
    folder.mkdir()
    atomic_write_text(folder / "results.json", '{"old": 1}')
    save_image_grid(torch.ones(2, 3, 4, 4), folder / "grid.png")
    save_checkpoint(folder / CHECKPOINT_NAME, **toy_state(torch, 1))
    save_checkpoint(folder / CHECKPOINT_NAME, **toy_state(torch, 2))
    atomic_write(folder / "pipeline", lambda tmp: (tmp / "model.txt").write_text("old model"), folder=True)
    before = snapshot(folder)
    with monkeypatch.context() as patch:
        with pytest.raises(WriteFailedError) as info:
            write(patch, folder)
    assert info.value.errno == code
    assert str(info.value) == f"[Errno {code}] could not write {folder / target}: {os.strerror(code)}; the previous one is unchanged"
    assert snapshot(folder) == before and not leftovers(folder)


def test_kernel_refused_checkpoint_write_keeps_the_old_checkpoint(tmp_path):
    """A real failed write, no monkeypatching: the job's file size limit (RLIMIT_FSIZE, 1 MB)
    is below the new 8 MB checkpoint, so the kernel refuses the write with EFBIG."""
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(out / CHECKPOINT_NAME, **toy_state(torch, 1))
    before = snapshot(out)
    job = start_job("efbig", out, 1 << 20)
    stdout, stderr = job.communicate(timeout=120)
    assert job.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["errno"] == errno.EFBIG
    assert f"could not write {out / CHECKPOINT_NAME}: File too large; the previous one is unchanged" in result["message"]
    assert snapshot(out) == before and not leftovers(out)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_and_folders_get_the_users_umask(tmp_path, umask, file_mode, dir_mode):
    out = tmp_path / "run"

    def pipeline(tmp: Path) -> None:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights.bin").write_bytes(b"w")

    old = os.umask(umask)
    try:
        with RunFolder(out, "modes"):
            atomic_write_text(out / "sub" / "results.json", "{}")
            save_image_grid(torch.zeros(1, 1, 4, 4), out / "grid.png")
            save_checkpoint(out / CHECKPOINT_NAME, **toy_state(torch, 1))
            save_checkpoint(out / CHECKPOINT_NAME, **toy_state(torch, 2))
            atomic_write(out / "pipeline", pipeline, folder=True)
            append_text(out / "log.jsonl", "1\n")
            append_text(out / "log.jsonl", "2\n")
    finally:
        os.umask(old)
    assert (out / "log.jsonl").read_text() == "1\n2\n"
    paths = [out, *out.rglob("*")]
    assert {p.name for p in paths} >= {MANIFEST_NAME, previous_checkpoint_path(CHECKPOINT_NAME).name, "weights.bin", "sub"}
    for path in paths:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (dir_mode if path.is_dir() else file_mode), (path, oct(mode))


# ---- damaged checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0, 5, 100, -200, -1], ids=["empty", "in-length", "in-header", "in-data", "last-byte"])
def test_truncated_checkpoint_is_refused_naming_the_previous_one(tmp_path, keep):
    path = tmp_path / CHECKPOINT_NAME
    previous = previous_checkpoint_path(path)
    save_checkpoint(path, **toy_state(torch, 1))
    save_checkpoint(path, **toy_state(torch, 2))
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointDamagedError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} is damaged (truncated") and "\n" not in message
    assert f"the previous checkpoint {previous} (step 1) is intact" in message
    assert f"run `mv {previous} {path}` and resume again, or start over with --overwrite" in message
    assert snapshot(tmp_path) == before

    previous.write_bytes(previous.read_bytes()[:-10])
    with pytest.raises(CheckpointDamagedError, match=f"previous checkpoint {re.escape(str(previous))} is damaged too"):
        load_checkpoint(path)
    os.replace(previous, path)
    with pytest.raises(CheckpointDamagedError, match="no earlier checkpoint is kept; start over with --overwrite"):
        load_checkpoint(path)


def test_every_single_bit_flip_in_a_checkpoint_is_refused(tmp_path):
    """One bit flipped at every byte of a small checkpoint (header and data alike): never
    loaded, always the one damaged-checkpoint error."""
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, **toy_state(torch, 1, width=2, rng=False))
    good = path.read_bytes()
    assert load_checkpoint(path)["state"]["step"] == 1
    reasons = set()
    fd = os.open(path, os.O_RDWR)
    try:
        for position in range(len(good)):
            os.pwrite(fd, bytes([good[position] ^ 1 << (position * 5 % 8)]), position)
            with pytest.raises(CheckpointDamagedError) as info:
                load_checkpoint(path)
            os.pwrite(fd, good[position : position + 1], position)
            reasons.add(re.match(r"checkpoint .* is damaged \(([^:)]*)", str(info.value)).group(1))
    finally:
        os.close(fd)
    assert len(good) > 1000 and {"checksum mismatch", "its header is garbled"} <= reasons, reasons


def test_train_resume_on_a_damaged_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    from edm_sampling.cli import main

    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out), "--resolution", "8", "--channels", "8,16", "--steps", "2",
            "--batch-size", "8", "--num-samples", "0", "--no-export", "--no-progress"]
    assert main(args) == 0
    path = out / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    before = snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args[:8] + ["3"] + args[9:] + ["--resume"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == (f"edm-sampling train: error: checkpoint {path} is damaged (checksum mismatch: its contents "
                        "changed after it was written); no earlier checkpoint is kept; start over with --overwrite")
    assert snapshot(out) == before


def test_checkpoint_without_checksum_loads_with_a_warning(tmp_path, caplog):
    path = tmp_path / CHECKPOINT_NAME
    metadata = {"state": json.dumps({"step": 3}), "optimizer": json.dumps({"param_groups": [], "scalars": {}}),
                "format": "edm_sampling.training/1"}
    atomic_save_safetensors({"model.w": torch.ones(2)}, path, metadata)
    with caplog.at_level(logging.WARNING, logger="edm_sampling"):
        checkpoint = load_checkpoint(path)
    assert checkpoint["state"]["step"] == 3 and torch.equal(checkpoint["model"]["w"], torch.ones(2))
    assert "without a checksum" in caplog.text


# ---- signals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_sigint_or_sigterm_finish_the_step_save_and_exit(tmp_path, signum, code):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["train", "--output-dir", str(out), "--steps", "100", "--overwrite"]
    job = start_job("loop", out, *argv)
    seen = wait_for(job, "step 3")
    job.send_signal(signum)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == code, stderr
    assert "Traceback" not in stderr
    steps = [int(line.split()[1]) for line in seen + stdout.splitlines() if line.startswith("step ")]
    state = json.loads((out / "checkpoint.json").read_text())
    assert state == {"a": steps[-1], "b": steps[-1]}  # the step that was running was completed, not cut
    name = signal.Signals(signum).name
    assert f"stopped by {name}: checkpoint written at step {steps[-1]}" in stderr
    assert f"resume with: edm-sampling train --output-dir {shlex.quote(str(out))} --steps 100 --resume" in stderr
    assert (out / "notes.txt").read_text() == "mine" and not lock_path(out).exists()


def test_second_signal_stops_at_once():
    for name in ("SIGINT", "SIGTERM"):
        job = start_job("double-signal", name)
        stdout, _ = job.communicate(timeout=60)
        assert stdout.splitlines() == ["first: requested=True"]
        assert job.returncode == -signal.Signals[name]


def test_resume_command_keeps_the_flags_and_resumes():
    argv = ["train", "--output-dir", "my run", "--overwrite", "--lr", "1e-3"]
    assert resume_command(argv) == "edm-sampling train --output-dir 'my run' --lr 1e-3 --resume"
    assert resume_command(["train", "--resume"], prog="accelerate launch -m edm_sampling.cli") == (
        "accelerate launch -m edm_sampling.cli train --resume")


# ---- non-finite weights ----------------------------------------------------------------------------

def test_non_finite_weights_are_refused_naming_the_first_tensor():
    state = {
        "conv.weight": torch.ones(3),
        "steps": torch.tensor([1, 2]),
        "conv.bias": torch.tensor([1.0, float("nan"), float("inf")]),
        "norm.weight": torch.full((2,), float("-inf"), dtype=torch.bfloat16),
    }
    with pytest.raises(NonFiniteWeightsError) as info:
        assert_finite_state(state, "EMA weights of run/")
    assert str(info.value) == ("EMA weights of run/: tensor 'conv.bias' holds 2 NaN/inf values of 3 "
                               "(1 more tensors too); refusing to save them")
    assert_finite_state({"w": torch.ones(3, dtype=torch.float16), "n": torch.tensor([7])}, "weights")


# ---- the table -------------------------------------------------------------------------------------

def test_faults_table_and_suite_agree():
    """Every row of the faults table names tests that exist, and every test of the fault suite
    (tests/test_faults*.py) is named in it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.lower().index("faults and what happens"):].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    table = []
    for line in section[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, rows = table[0], table[2:]
    assert header[0] == "fault" and header[-1] == "test" and len(rows) >= 30

    def tests_in(paths) -> set[str]:
        return {node.name for path in paths for node in ast.parse(path.read_text()).body
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}

    suite = tests_in(sorted(Path(__file__).parent.glob("test_faults*.py")))
    everywhere = tests_in(sorted(Path(__file__).parent.glob("test_*.py")))
    named: set[str] = set()
    for row in rows:
        assert len(row) == len(header) and all(row), row
        names = re.findall(r"`(test_\w+)`", row[-1])
        assert names, f"this row names no test: {row}"
        missing = set(names) - everywhere
        assert not missing, f"the faults table names {missing}, which no file in tests/ has"
        named |= set(names)
    assert suite - named == {"test_faults_table_and_suite_agree"}, f"tests missing from the table: {suite - named}"
