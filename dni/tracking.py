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

from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from dni.errors import FolderInUse

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
LOCK_FILE = "run.lock"
# The results the HPARAMS view compares across runs: a scalar tag each, written by
# `write_metrics` (so at every checkpoint as well as at the end), and what its column shows.
HPARAM_METRICS = {
    "result/test_error": "test error (last evaluation)",
    "result/best_test_error": "test error (best evaluation)",
    "result/test_loss": "test loss (last evaluation)",
    "result/steps": "training steps done",
    "result/wall_time_s": "wall time (s)",
    "result/status": "0 completed, 1 running, 2 interrupted, 3 diverged, 4 failed",
}
STATUS_CODES = {"completed": 0, "running": 1, "interrupted": 2, "diverged": 3, "failed": 4}
# A hyperparameter one run of a sweep does not have (bprop has no method.p_update): every run
# writes every key of its sweep, so the columns are the same for all.
ABSENT = "n/a"


# The backprop control's own curves (`control/train/...`, `control/test/...`): TensorBoard
# gets them as a run of their own, `<run>/control`, under the method's tag names, so each
# chart draws the method and its control in two colours; metrics.json keeps the full tags.
CONTROL_RUN = "control"
_CONTROL_CURVES = ("control/train/", "control/test/")


class Tracker:
    """Writes scalars to TensorBoard and keeps what `metrics.json` needs.

    `purge_step` is the first step a resumed run will log again: TensorBoard hides any
    event at or after it that the interrupted run wrote, so curves have no duplicates.
    """

    def __init__(self, out_dir: str | os.PathLike, info: dict[str, Any], purge_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.purge_step = purge_step
        self.writer = SummaryWriter(str(self.out_dir), purge_step=purge_step)
        self.control_writer: SummaryWriter | None = None  # opened at the control's first scalar
        self.info = dict(info)
        self.last: dict[str, float] = {}
        self.history: dict[str, list[list[float]]] = {}

    def scalars(self, values: dict[str, float], step: int, history: bool = False) -> None:
        for tag, value in values.items():
            if tag.startswith(_CONTROL_CURVES):
                if self.control_writer is None:
                    folder = self.out_dir / CONTROL_RUN
                    self.control_writer = SummaryWriter(str(folder), purge_step=self.purge_step)
                self.control_writer.add_scalar(tag.removeprefix(CONTROL_RUN + "/"), value, step)
            else:
                self.writer.add_scalar(tag, value, step)
            self.last[tag] = value
            if history:
                self.history.setdefault(tag, []).append([step, value])

    def hparams(self, values: dict[str, Any], experiment: bool = True) -> None:
        """Declare the run's hyperparameters for TensorBoard's HPARAMS view.

        A run on its own also declares the experiment (its columns); the runs of a sweep
        leave that to the sweep (`write_experiment` in the sweep's folder), which knows the
        keys of every run and which of them were swept.
        """
        clean = {k: hparam_value(v) for k, v in values.items()}
        if experiment:
            self.writer.file_writer.add_summary(experiment_summary(hparam_infos([clean])))
        start = plugin_data_pb2.SessionStartInfo()
        for key, value in clean.items():
            _set_value(start.hparams[key], value)
        self.writer.file_writer.add_summary(_hparams_summary(session_start_info=start))

    def write_metrics(self, status: str, **extra: Any) -> dict[str, Any]:
        """(Re)write `metrics.json` atomically and return what was written.

        Strict JSON has no NaN or Infinity: such values are written as null, and
        `non_finite` lists where they were (e.g. `test_loss`, `final.test/loss`).
        """
        metrics = {"status": status, **self.info, **extra, "final": self.last, "history": self.history}
        self._results(status, extra)
        found: list[str] = []
        metrics = strict(metrics, "", found)
        if found:
            metrics["non_finite"] = list(dict.fromkeys(found))  # a history names its tag once
        write_json(self.out_dir / METRICS_FILE, metrics)
        return metrics

    def _results(self, status: str, extra: dict[str, Any]) -> None:
        """The HPARAMS view's metric columns (`HPARAM_METRICS`), at the step reached."""
        step = extra.get("steps")
        if step is None:
            return
        errors = [value for _, value in self.history.get("test/error", [])]
        results = {
            "result/test_error": self.last.get("test/error"),
            "result/best_test_error": min(errors) if errors else None,
            "result/test_loss": self.last.get("test/loss"),
            "result/steps": step,
            "result/wall_time_s": extra.get("wall_time_s"),
            "result/status": STATUS_CODES.get(status, STATUS_CODES["failed"]),
        }
        for tag, value in results.items():
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        if status != "running":
            end = plugin_data_pb2.SessionEndInfo(status=_SESSION_STATUS.get(status, api_pb2.STATUS_FAILURE))
            self.writer.file_writer.add_summary(_hparams_summary(session_end_info=end))

    def flush(self) -> None:
        """Put every event written so far on disk (before a checkpoint: later ones are purged)."""
        for writer in (self.writer, self.control_writer):
            if writer is not None:
                writer.flush()

    def close(self) -> None:
        self.writer.close()
        if self.control_writer is not None:
            self.control_writer.close()

    def state_dict(self) -> dict:
        return {"last": self.last, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.last, self.history = dict(state["last"]), {k: list(v) for k, v in state["history"].items()}


_SESSION_STATUS = {
    "completed": api_pb2.STATUS_SUCCESS,
    "interrupted": api_pb2.STATUS_UNKNOWN,
    "diverged": api_pb2.STATUS_FAILURE,
    "failed": api_pb2.STATUS_FAILURE,
}


def hparam_value(value: Any) -> bool | float | str:
    """A hyperparameter as TensorBoard stores it: a bool, a finite number, or else its text
    (`inf` too, which JSON cannot hold)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return "null" if value is None else str(value)


def _set_value(target: Any, value: bool | float | str) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, float):
        target.number_value = value
    else:
        target.string_value = value


_DATA_TYPES = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64}


def hparam_infos(runs: list[dict[str, Any]], swept: list[str] = ()) -> list[api_pb2.HParamInfo]:
    """The columns of an HPARAMS table over `runs` (each a run's hyperparameters): every key of
    any run, the `swept` ones first (TensorBoard shows those that differ, ticked, first),
    each with the values it takes as its domain. A key whose runs disagree on its type, or
    that some runs lack (`ABSENT`), is a text column, so every filter TensorBoard offers on
    it works."""
    keys = list(dict.fromkeys([*swept, *(k for run in runs for k in run)]))
    infos = []
    for key in keys:
        values = [hparam_value(run[key]) if key in run else ABSENT for run in runs] or [ABSENT]
        kinds = {type(v) for v in values}
        if len(kinds) > 1:
            values = [str(v) for v in values]
        distinct = list(dict.fromkeys(values))
        kind = type(values[0])
        info = api_pb2.HParamInfo(
            name=key,
            type=_DATA_TYPES.get(kind, api_pb2.DATA_TYPE_STRING),
            differs=key in swept or len(distinct) > 1,
        )
        for value in distinct:
            _set_value(info.domain_discrete.values.add(), value)
        infos.append(info)
    return infos


def conform(values: dict[str, Any], infos: list[api_pb2.HParamInfo]) -> dict[str, Any]:
    """A run's hyperparameters with exactly the keys and types of its sweep's columns."""
    out: dict[str, Any] = {}
    for info in infos:
        value = hparam_value(values[info.name]) if info.name in values else ABSENT
        out[info.name] = str(value) if info.type == api_pb2.DATA_TYPE_STRING else value
    return out


def experiment_summary(infos: list[api_pb2.HParamInfo]) -> Summary:
    """The HPARAMS view's columns: `infos` and the metrics of `HPARAM_METRICS`."""
    metrics = [
        api_pb2.MetricInfo(
            name=api_pb2.MetricName(tag=tag), display_name=tag.partition("/")[2], description=text
        )
        for tag, text in HPARAM_METRICS.items()
    ]
    return _hparams_summary(experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics))


def write_experiment(folder: str | os.PathLike, infos: list[api_pb2.HParamInfo]) -> None:
    """Declare a sweep's HPARAMS columns once, in events of the sweep's own folder (TensorBoard
    reads them from any run, and the runs of the sweep declare none)."""
    writer = SummaryWriter(str(folder))
    writer.file_writer.add_summary(experiment_summary(infos))
    writer.close()


def _hparams_summary(**data: Any) -> Summary:
    (tag,) = [
        {"experiment": metadata.EXPERIMENT_TAG, "session_start_info": metadata.SESSION_START_INFO_TAG}.get(
            name, metadata.SESSION_END_INFO_TAG
        )
        for name in data
    ]
    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata.create_summary_metadata(content))])


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
