"""One run's life, however it trains: its record (TensorBoard events and `metrics.json`), its
clock, its checkpoints and how it resumes, and what is written when it stops.

`Trainer.fit` (one process) and every stage of a pipeline (`dni.distributed`, one process per
stage) train through a `Run` and the one loop, `Trainer.loop`: the loop steps, what it drives
(`dni.training.Steps`) says what a step is, and the run says where it is written,
when it is saved, what a resumed run starts from, how its learning-rate schedules step, how a
stop signal reaches it (`StopSignals`) and how an end is recorded, the same way for both. In a
pipeline every rank saves its own part of each checkpoint and rank 0 alone writes the record
(`records=True`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dni import checkpoint
from dni.errors import CheckpointError, Divergence, DNIError, Interrupted, RunFolderError
from dni.tracking import Tracker, folder_lock

log = logging.getLogger(__name__)

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class Run:
    """The bookkeeping of one run in `out_dir`, shared by every way of training.

    Args:
        out_dir: the run folder.
        info: what the run is (method, model, dataset): written into `metrics.json`.
        total: the step budget.
        signature: what a checkpoint must match to be resumed here (`checkpoint.load`).
        checkpoint_every: a checkpoint every so many steps, and one at the last step.
        keep: how many of the newest checkpoints to keep.
        records: whether this process writes TensorBoard and `metrics.json` (in a pipeline, rank 0).
        shard: this process's part of each checkpoint (`checkpoint.path_of`); None for the file
            that holds the run's own state.
        fields: what every `metrics.json` of the run carries besides (a pipeline's settings).
        batches, schedulers, data: the loop's batch stream, learning-rate schedules and task,
            saved and restored with the run (with the random generators, they are what makes
            a resumed step the step an uninterrupted run would take, besides the model).

    The loop sets `measures` to what it measured over the run (throughput, skipped updates),
    added to the summary whenever `metrics.json` is written.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        info: dict[str, Any],
        total: int,
        signature: dict[str, Any],
        checkpoint_every: int,
        keep: int,
        records: bool = True,
        shard: str | None = None,
        fields: dict[str, Any] | None = None,
        batches: Any = None,
        schedulers: list[Any] = (),
        data: Any = None,
    ):
        self.batches, self.schedulers, self.data = batches, list(schedulers), data
        self.out_dir, self.info, self.total, self.signature = Path(out_dir), dict(info), total, signature
        self.checkpoint_every, self.keep, self.records, self.shard = checkpoint_every, keep, records, shard
        self.fields = dict(fields or {})
        self.start = self.step = 0  # where the run began, and the steps done so far
        self.last_checkpoint: int | None = None  # the step of the newest checkpoint this run holds
        self.tracker: Tracker | None = None
        self.clock = Clock()
        self.measures: Callable[[], dict[str, Any]] = dict

    # -- start -------------------------------------------------------------------------
    def begin(
        self,
        found: tuple[Path, dict[str, Any]] | None,
        hparams: dict[str, Any] | None = None,
        hparams_columns: bool = True,
    ) -> dict[str, Any] | None:
        """Start afresh, or go on from `found` (a checkpoint and its state, whose model the loop
        has loaded): restore the batch stream, the schedules, the task, the random generators,
        the clock and the record, and write status "running". Returns the restored state, or
        None."""
        restored = found[1] if found is not None else None
        if restored is not None:
            self._load_stream(found[0], restored)
            self.start = self.step = self.last_checkpoint = restored["step"]
            checkpoint.set_rng_state(restored["rng"])
            log.info("resuming from %s at step %d", found[0], self.start)
        self.clock = Clock(restored.get("clock") if restored else None)
        if not self.records:
            return restored
        # TensorBoard hides events at or after `purge_step` written before it: on resume, those
        # after the checkpoint; on a fresh start over the events of a run killed before its
        # first checkpoint, all of them (its steps are about to be logged again).
        purge_step = (
            self.start + 1 if restored else (1 if any(self.out_dir.glob("events.out.tfevents.*")) else None)
        )
        self.tracker = Tracker(self.out_dir, self.info, purge_step=purge_step)
        if restored:
            self.tracker.load_state_dict(restored["tracker"])
        if hparams and not restored:
            self.tracker.hparams(hparams, experiment=hparams_columns)
        self.tracker.write_metrics("running", steps=self.start, total_steps=self.total, **self.fields)
        return restored

    # -- checkpoints -------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether a checkpoint is taken after `step`: a function of the step alone, so every
        process of a run saves at the same steps."""
        return step % self.checkpoint_every == 0 or step == self.total

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Save the loop's training `state` at `step` with the run's own (random generators,
        and where this process keeps the record: the record's state and the clock), atomically;
        then record that the run got this far."""
        state = {
            "signature": self.signature,
            "step": step,
            **state,
            "batches": self.batches.state_dict() if self.batches is not None else None,
            "task": self.data.state_dict() if hasattr(self.data, "state_dict") else None,
            "schedulers": [s.state_dict() for s in self.schedulers],
            "rng": checkpoint.rng_state(),
        }
        if self.tracker is not None:
            state.update(tracker=self.tracker.state_dict(), clock=self.clock.state_dict())
            self.tracker.flush()  # events up to the checkpoint survive a kill; later ones are purged
        path = checkpoint.save(self.out_dir, step, state, keep=self.keep, shard=self.shard)
        self.last_checkpoint = step
        if self.tracker is not None:
            self.tracker.write_metrics("running", steps=step, total_steps=self.total, **self.fields)
        return path

    def _load_stream(self, source: Path, state: dict[str, Any]) -> None:
        if self.batches is not None:
            self.batches.load_state_dict(state["batches"])
        if len(state["schedulers"]) != len(self.schedulers):
            raise CheckpointError(
                f"checkpoint {source} holds the schedules of {len(state['schedulers'])} optimisers "
                f"and this run has {len(self.schedulers)}; resume it with the settings it was saved with "
                "(for DNI: batched=false for a run saved before the batched step existed)"
            )
        for schedule, saved in zip(self.schedulers, state["schedulers"]):
            schedule.load_state_dict(saved)
        if hasattr(self.data, "load_state_dict"):  # e.g. a curriculum's level
            self.data.load_state_dict(state["task"])

    # -- a step ---------------------------------------------------------------------------
    def step_schedulers(self) -> None:
        """Advance the learning-rate schedules by one step, after the loop's updates."""
        with warnings.catch_warnings():  # a block may skip its update (p_update < 1) on purpose
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            for schedule in self.schedulers:
                schedule.step()

    # -- the record --------------------------------------------------------------------
    def evaluated(self, step: int, results: dict[str, float]) -> None:
        """Record the test metrics of `step` (`test/error`, `test/loss`, ...) and log them."""
        self.tracker.scalars(results, step, history=True)
        log.info(
            "step %d/%d: test error %.2f%%, test loss %.4f",
            step,
            self.total,
            100 * results["test/error"],
            results["test/loss"],
        )

    def summary(self, status: str, step: int, **extra: Any) -> dict[str, Any]:
        """Write `metrics.json` with `status` at `step`, and return it."""
        last = self.tracker.last
        return self.tracker.write_metrics(
            status,
            steps=step,
            total_steps=self.total,
            test_error=last.get("test/error"),
            test_loss=last.get("test/loss"),
            wall_time_s=self.clock.elapsed(),
            **self.measures(),
            **self.fields,
            **extra,
        )

    @contextmanager
    def ending(self) -> Iterator[None]:
        """Record how the run ends when the block raises, at the steps done by then (`step`):
        "diverged" with where, "interrupted", or "failed" with the error; a full disk becomes
        one sentence naming the folder. The record is closed on the way out, whatever happens."""
        try:
            yield
        except Divergence as divergence:
            if divergence.step is None:  # a deferred check names the step it went bad at
                divergence.at_step(self.step + 1)
            where = {"step": divergence.step, "quantity": divergence.quantity, "where": divergence.where}
            self._record("diverged", self.step, divergence=where)
            raise
        except Interrupted as interrupted:
            self._record("interrupted", self.step, error=str(interrupted))
            raise
        except Exception as error:
            full = (
                isinstance(error, OSError) and not isinstance(error, DNIError) and error.errno in _DISK_FULL
            )
            if full:
                error = RunFolderError(
                    f"cannot write into the run folder {self.out_dir}: {os.strerror(error.errno).lower()}; "
                    "free space there and run the same command again, or write the run into another folder"
                )
            if getattr(error, "record", True):  # not a folder that is another run's
                message = str(error) if isinstance(error, DNIError) else f"{type(error).__name__}: {error}"
                self._record("failed", self.step, error=message)
            if full:
                raise error from None
            raise
        finally:
            if self.tracker is not None:
                if_writable(self.tracker.close)  # a failed flush must not hide the error on its way out

    def _record(self, status: str, step: int, **extra: Any) -> None:
        if self.tracker is not None:
            if_writable(lambda: self.summary(status, step, **extra))


