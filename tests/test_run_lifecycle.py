"""A run's life as a user meets it: one run per folder, a kill before the first checkpoint,
Ctrl-C and SIGTERM, a full disk, damaged checkpoints, and a run whose every update is skipped."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dni import checkpoint
from dni.cli.train import run
from dni.errors import CheckpointError, Divergence, RunFolderError
from dni.tracking import read_metrics
from tests.helpers import REPO, THREADS, compose_config, data_root, read_scalars, run_cli

# A CLI run on synthetic data that logs every few steps and checkpoints only at its end.
LONG = [
    "dataset=synthetic",
    "trainer.batch_size=64",
    "trainer.log_every=5",
    "trainer.eval_every=25",
    "trainer.checkpoint_every=100000",
    "trainer.progress=false",
    "device=cpu",
    "threads=1",
]
FAST = ["debug=fast", "trainer.progress=false", "device=cpu"]


def _start(args: list[str], run_dir: Path) -> subprocess.Popen:
    """`python experiments/train.py <args>` in the background, writing into `run_dir`; its
    stdout and stderr in one pipe, read with `_read_until`."""
    env = {**os.environ, "DNI_DATA_ROOT": str(data_root()), "OMP_NUM_THREADS": THREADS}
    return subprocess.Popen(
        [sys.executable, str(REPO / "experiments" / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(process: subprocess.Popen, text: str) -> str:
    """The run's output up to the first line containing `text` (the run logs each evaluation
    as `step 25/150: ...`), read as it is written."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"the run ended without logging {text!r}:\n{''.join(seen)[-2000:]}")


def test_a_second_run_into_a_busy_folder_stops_naming_the_process_that_holds_it(tmp_path):
    folder = tmp_path / "run"
    first = _start([*LONG, "trainer.steps=1000000"], folder)
    try:
        deadline = time.monotonic() + 120
        while (read_metrics(folder) or {}).get("status") != "running":  # .hydra/ is written by then
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.05)
        config = (folder / ".hydra" / "config.yaml").read_bytes()

        second = run_cli(*LONG, "trainer.steps=10", "seed=1", f"hydra.run.dir={folder}")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.strip() == (
            f"the run folder {folder} is in use by process {first.pid} on {os.uname().nodename}; wait "
            "for that run to end or stop it, or write into another folder"
        )
        # The first run's record is untouched: its config, its status.
        assert (folder / ".hydra" / "config.yaml").read_bytes() == config
        assert read_metrics(folder)["status"] == "running"
    finally:
        first.kill()
        first.communicate()


def test_a_run_killed_before_its_first_checkpoint_logs_every_step_once_when_started_again(tmp_path):
    folder, args = tmp_path / "run", [*LONG, "trainer.steps=150"]
    killed = _start(args, folder)
    _read_until(killed, "step 50/150")
    killed.kill()
    killed.communicate()
    assert not checkpoint.checkpoints(folder)
    logged = [s for s, _ in read_scalars(folder)["train/loss"]]
    assert logged[:2] == [5, 10]  # on disk, and about to be logged again

    again = run_cli(*args, f"hydra.run.dir={folder}")  # the same command: a fresh start
    assert again.returncode == 0, again.stderr
    assert f"took over the lock of process {killed.pid}" in again.stdout + again.stderr  # a dead run's
    steps = [s for s, _ in read_scalars(folder)["train/loss"]]
    assert steps == list(range(5, 151, 5))


