"""Runs that survive: exact resume after SIGKILL, refused checkpoints, the divergence guard,
one clear sentence for every bad input, and sweeps whose failed jobs harm no other job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dni.cli.report import ReportSpec, collect, markdown_table
from dni.cli.train import run
from dni.errors import DNIError
from dni.tracking import read_metrics
from tests.helpers import REPO, THREADS, compose_config, data_root, read_scalars, run_cli

# A run long enough to be killed in the middle: ~300 steps of the default FCN on synthetic data.
RESUMABLE = [
    "dataset=synthetic",
    "trainer.steps=300",
    "trainer.batch_size=64",
    "trainer.eval_every=50",
    "trainer.log_every=10",
    "trainer.checkpoint_every=100",
    "trainer.progress=false",
    "debug=deterministic",
    "device=cpu",
]
TIMING = {"wall_time_s", "samples_per_s", "data_time_share"}


def _comparable(metrics: dict) -> dict:
    """metrics.json without the fields that measure time, which no two runs share."""
    kept = {k: v for k, v in metrics.items() if k not in TIMING}
    kept["final"] = {k: v for k, v in metrics["final"].items() if k != "train/samples_per_s"}
    return kept


def _final_state(run_dir: Path) -> dict:
    (last,) = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1:]
    return torch.load(last, weights_only=False)["method"]["parts"]


def _kill_after_checkpoint(args: list[str], run_dir: Path, step: int) -> None:
    """Start a run and SIGKILL it as soon as its checkpoint of `step` is on disk."""
    env = {**os.environ, "DNI_DATA_ROOT": str(data_root()), "OMP_NUM_THREADS": THREADS}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "experiments" / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = run_dir / "checkpoints" / f"step_{step:09d}.pt"
    deadline = time.monotonic() + 120
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert read_metrics(run_dir)["status"] == "running"


@pytest.mark.parametrize("method", ["bprop", "cdni"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(method, tmp_path):
    args = [*RESUMABLE, f"method={method}"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert run_cli(*args, f"hydra.run.dir={whole}").returncode == 0

    _kill_after_checkpoint(args, resumed, step=100)
    again = run_cli(*args, f"hydra.run.dir={resumed}")  # the same command, in the same folder
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout + again.stderr

    expected, got = _final_state(whole), _final_state(resumed)  # every weight, buffer, synthesizer
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert _comparable(read_metrics(resumed)) == _comparable(read_metrics(whole))

    # TensorBoard continues: every step once, with the uninterrupted run's values.
    for tag in ("train/loss", "test/error"):
        ours, theirs = read_scalars(resumed)[tag], read_scalars(whole)[tag]
        assert [s for s, _ in ours] == sorted({s for s, _ in ours}) == [s for s, _ in theirs]
        assert ours == theirs


def _checkpoint_of_a_short_run(tmp_path: Path, *overrides: str) -> Path:
    cfg = compose_config("debug=fast", "trainer.progress=false", "device=cpu", *overrides)
    run(cfg, tmp_path / "source")
    return sorted((tmp_path / "source" / "checkpoints").glob("step_*.pt"))[-1]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_checkpoint_is_refused_naming_the_file(damage, tmp_path):
    path = _checkpoint_of_a_short_run(tmp_path)
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = run_cli("debug=fast", f"resume={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"checkpoint {path} is corrupt or truncated" in result.stderr


def test_checkpoint_of_another_method_is_refused(tmp_path):
    path = _checkpoint_of_a_short_run(tmp_path, "method=bprop")
    cfg = compose_config(
        "debug=fast", "method=cdni", f"resume={path}", "trainer.progress=false", "device=cpu"
    )
    with pytest.raises(DNIError, match=rf"checkpoint {path} belongs to another run \(method='bprop' there"):
        run(cfg, tmp_path / "run")


def test_a_forced_divergence_stops_with_its_status_and_a_nonzero_exit(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "debug=fast", "method=cdni", "method.scale=1e30", "trainer.steps=60", f"hydra.run.dir={out}"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "training diverged at step" in result.stderr and "synthetic gradient in block" in result.stderr
    metrics = read_metrics(out)
    assert metrics["status"] == "diverged" and metrics["divergence"]["where"].startswith("block")


def test_skip_mode_counts_the_skipped_updates_and_finishes(tmp_path):
    overrides = [
        "debug=fast",
        "method=cdni",
        "guard.action=skip",
        "guard.max_sg_norm=1e-4",
        "trainer.progress=false",
    ]
    result = run(compose_config(*overrides, "device=cpu"), tmp_path)
    assert result["status"] == "completed" and result["skipped_updates"] > 0


# Every mistake below must end in one sentence naming the key, before any result is written.
BAD_INPUTS = {
    "depth < 1": (["model.depth=0"], "model.depth=0 is not allowed"),
    "width < 1": (["model.width=0"], "model.width=0 is not allowed"),
    "batch size < 1": (["trainer.batch_size=0"], "trainer.batch_size=0"),
    "batch size > data set": (["trainer.batch_size=100000"], "trainer.batch_size=100000 does not fit"),
    "learning rate <= 0": (["optim.lr=0"], "optim.lr=0 is not allowed"),
    "synthesizer learning rate <= 0": (
        ["method=dni", "method.synthesizer_optimizer.lr=-1"],
        "method.synthesizer_optimizer.lr=-1",
    ),
    "p_update > 1": (["method=cdni", "method.p_update=1.5"], "method.p_update=1.5 is not allowed"),
    "p_update < 0": (["method=cdni", "method.p_update=-0.5"], "method.p_update=-0.5 is not allowed"),
    "CNN on flat data": (["model=cnn", "dataset.shape=[784]"], "model=cnn needs image inputs"),
    "linear synthesizer on a CNN": (
        ["model=cnn", "model.channels=4", "method=dni"],
        "use synthesizer=conv",
    ),
    "interface after the classifier": (
        ["method=dni", "method.interfaces=[4]"],
        "method.interfaces=[4] is not allowed",
    ),
    "device cuda without CUDA": (["device=cuda"], "device=cuda but CUDA is not available"),
    "resume path missing": (
        ["resume=/nonexistent/step_1.pt"],
        "resume=/nonexistent/step_1.pt does not exist",
    ),
    "unknown guard action": (["guard.action=ignore"], "guard.action='ignore' is unknown"),
    "steps < 1": (["trainer.steps=0"], "trainer.steps=0 is not allowed"),
    "cDNI without labels": (["dataset=copy", "method=cdni"], "dataset=copy is a sequence task"),
    "cDNI on a recurrent core": (["dataset=copy", "model=lstm", "method=cdni"], "model=lstm is a recurrent"),
    "truncation T < 1": (
        ["dataset=copy", "model=lstm", "method=bptt", "method.truncation=0"],
        "method.truncation=0 is not allowed",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_sentence_and_writes_no_result(case, tmp_path):
    overrides, message = BAD_INPUTS[case]
    device = [] if any(o.startswith("device=") for o in overrides) else ["device=cpu"]
    cfg = compose_config("debug=fast", *device, *overrides)
    with pytest.raises(DNIError) as error:
        run(cfg, tmp_path)
    text = str(error.value)
    assert message in text and "\n" not in text and text.count(". ") == 0, text
    assert read_metrics(tmp_path) is None or read_metrics(tmp_path)["status"] != "completed"


@pytest.mark.parametrize(
    "args, message",
    [
        (["method=nonsense"], "Available options in 'method'"),
        (["model=mlp"], "Available options in 'model'"),
        (["dataset=imagenet"], "Available options in 'dataset'"),
        (["method=dni", "synthesizer=transformer"], "Available options in 'synthesizer'"),
        (["dataset.root=/nonexistent", "dataset.download=false"], "set DNI_DATA_ROOT or dataset.root"),
    ],
)
def test_bad_input_on_the_command_line_has_no_traceback(args, message, tmp_path):
    result = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    metrics = read_metrics(tmp_path / "run")
    assert metrics is None or metrics["status"] == "failed"


def test_unwritable_output_folder_is_one_sentence(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli("debug=fast", f"hydra.run.dir={blocker}/run")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    expected = f"cannot write the output folder {blocker}/run: {blocker} is a file; set hydra.run.dir"
    assert result.stderr.strip() == expected + " to a writable folder"


def test_a_failing_job_leaves_the_other_jobs_of_a_sweep_intact(tmp_path):
    result = run_cli(
        "-m", "debug=fast", "model.depth=0,1", "trainer.progress=false", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 1  # the sweep tells, after every job ran
    jobs = {run.lookup("model.depth"): run for run in collect(tmp_path)}
    assert jobs[0].status == "failed" and "model.depth=0" in jobs[0].metrics["error"]
    assert jobs[1].status == "completed" and jobs[1].metrics["steps"] == 20
    table = markdown_table(list(jobs.values()), ReportSpec(rows="model.depth", columns="method"))
    assert "| 0 | failed |" in table and "| 1 | " in table and json.dumps(jobs[1].metrics)