@contextmanager
def hold(out_dir: str | os.PathLike, lock: bool = True, stop_at_once: bool = False) -> Iterator[StopSignals]:
    """What a process holds while it trains into `out_dir`: the folder's lock (unless `lock` is
    false: a pipeline's rank 0 holds it for every rank), SIGINT and SIGTERM (`StopSignals`, with
    `stop_at_once`), and the console for the run's log lines (`console_logging`)."""
    with ExitStack() as held:
        if lock:
            held.enter_context(folder_lock(out_dir))
        signals = held.enter_context(StopSignals(at_once=stop_at_once))
        held.enter_context(console_logging())
        yield signals


@contextmanager
def console_logging() -> Iterator[None]:
    """The loop's lines reach the console even when nothing configured logging (a script or a
    notebook calling `Trainer.fit`); an application that configured it keeps its own."""
    package = logging.getLogger("dni")
    if logging.getLogger().handlers or package.handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def info_of(method: Any, data: Any) -> dict[str, Any]:
    """What a run is, for `metrics.json` and the checkpoints' signature."""
    return {"method": method.name, "model": method.model.name, "dataset": data.name}


def architecture(parts: nn.Module) -> str:
    """The shapes a checkpoint's weights must have, in a line: a count of tensors and of parameters."""
    shapes = [tuple(p.shape) for p in parts.parameters()]
    return f"{len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes)} parameters"


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice), for as long as the `with` block lasts;
    `signum` is the one that came, or None.

    One process (`at_once=False`) stops at the next step boundary, where its state is whole, so
    the loop polls `signum` and saves there; a second signal acts at once, as it would without
    us. A pipeline stage (`at_once=True`) stops at once with a `KeyboardInterrupt`: its ranks
    would have to agree on a step to stop at, so a stopped pipeline goes on from its last
    checkpoint instead."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, at_once: bool = False) -> None:
        self.at_once = at_once
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if self.at_once:
            raise KeyboardInterrupt
        self._restore()

    def arrives(self, within_s: float) -> bool:
        """Whether a stop signal has come, or comes within `within_s` seconds."""
        deadline = time.monotonic() + within_s
        try:
            while self.signum is None and time.monotonic() < deadline:
                time.sleep(0.01)  # a pending handler runs here, between two bytecodes
        except KeyboardInterrupt:
            pass
        return self.signum is not None

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)
        self._previous = {}

    def __exit__(self, *exception: object) -> None:
        self._restore()


