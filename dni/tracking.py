"""What a run leaves behind: TensorBoard events and a machine-readable `metrics.json`, and
the lock that gives a run folder to one process at a time."""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from dni.errors import FolderInUse

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
LOCK_FILE = "run.lock"
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
        """(Re)write `metrics.json` atomically and return what was written.

        Strict JSON has no NaN or Infinity: such values are written as null, and
        `non_finite` lists where they were (e.g. `test_loss`, `final.test/loss`).
        """
        metrics = {"status": status, **self.info, **extra, "final": self.last, "history": self.history}
        found: list[str] = []
        metrics = strict(metrics, "", found)
        if found:
            metrics["non_finite"] = list(dict.fromkeys(found))  # a history names its tag once
        write_json(self.out_dir / METRICS_FILE, metrics)
        return metrics

    def close(self) -> None:
        self.writer.close()

    def state_dict(self) -> dict:
        return {"last": self.last, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.last, self.history = dict(state["last"]), {k: list(v) for k, v in state["history"].items()}


def write_json(path: Path, value: Any) -> None:
    """Write strict JSON (non-finite numbers as null) through a temporary file, which is
    removed again when the write fails (a full disk)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps(strict(value), indent=2, allow_nan=False) + "\n")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def strict(value: Any, where: str = "", found: list[str] | None = None) -> Any:
    """`value` with tensors and numpy scalars as plain numbers and every NaN or infinity as
    None; the places replaced are appended to `found`."""
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a tensor or numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        if found is not None:
            found.append(where)
        return None
    if isinstance(value, dict):
        return {k: strict(v, f"{where}.{k}" if where else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v, where, found) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run's `metrics.json`, or None when it has none (never started, or killed early)."""
    path = Path(run_dir) / METRICS_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# Locks this process holds: folder -> [descriptor of its lock file, how many holders here].
_held: dict[Path, list[int]] = {}


@contextmanager
def folder_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the run folder's lock for the duration of a `with` block (see `lock_folder`)."""
    folder = lock_folder(out_dir)
    try:
        yield
    finally:
        unlock_folder(folder)


def lock_folder(out_dir: str | os.PathLike) -> Path:
    """Take the exclusive lock on a run folder, or raise `FolderInUse` naming the process
    that holds it; return the folder, for `unlock_folder`.

    Two runs writing one folder interleave their events and checkpoints, so a run takes
    `flock` on `run.lock` and writes its process id there. The kernel drops the lock when its
    holder dies, so the lock of a killed run is simply taken over. The same process may lock
    a folder it holds again (the runner locks before Hydra writes `.hydra/`, then the loop).
    """
    folder = Path(out_dir).resolve()
    if folder in _held:
        _held[folder][1] += 1
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise FolderInUse(
            f"the run folder {folder} is in use by {holder}; wait for that run to end or stop it, "
            "or write into another folder"
        ) from None
    except OSError as error:  # a file system without locks (some network mounts): go on unguarded
        log.warning("cannot lock the run folder %s (%s); nothing stops a second run there", folder, error)
    else:
        previous = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
        if previous:  # a run that ended normally leaves the file empty
            log.warning("took over the lock of %s, which ended without giving it back", previous)
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[folder] = [descriptor, 1]
    return folder


def unlock_folder(folder: Path) -> None:
    """Give back one hold on a folder locked by `lock_folder`; the last one releases it.
    The lock file stays: removing it would let a waiting process lock a file nobody sees."""
    held = _held.get(folder)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _held[folder]
        os.ftruncate(held[0], 0)
        os.close(held[0])  # closing the last descriptor releases the flock


@atexit.register
def _unlock_all() -> None:
    """A hold kept until the process ends (the runner's) is given back too, leaving the lock
    file empty: only a run that died leaves its name there."""
    for folder in list(_held):
        _held[folder][1] = 1
        unlock_folder(folder)
