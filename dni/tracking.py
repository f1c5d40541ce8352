"""What a run leaves behind: TensorBoard events and a machine-readable `metrics.json`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

METRICS_FILE = "metrics.json"
# Scalars the HPARAMS view compares across the runs of a sweep.
HPARAM_METRICS = ("test/error", "test/loss")


class Tracker:
    """Writes scalars to TensorBoard and keeps what `metrics.json` needs.

    `purge_step` is the first step a resumed run will log again: TensorBoard hides any
    event at or after it that the interrupted run wrote, so curves have no duplicates.
    """

    def __init__(self, out_dir: str | os.PathLike, info: dict[str, Any], purge_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.writer = SummaryWriter(str(self.out_dir), purge_step=purge_step)
        self.info = dict(info)
        self.last: dict[str, float] = {}
        self.history: dict[str, list[list[float]]] = {}

    def scalars(self, values: dict[str, float], step: int, history: bool = False) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
            self.last[tag] = value
            if history:
                self.history.setdefault(tag, []).append([step, value])

    def hparams(self, values: dict[str, Any]) -> None:
        """Declare the run's hyperparameters for TensorBoard's HPARAMS view."""
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}
        for summary in hparams_summary(clean, {tag: math.nan for tag in HPARAM_METRICS}):
            self.writer.file_writer.add_summary(summary)

    def layout(self, charts: dict[str, list[str]]) -> None:
        """Several tags on one chart each (e.g. a method and its backprop control)."""
        self.writer.add_custom_scalars({"compare": {t: ["Multiline", tags] for t, tags in charts.items()}})

    def write_metrics(self, status: str, **extra: Any) -> dict[str, Any]:
        """(Re)write `metrics.json` atomically and return what was written."""
        metrics = {"status": status, **self.info, **extra, "final": self.last, "history": self.history}
        write_json(self.out_dir / METRICS_FILE, metrics)
        return metrics

    def close(self) -> None:
        self.writer.close()

    def state_dict(self) -> dict:
        return {"last": self.last, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.last, self.history = dict(state["last"]), {k: list(v) for k, v in state["history"].items()}


def write_json(path: Path, value: Any) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, default=_plain) + "\n")
    os.replace(temporary, path)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run's `metrics.json`, or None when it has none (never started, or killed early)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
