"""Decoupled DNI across processes: one stage per rank, no update locking.

Stage k receives the activation of batch t from stage k-1, trains its blocks on it at
once from their synthetic gradients, sends its output on without blocking, and moves on to
batch t+1. The target for its last synthesizer comes back from stage k+1 whenever stage
k+1 has run that batch, and is used as soon as it is seen; only when more than
`staleness` of its batches still lack their target does the stage wait. `staleness=0` is
the synchronous schedule, which reproduces the single-process step exactly.

Every rank reads the same deterministic batch stream (same data, same seed), so labels and
the network input (for cDNI and forward unlocking) are at hand everywhere without being
sent. Rank 0 writes the run folder: it gathers each stage's reports (throughput, where the
time went, staleness, synthesizer losses) and, at evaluation steps, the stages' weights,
evaluates the assembled model and writes TensorBoard and `metrics.json`, without stopping
the pipeline to do so.

Launch one process per stage with torchrun; `Pipeline.fit` reads the rank from the
environment torchrun sets. With one process (no torchrun) it runs a single stage locally.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from dni.distributed.links import Inbox, Link, Outbox, pair_groups
from dni.distributed.stage import Stage, balanced_boundaries, check_boundaries
from dni.errors import ConfigError, Divergence
from dni.methods.dni import DecoupledNeuralInterfaces
from dni.synthesizers import OracleSynthesizer
from dni.tracking import Tracker

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
# What every stage measures per report window, before its scalars (see `Stage.report_keys`).
_RAW = (
    "wall_s",
    "samples",
    "wait_input_s",
    "wait_target_s",
    "send_s",
    "delay_sum",
    "delay_count",
    "delay_max",
    "skipped_updates",
)


class Pipeline:
    """How a DNI method is split over processes, and the schedule between them.

    Args:
        stages: number of stages; None for one per process launched (torchrun's WORLD_SIZE).
        boundaries: 1-based blocks after which the next stage starts, e.g. [2]; each must be
            followed by an interface. None splits the interfaces so that the stages' compute
            is as even as it can be.
        staleness: how many newer batches a stage may train on before the target of a batch
            must have arrived; 0 is the synchronous schedule (exactly the single-process step).
        timeout: seconds any receive or send may wait before the run stops with an error
            naming the stage that went silent.
        backend: "gloo" (CPU), "nccl" (CUDA), or "auto" for whichever fits the device.
    """

    def __init__(
        self,
        stages: int | None = None,
        boundaries: list[int] | None = None,
        staleness: int = 1,
        timeout: float = 120.0,
        backend: str = "auto",
    ):
        if stages is not None and (not isinstance(stages, int) or stages < 1):
            raise ConfigError(f"parallel.stages={stages!r} is not allowed; give an integer >= 1, or null")
        if not isinstance(staleness, int) or staleness < 0:
            raise ConfigError(f"parallel.staleness={staleness!r} is not allowed; give an integer >= 0")
        if not timeout > 0:
            raise ConfigError(f"parallel.timeout={timeout!r} is not allowed; give a number of seconds > 0")
        if backend not in BACKENDS:
            raise ConfigError(f"parallel.backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        self.stages, self.staleness, self.timeout, self.backend = stages, staleness, float(timeout), backend
        self.boundaries = list(boundaries) if boundaries is not None else None
        # One GPU per rank: claim it before the runner builds anything on "cuda".
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

    def fit(
        self,
        method: DecoupledNeuralInterfaces,
        data: Any,
        trainer: Any,
        out_dir: str | os.PathLike,
        *,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        hparams: dict[str, Any] | None = None,
        resume: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Train this rank's stage of `method` on `data` for `trainer`'s budget and schedule
        (a `dni.training.Trainer`: steps or epochs, batch_size, eval_every, log_every, seed,
        progress). Every rank must have built `method` from the same seed. Rank 0 writes
        into `out_dir` and returns the final metrics; other ranks return their own summary."""
        _check_method(method)
        if resume is not None:
            raise ConfigError("resume is not supported with parallel=pipeline yet; start a fresh run")
        if trainer.diagnostics_every:
            log.warning("gradient-fidelity diagnostics need the whole model in one process; off here")
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        stages = self.stages or world
        if stages != world:
            raise ConfigError(
                f"parallel.stages={stages} needs one process per stage but {world} were launched; run "
                f"torchrun --nproc_per_node={stages} experiments/train.py ..., or set parallel.stages=null"
            )
        device = next(method.model.parameters()).device
        backend = self._backend(device)
        owns_group = world > 1 and not dist.is_initialized()
        if owns_group:
            dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout))
        boundaries = (
            check_boundaries(self.boundaries, stages, method.cuts)
            if self.boundaries is not None
            else balanced_boundaries(method, stages)
        )
        if world > 1:
            out_dir = _agree_on_folder(Path(out_dir), rank)
        run = _StageRun(self, method, data, trainer, Path(out_dir), rank, world, boundaries, backend)
        result = run.train(scheduler, hparams)
        if owns_group:  # only after success: a failed rank exits and its peers see it at once
            dist.barrier()
            dist.destroy_process_group()
        return result

    def _backend(self, device: torch.device) -> str:
        wanted = "nccl" if device.type == "cuda" else "gloo"
        if self.backend not in ("auto", wanted):
            raise ConfigError(
                f"parallel.backend={self.backend} does not fit a model on {device.type}; use "
                f"parallel.backend={wanted} (or auto)"
            )
        return wanted