def if_writable(write: Callable[[], Any]) -> None:
    """Record what can still be recorded; a full disk must not replace the error being raised."""
    try:
        write()
    except OSError as error:
        log.warning("could not record the run's end (%s)", error)


class Clock:
    """Wall time and training throughput, carried across resumes."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.before = state.get("elapsed", 0.0)
        self.data_time = state.get("data_time", 0.0)
        self.train_time = state.get("train_time", 0.0)
        self.samples = state.get("samples", 0)
        self.started = time.perf_counter()

    def add(self, data_time: float, step_time: float, samples: int) -> None:
        self.data_time += data_time
        self.train_time += step_time
        self.samples += samples

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def state_dict(self) -> dict:
        return {
            "elapsed": self.elapsed(),
            "data_time": self.data_time,
            "train_time": self.train_time,
            "samples": self.samples,
        }


def find_checkpoint(
    resume: str | os.PathLike | None, out_dir: Path, signature: dict[str, Any], device: torch.device
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a one-process run resumes from and its state: `resume` (a file, strictly,
    or a run folder's newest intact one), else the newest intact one in `out_dir`, else None."""
    if resume is None:
        return checkpoint.load_latest(out_dir, signature, device, set_aside=True)
    path = Path(resume)
    if not path.is_dir():
        return path, checkpoint.load(path, signature, device)
    # A damaged checkpoint is set aside only in our own folder, which we hold the lock of.
    found = checkpoint.load_latest(path, signature, device, set_aside=path.resolve() == out_dir.resolve())
    if found is None:
        raise CheckpointError(
            f"resume={str(path)!r} holds no checkpoints/step_*.pt; point it at a run folder that "
            "has them or at a checkpoint file"
        )
    return found