def test_ctrl_c_and_sigterm_save_a_checkpoint_and_the_same_command_continues(tmp_path):
    """Ctrl-C, the same command, SIGTERM (a cluster's notice), the same command: the run ends
    as one uninterrupted run would, every step logged once."""
    folder, args = tmp_path / "run", [*LONG, "trainer.steps=150"]
    step = 0
    for signum, code in [(signal.SIGINT, 130), (signal.SIGTERM, 143)]:
        interrupted = _start(args, folder)
        later = (step // 25 + 1) * 25  # the next evaluation it logs
        output = _read_until(interrupted, f"step {later}/150")
        interrupted.send_signal(signum)
        output += interrupted.communicate(timeout=60)[0]

        assert interrupted.returncode == code and "Traceback" not in output, output[-2000:]
        metrics, resumed_at = read_metrics(folder), step
        step = metrics["steps"]
        assert metrics["status"] == "interrupted" and later <= step < 150
        assert (
            f"training interrupted by {signal.Signals(signum).name} at step {step}; a checkpoint is "
            f"saved in {folder}, so running the same command again continues from there" in output
        )
        assert checkpoint.latest(folder) == _checkpoint(folder, step)
        if resumed_at:  # the second time, the run went on from the first interruption
            assert f"resuming from {_checkpoint(folder, resumed_at)} at step {resumed_at}" in output

    again = run_cli(*args, f"hydra.run.dir={folder}")
    assert again.returncode == 0, again.stderr
    assert f"resuming from {_checkpoint(folder, step)} at step {step}" in again.stdout + again.stderr
    assert read_metrics(folder)["status"] == "completed"
    assert [s for s, _ in read_scalars(folder)["train/loss"]] == list(range(5, 151, 5))


def _checkpoint(folder: Path, step: int) -> Path:
    return folder / "checkpoints" / f"step_{step:09d}.pt"


def test_a_full_disk_is_one_sentence_and_keeps_the_older_checkpoint(tmp_path):
    folder = tmp_path / "run"
    # The second checkpoint meets a full disk after writing part of its bytes.
    script = f"""
import errno, os, runpy, sys, torch
real, calls = torch.save, []
def full_disk(state, file, *args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
        return real(state, file, *args, **kwargs)
    file.write(b"x" * 100000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
torch.save = full_disk
sys.argv = ["experiments/train.py", *{[*FAST, f"hydra.run.dir={folder}"]!r}]
runpy.run_path("experiments/train.py", run_name="__main__")
"""
    env = {**os.environ, "DNI_DATA_ROOT": str(data_root()), "OMP_NUM_THREADS": THREADS}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    written = folder / "checkpoints"
    assert (
        f"cannot write the checkpoint {written / 'step_000000020.pt'}: the disk is full; free space in "
        f"{written} and run the same command again, or write the run into another folder\n" in result.stderr
    )
    assert [p.name for p in written.glob("step_*")] == ["step_000000010.pt"]  # no .pt.tmp left behind
    checkpoint.verify(written / "step_000000010.pt")
    metrics = read_metrics(folder)
    assert metrics["status"] == "failed" and "the disk is full" in metrics["error"]


def test_a_full_disk_at_start_up_is_one_sentence_naming_the_folder(tmp_path, monkeypatch):
    """The config recorded beside the checkpoints is the run's first write there."""

    def full_disk(config, path, *args, **kwargs):
        Path(path).write_bytes(b"x" * 1000)  # part of it written
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cfg = compose_config(*FAST)
    monkeypatch.setattr(OmegaConf, "save", full_disk)
    with pytest.raises(RunFolderError) as error:
        run(cfg, tmp_path)
    written = tmp_path / "checkpoints"
    assert str(error.value) == (
        f"cannot write {written / 'config.yaml'}: the disk is full; free space in {written} and run the "
        "same command again, or write the run into another folder"
    )
    assert not any(written.iterdir())  # no config.yaml.tmp left behind


def _flip(path: Path, count: int = 64) -> None:
    """Invert `count` bytes in the middle of a file (inside a tensor's data)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


def test_a_corrupt_newest_checkpoint_is_kept_and_the_run_resumes_from_the_one_before(tmp_path, caplog):
    folder = tmp_path / "run"
    run(compose_config(*FAST), folder)
    newest, previous = checkpoint.latest(folder), checkpoint.checkpoints(folder)[0]
    expected = torch.load(newest, weights_only=False)["method"]["parts"]
    _flip(newest)
    damaged = newest.read_bytes()

    result = run(compose_config(*FAST), folder)  # the same run again: it resumes
    assert result["status"] == "completed" and result["steps"] == 20
    kept = newest.with_name(newest.name + ".corrupt")
    assert kept.read_bytes() == damaged  # set aside, never deleted
    warning = f"checkpoint {newest} is corrupt or truncated (the checksum of its record"
    assert warning in caplog.text and f"kept as {kept}, resuming from {previous}" in caplog.text
    got = torch.load(checkpoint.latest(folder), weights_only=False)["method"]["parts"]
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # steps 11-20 trained again

    _flip(checkpoint.latest(folder))
    _flip(checkpoint.checkpoints(folder)[0])
    with pytest.raises(CheckpointError) as refused:
        run(compose_config(*FAST), folder)
    message = str(refused.value)
    assert message == (
        f"checkpoints {checkpoint.latest(folder)} and {previous} are both corrupt; nothing was "
        "changed, so move them away to start this run afresh, or write into a new output folder"
    )


def test_a_run_whose_every_update_is_skipped_stops_diverged_with_strict_json(tmp_path):
    overrides = [*FAST, "guard.action=skip", "optim.lr=1e30", "++guard.max_skipped_steps=5"]
    with pytest.raises(Divergence, match="steps in a row that skipped an update is 5; lower the learning"):
        run(compose_config(*overrides), tmp_path)

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in metrics.json")

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=no_constants)
    assert metrics["status"] == "diverged" and metrics["skipped_updates"] >= 5
    assert metrics["final"]["train/loss"] is None and "final.train/loss" in metrics["non_finite"]


@pytest.mark.parametrize("how", ["rank 0 killed", "ctrl-c"])
def test_a_pipeline_whose_rank_0_dies_or_that_is_interrupted_never_stays_running(how, tmp_path):
    """Rank 0 writes the run folder. Killed, it cannot: the rank that survives records the
    failure. On Ctrl-C (SIGINT to every rank, as a terminal sends it) rank 0 records it, even
    when it sees its peer leave a moment before its own signal comes."""
    from tests.test_pipeline import spawn, stop

    folder, logs = tmp_path / "run", tmp_path / "logs"
    procs = spawn(2, {"steps": 10**6, "timeout": 5, "out": str(folder), "eval_every": 10**6}, logs)
    try:
        deadline = time.monotonic() + 90
        while not all("stage" in (logs / f"{r}.log").read_text() for r in (0, 1)) or not read_metrics(folder):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no start"
            time.sleep(0.05)
        if how == "rank 0 killed":
            procs[0].kill()
        else:  # the order that races: rank 1 leaves before rank 0's own signal comes
            procs[1].send_signal(signal.SIGINT)
            procs[1].wait(timeout=30)
            procs[0].send_signal(signal.SIGINT)
        codes = [p.wait(timeout=30) for p in procs]
    finally:
        stop(procs)
    metrics = read_metrics(folder)
    if how == "rank 0 killed":
        assert codes[1] == 1 and metrics["status"] == "failed", (codes, metrics["status"])
        assert metrics["error"].startswith("rank 1: stage 1") and "crashed" in metrics["error"]
    else:
        assert codes[0] != 0 and metrics["status"] == "interrupted", (codes, metrics["status"])
        assert "training interrupted by SIGINT at step" in metrics["error"]


def test_stop_signals_stop_one_process_at_the_next_step_and_a_pipeline_stage_at_once(tmp_path):
    """`dni.run.hold` as both ways of training use it: one process only notes the signal (the
    loop saves at the next step) and gives the next one back to the previous handler; a pipeline
    stage stops at once. Both put the previous handlers back; the lock is held unless `lock`
    is false (a pipeline's other ranks)."""
    from dni.run import hold

    def locked_elsewhere() -> bool:
        code = f"from dni.tracking import lock_folder; lock_folder({str(tmp_path)!r})"
        other = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True
        )
        return b"FolderInUse" in other.stderr

    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with hold(tmp_path) as stop:
            assert locked_elsewhere()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs between two bytecodes
            assert stop.signum == signal.SIGTERM and seen == []
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal acts as it would without us
            time.sleep(0.05)
            assert seen == [signal.SIGTERM]
        with hold(tmp_path, lock=False, stop_at_once=True) as stop:
            assert not locked_elsewhere()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1.0)
            assert stop.signum == signal.SIGTERM and stop.arrives(0.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert seen == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