def _check_method(method: Any) -> None:
    if not isinstance(method, DecoupledNeuralInterfaces):
        raise ConfigError(
            f"parallel=pipeline splits a DNI method over processes, not {getattr(method, 'name', method)!r}; "
            "set method=dni or method=cdni, and control=false"
        )
    if any(isinstance(i.synthesizer, OracleSynthesizer) for i in method.interfaces):
        raise ConfigError(
            "the oracle synthesizer needs the whole network in one process; choose another "
            "method/synthesizer with parallel=pipeline"
        )


def _agree_on_folder(out_dir: Path, rank: int) -> Path:
    """Rank 0's run folder is the run folder. Hydra, run by every rank, may have named the
    others' differently (`${now:...}` ticks between ranks); an empty one is removed."""
    shared = [str(out_dir)]
    dist.broadcast_object_list(shared, src=0)
    chosen = Path(shared[0])
    if rank > 0 and out_dir.resolve() != chosen.resolve() and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    return chosen


class _Clock:
    """Where a stage's time goes within one report window, and in total."""

    def __init__(self) -> None:
        self.window = dict.fromkeys(_RAW, 0.0)
        self.total = dict.fromkeys(_RAW, 0.0)
        self.started = time.perf_counter()
        self.excluded = 0.0  # reporting and evaluation: not training time

    @contextmanager
    def waiting(self, kind: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.window[f"{kind}_s"] += time.perf_counter() - began

    @contextmanager
    def aside(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began

    def delay(self, batches: int) -> None:
        self.window["delay_sum"] += batches
        self.window["delay_count"] += 1
        self.window["delay_max"] = max(self.window["delay_max"], batches)

    def close_window(self, skipped: int) -> list[float]:
        """The window's raw measurements (in `_RAW` order); starts the next window."""
        now = time.perf_counter()
        self.window["wall_s"] = now - self.started - self.excluded
        self.window["skipped_updates"] = skipped
        values = [self.window[k] for k in _RAW]
        for k in _RAW:
            if k == "delay_max":
                self.total[k] = max(self.total[k], self.window[k])
            elif k != "skipped_updates":
                self.total[k] += self.window[k]
        self.total["skipped_updates"] = skipped
        self.window = dict.fromkeys(_RAW, 0.0)
        self.started, self.excluded = now, 0.0
        return values


def shares(raw: dict[str, float]) -> dict[str, float]:
    """Throughput, where the time went, and staleness, from a stage's raw measurements."""
    wall = max(raw["wall_s"], 1e-9)
    waits = raw["wait_input_s"] + raw["wait_target_s"] + raw["send_s"]
    out = {
        "samples_per_s": raw["samples"] / wall,
        "compute_share": max(0.0, 1.0 - waits / wall),
        "wait_input_share": raw["wait_input_s"] / wall,
        "wait_target_share": raw["wait_target_s"] / wall,
        "send_share": raw["send_s"] / wall,
    }
    if raw["delay_count"]:
        out["staleness_mean"] = raw["delay_sum"] / raw["delay_count"]
        out["staleness_max"] = raw["delay_max"]
    return out


class _StageRun:
    """One rank's part of one run: its stage, its links, its schedule; rank 0 also reports."""

    def __init__(
        self,
        pipeline: Pipeline,
        method: DecoupledNeuralInterfaces,
        data: Any,
        trainer: Any,
        out_dir: Path,
        rank: int,
        world: int,
        boundaries: list[int],
        backend: str,
    ):
        self.pipeline, self.method, self.data, self.trainer = pipeline, method, data, trainer
        self.out_dir, self.rank, self.world, self.boundaries = out_dir, rank, world, boundaries
        self.stages = [Stage(method, k, boundaries) for k in range(world)]
        self.stage = self.stages[rank]
        self.total = trainer.total_steps(data.num_train)
        self.staleness = pipeline.staleness
        self.device = next(method.model.parameters()).device
        every = (trainer.log_every, trainer.eval_every)
        self.report_steps = [
            s for s in range(1, self.total + 1) if s == self.total or any(s % e == 0 for e in every)
        ]
        self.report_set = set(self.report_steps)
        self.eval_steps = {s for s in self.report_steps if s == self.total or s % trainer.eval_every == 0}
        self.backend = backend if world > 1 else "local"
        self.clock = _Clock()
        self._links(backend)
        blocks = f"{self.stage.start + 1}-{self.stage.end}"
        log.info(
            "stage %d/%d: blocks %s%s, staleness bound %d, %s",
            rank,
            world,
            blocks,
            " and the head" if self.stage.last else "",
            self.staleness,
            backend if world > 1 else "one process",
        )

    # -- links --------------------------------------------------------------------------
    def _links(self, backend: str) -> None:
        k, stage, timeout = self.rank, self.stage, self.pipeline.timeout
        self.inputs = self.activations = self.targets_out = self.targets_in = self.reports_out = None
        self.report_inboxes: dict[int, Inbox] = {}
        if self.world == 1:
            return
        groups = pair_groups(self.world, backend, timeout)
        shapes = self.method.model.activation_shapes()
        depth = self.staleness + 2  # messages queued for sending before `send` waits

        def link(kind: str, source: int, dest: int, describe: Callable[[int], str]) -> Link:
            peer = dest if source == k else source
            return Link(peer, groups[(kind, source, dest)], timeout, describe, self.device)

        def batches(shape: tuple[int, ...]) -> Callable[[int], Tensor]:
            return lambda i: torch.empty(self.trainer.batch_size, *shape, device=self.device)

        def activation(t: int) -> str:
            return f"stage {k}: the activation of batch {t + 1}"

        def target(t: int) -> str:
            return f"stage {k}: the target of batch {t + 1}"

        if not stage.first:
            inputs = link("activations", k - 1, k, activation)
            self.inputs = Inbox(inputs, self.total, batches(shapes[stage.start - 1]))
            self.targets_out = Outbox(link("targets", k, k - 1, target), depth)
        if not stage.last:
            self.activations = Outbox(link("activations", k, k + 1, activation), depth)
            targets = link("targets", k + 1, k, target)
            self.targets_in = Inbox(targets, self.total, batches(shapes[stage.end - 1]))
        if k > 0:
            self.reports_out = Outbox(link("reports", k, 0, lambda i: f"stage {k}: report {i + 1}"))
        for j in range(1, self.world if k == 0 else 1):

            def report(i: int, j: int = j) -> str:
                return f"stage 0: the report of stage {j} for step {self.report_steps[i]}"

            inbox = Inbox(link("reports", j, 0, report), len(self.report_steps), self._report_buffer(j))
            self.report_inboxes[j] = inbox

    def _report_size(self, k: int, step: int) -> int:
        stage = self.stages[k]
        return len(_RAW) + len(stage.report_keys()) + (stage.state_size() if step in self.eval_steps else 0)

    def _report_buffer(self, k: int) -> Callable[[int], Tensor]:
        sizes = [self._report_size(k, s) for s in self.report_steps]
        return lambda i: torch.empty(sizes[i], dtype=torch.float64, device=self.device)

    # -- the schedule -------------------------------------------------------------------
    def train(self, scheduler: Callable | None, hparams: dict[str, Any] | None) -> dict[str, Any]:
        stage, method = self.stage, self.method
        if self.rank == 0:
            self._open_tracker(hparams)
        schedulers = [scheduler(o) for o in stage.optimizers()] if scheduler else []
        batches = self.data.batches(self.trainer.batch_size, self.trainer.seed)
        pending: deque[tuple[int, Tensor, Tensor, int]] = deque()  # batch, output, labels, regressions
        self.regressions = 0  # targets applied so far: a later count means the synthesizer stepped
        bar = tqdm(
            total=self.total,
            disable=None if (self.trainer.progress and self.rank == 0) else True,
            unit="step",
            dynamic_ncols=True,
        )
        method.train()
        self.began = time.perf_counter()
        step = 0
        try:
            for t in range(self.total):
                x, y = next(batches)
                labels = stage.labels(x, y)
                predicted = stage.unlock(x, labels)  # forward unlocking: before the input is here
                if stage.first:
                    h = x
                else:
                    with self.clock.waiting("wait_input"):
                        h = self.inputs.get()
                    h.requires_grad_()
                out, metrics = stage.run(h, x, y, labels, predicted, self._target_sender(h))
                for s in schedulers:
                    s.step()
                if not stage.last:
                    with self.clock.waiting("send"):
                        self.activations.send(out)
                    pending.append((t, out, labels, self.regressions))
                self._use_targets(pending, t, self.staleness if t + 1 < self.total else 0)
                self.clock.window["samples"] += len(x)
                step = t + 1
                bar.update()
                if step in self.report_set:
                    self._report(step, metrics)
                if self.rank == 0:
                    with self.clock.aside():
                        self._collect(block=False)
            for outbox in (self.activations, self.targets_out, self.reports_out):
                if outbox is not None:
                    outbox.flush()
            if self.rank == 0:
                self._collect(block=True)
        except Divergence as divergence:
            divergence.at_step(step + 1)
            if self.rank == 0:
                where = {"step": divergence.step, "quantity": divergence.quantity, "where": divergence.where}
                self._summary("diverged", step, divergence=where)
            raise
        except Exception as error:
            if self.rank == 0:
                self._summary("failed", step, error=str(error))
            raise
        finally:
            bar.close()
            if self.rank == 0:
                self.tracker.close()
        if self.rank == 0:
            return self._summary("completed", step)
        return {"status": "completed", "steps": step, "test_error": None, **shares(self.clock.total)}

    def _target_sender(self, h: Tensor) -> Callable[[Tensor | None], None] | None:
        if self.targets_out is None:
            return None

        def send(grad: Tensor | None) -> None:
            # No gradient (the guard skipped an update): NaN tells the stage below to skip too.
            with self.clock.waiting("send"):
                self.targets_out.send(grad if grad is not None else torch.full_like(h, math.nan))

        return send

    def _use_targets(self, pending: deque, t: int, bound: int) -> None:
        """Apply every target that has arrived; wait while more than `bound` are missing."""
        while pending:
            if len(pending) > bound:
                with self.clock.waiting("wait_target"):
                    delta = self.targets_in.get()
            else:
                delta = self.targets_in.poll()
                if delta is None:
                    return
            batch, out, labels, regressions = pending.popleft()
            if not torch.isnan(delta.view(-1)[0]):
                self.stage.learn_target(out, delta, labels, late=self.regressions != regressions)
                self.regressions += 1
            self.clock.delay(t - batch)

    # -- reports ------------------------------------------------------------------------
    def _report(self, step: int, metrics: dict[str, Tensor]) -> None:
        with self.clock.aside():
            values = self.clock.close_window(self.method.guard.skipped)
            metrics = {**metrics, **self.stage.stats()}  # after this step's targets arrived
            for key in self.stage.report_keys():
                value = metrics.get(key)
                values.append(float(value) if value is not None else math.nan)
            parts = [torch.tensor(values, dtype=torch.float64, device=self.device)]
            if step in self.eval_steps:
                parts.append(self.stage.state_vector())
            vector = torch.cat(parts)
        if self.rank == 0:
            self._arrived.setdefault(step, {})[0] = vector
        else:
            with self.clock.waiting("send"):
                self.reports_out.send(vector)

    def _open_tracker(self, hparams: dict[str, Any] | None) -> None:
        info = {"method": self.method.name, "model": self.method.model.name, "dataset": self.data.name}
        self.tracker = Tracker(self.out_dir, info)
        if hparams:
            self.tracker.hparams(hparams)
        self.eval_model = copy.deepcopy(self.method.model)
        self._arrived: dict[int, dict[int, Tensor]] = {}
        self._written = 0
        self._totals = [dict.fromkeys(_RAW, 0.0) for _ in range(self.world)]
        self.tracker.write_metrics("running", steps=0, total_steps=self.total, parallel=self._settings())

    def _collect(self, block: bool) -> None:
        """Rank 0: take the reports that have arrived; write every step all stages reported."""
        for k, inbox in self.report_inboxes.items():
            while inbox.received < len(self.report_steps):
                vector = inbox.poll()
                if vector is None:
                    break
                self._arrived.setdefault(self.report_steps[inbox.received - 1], {})[k] = vector
        while self._written < len(self.report_steps):
            step = self.report_steps[self._written]
            got = self._arrived.get(step, {})
            if len(got) < self.world:
                if not block:
                    return
                for k, inbox in self.report_inboxes.items():
                    if k not in got:
                        got[k] = inbox.get()
                self._arrived[step] = got
            self._write(step, self._arrived.pop(step))
            self._written += 1

    def _write(self, step: int, vectors: dict[int, Tensor]) -> None:
        scalars: dict[str, float] = {}
        for k, stage in enumerate(self.stages):
            vector = vectors[k].cpu()
            raw = dict(zip(_RAW, vector[: len(_RAW)].tolist()))
            for key in _RAW:
                total = self._totals[k]
                total[key] = max(total[key], raw[key]) if key == "delay_max" else total[key] + raw[key]
            self._totals[k]["skipped_updates"] = raw["skipped_updates"]
            keys = stage.report_keys()
            values = vector[len(_RAW) : len(_RAW) + len(keys)].tolist()
            scalars.update({key: v for key, v in zip(keys, values) if not math.isnan(v)})
            scalars.update({f"pipeline/stage{k}/{key}": v for key, v in shares(raw).items()})
            if stage.last:
                scalars["train/samples_per_s"] = shares(raw)["samples_per_s"]
        scalars["train/lr"] = self.method.optimizers[0].param_groups[0]["lr"]
        self.tracker.scalars(scalars, step)
        if step in self.eval_steps:
            for k, stage in enumerate(self.stages):
                offset = len(_RAW) + len(stage.report_keys())
                stage.load_state_vector(vectors[k][offset:].to(self.device), self.eval_model)
            results = {f"test/{key}": v for key, v in self.data.evaluate(self.eval_model).items()}
            self.tracker.scalars(results, step, history=True)
            log.info(
                "step %d/%d: test error %.2f%%, test loss %.4f",
                step,
                self.total,
                100 * results["test/error"],
                results["test/loss"],
            )
            settings = self._settings()
            self.tracker.write_metrics("running", steps=step, total_steps=self.total, parallel=settings)

    def _settings(self) -> dict[str, Any]:
        return {
            "stages": self.world,
            "boundaries": self.boundaries,
            "staleness": self.staleness,
            "backend": self.backend,
        }

    def _summary(self, status: str, step: int, **extra: Any) -> dict[str, Any]:
        per_stage = [{k: round(v, 4) for k, v in shares(total).items()} for total in self._totals]
        last = self._totals[-1]
        return self.tracker.write_metrics(
            status,
            steps=step,
            total_steps=self.total,
            test_error=self.tracker.last.get("test/error"),
            test_loss=self.tracker.last.get("test/loss"),
            wall_time_s=time.perf_counter() - self.began,
            samples_per_s=last["samples"] / max(last["wall_s"], 1e-9),
            skipped_updates=int(sum(t["skipped_updates"] for t in self._totals)),
            parallel=self._settings(),
            stages=per_stage,
            **extra,
        )
