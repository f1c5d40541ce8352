"""The one training loop, for every learning rule and every way of running it.

`Trainer.loop` steps a run from where it stands to its budget, and drives a `Steps`: the
whole method in one process (`Trainer.fit`, which knows methods only through `Method`: `step`
on a batch, `diagnostics` on a schedule, `eval_models` to test, and `state_dict` to
checkpoint), or one stage of a pipeline (`dni.distributed`). Everything a run writes goes to
`out_dir`: TensorBoard events, `metrics.json`, and `checkpoints/`, through its `dni.run.Run`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dni.errors import ConfigError, Interrupted
from dni.methods.base import Method
from dni.run import Run, StopSignals, architecture, find_checkpoint, hold, info_of

log = logging.getLogger(__name__)

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class Task(Protocol):
    """What the loop needs of a data set; `dni.data.ClassificationData` is one.

    A task with state of its own (a curriculum) also offers `state_dict` and
    `load_state_dict`, and the loop checkpoints it with everything else.
    """

    name: str
    num_train: int | None

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...


@dataclass
class Trainer:
    """The budget and the schedule of a run.

    Give the budget as `steps` or as `epochs` (which wins when both are set). Every
    `eval_every` steps the test split is evaluated; every `log_every` steps the training
    metrics are written; a progress bar shows on a terminal (`progress`), and elsewhere (a log
    file, nohup, Slurm) a progress line is logged every `progress_every` steps (None: ten per
    run; 0: never); every `diagnostics_every` steps (0: never) the method's gradient
    fidelity is measured; every `checkpoint_every` steps (and at the end) the full training
    state is saved, keeping the newest `keep_checkpoints`.
    """

    steps: int | None = 2000
    epochs: float | None = None
    batch_size: int = 256
    eval_every: int = 500
    log_every: int = 50
    diagnostics_every: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    progress: bool = True
    progress_every: int | None = None
    compile: bool = False  # torch.compile the method's blocks and synthesizers (`Method.compile`)

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_every", "log_every", "checkpoint_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} is not allowed; it must be an integer >= 1")
        if self.epochs is None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(
                f"steps={self.steps!r} is not allowed; give an integer >= 1 or set trainer.epochs"
            )
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs={self.epochs!r} is not allowed; it must be > 0")
        if self.progress_every is not None and not (
            isinstance(self.progress_every, int) and self.progress_every >= 0
        ):
            raise ConfigError(
                f"progress_every={self.progress_every!r} is not allowed; give an integer >= 0 "
                "(0: no progress lines) or null for ten per run"
            )
        if self.diagnostics_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("trainer.diagnostics_every must be >= 0 and trainer.keep_checkpoints >= 1")

    def total_steps(self, num_train: int | None) -> int:
        if self.epochs is None:
            return self.steps
        if num_train is None:
            raise ConfigError("trainer.epochs needs a data set of fixed size; set trainer.steps instead")
        return max(1, math.ceil(self.epochs * (num_train // self.batch_size)))

    def fit(
        self,
        method: Method,
        data: Task,
        out_dir: str | os.PathLike,
        *,
        scheduler: SchedulerFactory | None = None,
        hparams: dict[str, Any] | None = None,
        hparams_columns: bool = True,
        resume: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Train `method` on `data` (see `dni.data` for what a task offers), writing into
        `out_dir`; return the final metrics.

        Resumes from `resume` (a checkpoint file or a run folder), or from the newest intact
        checkpoint already in `out_dir`. Holds the folder's lock throughout (`FolderInUse` when
        another process has it). Raises `Divergence` after recording it, and `Interrupted` on
        SIGINT or SIGTERM after saving a checkpoint and recording status "interrupted".

        `hparams` go to TensorBoard's HPARAMS view; with `hparams_columns=False` the run does
        not declare the view's columns (a sweep declares them once for all its runs).
        """
        out_dir = Path(out_dir)
        with hold(out_dir) as stop:
            return self._fit(method, data, out_dir, stop, scheduler, hparams, hparams_columns, resume)

    def _fit(
        self,
        method: Method,
        data: Task,
        out_dir: Path,
        stop: StopSignals,
        scheduler: SchedulerFactory | None,
        hparams: dict[str, Any] | None,
        hparams_columns: bool,
        resume: str | os.PathLike | None,
    ) -> dict[str, Any]:
        total = self.total_steps(data.num_train)
        batches = data.batches(self.batch_size, self.seed)
        schedulers = [scheduler(o) for o in method.optimizers] if scheduler else []
        info = info_of(method, data)
        signature = {**info, "architecture": architecture(method.parts)}
        run = Run(
            out_dir,
            info,
            total,
            signature,
            self.checkpoint_every,
            self.keep_checkpoints,
            batches=batches,
            schedulers=schedulers,
            data=data,
        )
        found = find_checkpoint(resume, out_dir, signature, next(method.model.parameters()).device)
        if found is not None:
            method.load_state_dict(found[1]["method"])
        run.begin(found, hparams, hparams_columns)
        clock = run.clock
        run.measures = lambda: {
            "samples_per_s": clock.samples / max(clock.train_time, 1e-9),
            "data_time_share": clock.data_time / max(clock.train_time, 1e-9),
            "skipped_updates": method.guard.skipped,
        }
        bar = Progress(total, run.start, self.progress, self.progress_every)
        steps = _OneProcess(self, method, data, run, bar)
        if self.compile:
            method.compile()
        method.train()
        try:
            with run.ending():
                self.loop(run, steps, stop, bar)
                return run.summary("completed", run.step)
        finally:
            bar.close()

    # -- the schedule: a function of the step alone, so every process of a run agrees --------
    def logs(self, step: int, total: int) -> bool:
        """Whether the training metrics of `step` are written."""
        return step % self.log_every == 0 or step == total

    def evaluates(self, step: int, total: int) -> bool:
        """Whether the test split is evaluated after `step`."""
        return step % self.eval_every == 0 or step == total

    def diagnoses(self, step: int, total: int) -> bool:
        """Whether gradient fidelity is measured after `step`, on the next step's batch."""
        return bool(self.diagnostics_every) and step % self.diagnostics_every == 0 and step < total

    def loop(self, run: Run, steps: Steps, stop: StopSignals, bar: Progress) -> None:
        """The one training loop, from `run.step` to the budget: one process and every pipeline
        stage alike. What a step is, and what is written after it, is `steps`'s; the batch
        stream, the schedules, the clock, the progress and the checkpoint steps are the loop's."""
        while run.step < run.total:
            if stop.signum is not None:  # between steps the state is whole: resume is exact
                steps.save(run.step)
                raise Interrupted(stop.signum, run.step, str(run.out_dir))
            began = time.perf_counter()
            x, y = next(run.batches)
            fetched = time.perf_counter()
            if self.diagnoses(run.step, run.total):
                steps.diagnose(run.step, (x, y))
            measured = time.perf_counter()  # measurements do not count as training time
            metrics = steps.train(run.step, x, y)
            run.step_schedulers()
            steps.method.guard.end_step()
            run.step += 1
            run.clock.add(fetched - began, time.perf_counter() - measured + fetched - began, len(x))
            bar.update(run.step, metrics, len(x))
            steps.after(run.step, metrics)
            if run.due(run.step):
                steps.save(run.step)
        steps.finish()


