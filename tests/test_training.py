"""The runner end to end: learning on real MNIST, determinism, what a run writes, sweeps."""

from __future__ import annotations

import itertools
import json
import signal
from types import SimpleNamespace

import pytest
import torch

from dni.cli.report import collect
from dni.cli.train import run
from dni.errors import Interrupted
from dni.guard import Guard
from dni.run import Run
from dni.tracking import read_metrics
from dni.training import Progress, Trainer
from tests.helpers import assert_below, compose_config, read_scalars, run_cli

FAST = ["trainer.progress=false", "device=cpu"]


@pytest.mark.slow
def test_backprop_learns_mnist(mnist, tmp_path, monkeypatch):
    """The default FCN under backprop reaches at most 4% test error in 1000 steps (~10 s)."""
    monkeypatch.setattr("dni.data.vision", lambda *a, **k: mnist)
    cfg = compose_config("experiment=mnist_fcn", "trainer.steps=1000", "trainer.eval_every=1000", *FAST)
    result = run(cfg, tmp_path)
    assert result["status"] == "completed"
    assert_below("bprop MNIST test error, 1000 steps", result["test_error"], 0.04)


def test_same_seed_gives_the_same_loss_trajectory(tmp_path):
    losses = []
    for attempt in ("a", "b"):
        cfg = compose_config("debug=fast", "method=cdni", "trainer.log_every=1", "seed=3", *FAST)
        run(cfg, tmp_path / attempt)
        losses.append([v for _, v in read_scalars(tmp_path / attempt)["train/loss"]])
    assert len(losses[0]) == 20 and losses[0] == losses[1]


def test_a_run_writes_metrics_and_readable_events(tmp_path):
    out = tmp_path / "run"
    result = run_cli("debug=fast", f"hydra.run.dir={out}", "trainer.progress=false")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 20
    assert {"method", "model", "dataset", "test_error", "test_loss", "wall_time_s"} <= metrics.keys()
    assert (metrics["method"], metrics["model"], metrics["dataset"]) == ("bprop", "fcn", "synthetic")
    scalars = read_scalars(out)
    for tag in ("train/loss", "train/accuracy", "test/loss", "test/error", "train/lr", "train/samples_per_s"):
        assert tag in scalars and scalars[tag], tag
    assert scalars["test/error"][-1] == (20, pytest.approx(metrics["test_error"]))
    assert (out / ".hydra" / "config.yaml").is_file() and list((out / "checkpoints").glob("step_*.pt"))
    hparams = _hparams_plugin_data(out)
    assert "method._target_" not in hparams and hparams["trainer.batch_size"] == 64


def _hparams_plugin_data(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {
        k: v.number_value if v.HasField("number_value") else v.string_value for k, v in info.hparams.items()
    }


def test_multirun_sweeps_a_grid(tmp_path):
    result = run_cli(
        "-m", "debug=fast", "method=bprop", "model.depth=1,2", f"hydra.sweep.dir={tmp_path}", *FAST
    )
    assert result.returncode == 0, result.stderr
    jobs = sorted((run.lookup("model.depth"), run.status) for run in collect(tmp_path))
    assert jobs == [(1, "completed"), (2, "completed")]


def test_missing_data_offline_is_one_sentence_without_traceback(tmp_path):
    result = run_cli(
        f"dataset.root={tmp_path / 'nowhere'}", "dataset.download=false", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "DNI_DATA_ROOT" in result.stderr
    assert read_metrics(tmp_path / "run")["status"] == "failed"


class _Recorder:
    """A `dni.training.Steps` that records what the loop asks of it, in order."""

    def __init__(self) -> None:
        self.method = SimpleNamespace(guard=Guard())
        self.calls: list[tuple] = []

    def diagnose(self, t, batch):
        self.calls.append(("diagnose", t, int(batch[0])))

    def train(self, t, x, y):
        self.calls.append(("train", t, int(x)))
        return {}

    def after(self, step, metrics):
        self.calls.append(("after", step))

    def save(self, step):
        self.calls.append(("save", step))

    def finish(self):
        self.calls.append(("finish",))


def _loop(tmp_path, steps: _Recorder, start: int = 0, signum: int | None = None) -> None:
    """`Trainer.loop` over 6 steps from `start` (batch i is the tensor i), measuring every 2 steps
    and saving every 3; with `signum`, a stop signal that has already come."""
    batches = ((torch.tensor([i]), torch.tensor([i])) for i in itertools.count(start))
    run = Run(tmp_path, {}, 6, {}, checkpoint_every=3, keep=1, records=False, batches=batches)
    run.start = run.step = start
    stop = SimpleNamespace(signum=signum)
    Trainer(steps=6, diagnostics_every=2).loop(run, steps, stop, Progress(6, start, bar=False, every=0))


def test_the_one_loop_diagnoses_before_a_step_writes_after_it_and_saves_last(tmp_path):
    """The order every way of running relies on: diagnostics on the batch of the step about to
    run (never after the last), then the step, what is written after it, and a checkpoint at
    the checkpoint steps, after what was written; a resumed run goes on from its step."""
    _loop(tmp_path, fresh := _Recorder())
    assert fresh.calls == [
        ("diagnose", 0, 0), ("train", 0, 0), ("after", 1),
        ("train", 1, 1), ("after", 2),
        ("diagnose", 2, 2), ("train", 2, 2), ("after", 3), ("save", 3),
        ("train", 3, 3), ("after", 4),
        ("diagnose", 4, 4), ("train", 4, 4), ("after", 5),
        ("train", 5, 5), ("after", 6), ("save", 6),
        ("finish",),
    ]  # fmt: skip
    _loop(tmp_path, resumed := _Recorder(), start=3)
    assert resumed.calls == fresh.calls[9:]


def test_a_stop_signal_saves_where_the_run_stands_and_trains_no_further(tmp_path):
    with pytest.raises(Interrupted) as stopped:
        _loop(tmp_path, steps := _Recorder(), start=4, signum=signal.SIGTERM)
    assert steps.calls == [("save", 4)] and "at step 4; a checkpoint is saved" in str(stopped.value)