class Steps(Protocol):
    """What `Trainer.loop` drives: the whole method in one process (`Trainer.fit`), or one
    stage of a pipeline (`dni.distributed.pipeline`). `t` counts the steps done before."""

    method: Method

    def diagnose(self, t: int, batch: tuple[Tensor, Tensor]) -> None:
        """Measure gradient fidelity after `t` steps, on the batch of step `t + 1`."""

    def train(self, t: int, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Train step `t + 1` on the batch `(x, y)`; return its scalars."""

    def after(self, step: int, metrics: dict[str, Tensor]) -> None:
        """Write what the schedule asks for after `step` (training metrics, test metrics)."""

    def save(self, step: int) -> None:
        """Save the checkpoint of `step`."""

    def finish(self) -> None:
        """After the last step: deliver what is still in flight."""


class _OneProcess:
    """The whole method trained in this process: `Method.step` on every batch, its record
    written here."""

    def __init__(self, trainer: Trainer, method: Method, data: Task, run: Run, bar: Progress):
        self.trainer, self.method, self.data, self.run, self.bar = trainer, method, data, run, bar
        self.eval_models = method.eval_models()
        self.window_start, self.window_samples = time.perf_counter(), 0

    def diagnose(self, t: int, batch: tuple[Tensor, Tensor]) -> None:
        self.run.tracker.scalars(self.method.diagnostics(*batch), t + 1)

    def train(self, t: int, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        self.window_samples += len(x)
        return self.method.step(x, y)

    def after(self, step: int, metrics: dict[str, Tensor]) -> None:
        run, method = self.run, self.method
        if self.trainer.logs(step, run.total):
            method.guard.check(step)  # the checks a step deferred, read here in one go
            values = {(k if "/" in k else f"train/{k}"): v.item() for k, v in metrics.items()}
            values["train/lr"] = method.optimizers[0].param_groups[0]["lr"]
            sps = self.window_samples / (time.perf_counter() - self.window_start)
            values["train/samples_per_s"] = sps
            run.tracker.scalars(values, step)
            self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", sps=f"{sps:.0f}")
            self.window_start, self.window_samples = time.perf_counter(), 0
        if self.trainer.evaluates(step, run.total):
            results = {}
            for prefix, model in self.eval_models.items():
                results.update({f"{prefix}/{k}": v for k, v in self.data.evaluate(model).items()})
            run.evaluated(step, results)
            method.train()
            self.window_start = time.perf_counter()  # evaluation is not training throughput

    def save(self, step: int) -> None:
        self.method.guard.check(step)  # no checkpoint of a run that has diverged since the last read
        self.run.save(step, {"method": self.method.state_dict()})

    def finish(self) -> None:
        pass


class Progress:
    """A progress bar on a terminal, with log lines printed above it rather than into it; where
    output is not a terminal (a log file, nohup, Slurm), a log line every `every` steps instead
    (None: ten per run, 0: none): step, training loss, samples per second and time left."""

    def __init__(self, total: int, start: int, bar: bool, every: int | None):
        self.bar = tqdm(
            total=total, initial=start, disable=None if bar else True, unit="step", dynamic_ncols=True
        )
        self.total, self.start, self.began = total, start, time.perf_counter()
        self.every = 0 if not self.bar.disable else (max(1, total // 10) if every is None else every)
        self.samples = 0
        self._redirect = ExitStack()
        if not self.bar.disable:
            self._redirect.enter_context(logging_redirect_tqdm())

    def update(self, step: int, metrics: dict[str, Tensor], batch_size: int) -> None:
        self.bar.update()
        self.samples += batch_size
        if self.every and (step % self.every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.began
            done = step - self.start
            left = elapsed / max(done, 1) * (self.total - step)
            # A method's step says "loss", a pipeline stage "train/loss"; a pipeline's first stage
            # (rank 0, which reports) has no loss of its own, so its line leaves it out.
            value = metrics.get("loss", metrics.get("train/loss"))
            loss = f"loss {value.item():.4f}, " if value is not None else ""
            log.info(
                "step %d/%d (%d%%): %s%.0f samples/s, ETA %s",
                step,
                self.total,
                100 * step // self.total,
                loss,
                self.samples / max(elapsed, 1e-9),
                _duration(left),
            )

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(**values)

    def close(self) -> None:
        self.bar.close()
        self._redirect.close()


def _duration(seconds: float) -> str:
    """`1:02:03`, `2:03`: a time left as people read it."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
