"""Decoupled training across processes (DNI, cDNI, DGL): one stage per rank, no update locking.

Stage k receives the activation of batch t from stage k-1, trains its blocks on it at
once from their synthetic gradients (DGL: from their auxiliary classifiers' losses), sends
its output on without blocking, and moves on to batch t+1. For DNI the target for its last
synthesizer comes back from stage k+1 whenever stage k+1 has run that batch, and is used as
soon as it is seen; only when more than `staleness` of its batches still lack their target
does the stage wait. `staleness=0` is the synchronous schedule, which reproduces the
single-process step exactly. DGL sends nothing back (`Stage.sends_targets`), so it has no
backward links, no staleness, and reproduces the single-process step exactly.

Every rank reads the same deterministic batch stream (same data, same seed), so labels and
the network input (for cDNI and forward unlocking) are at hand everywhere without being
sent. Rank 0 writes the run folder: it gathers each stage's reports (throughput, where the
time went, staleness, synthesizer losses) and, at evaluation and diagnostics steps, the
stages' weights (and synthesizers), evaluates and measures the assembled model and writes
TensorBoard and `metrics.json`, without stopping the pipeline to do so. Every rank saves its
stage at the same checkpoint steps, where no target is in flight, and the ranks resume from
the newest checkpoint all of them hold (`dni.run.Run` keeps the run, as for one process).

Launch one process per stage with torchrun; `Pipeline.fit` reads the rank from the
environment torchrun sets. With one process (no torchrun) it runs a single stage locally.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from dni import checkpoint
from dni.distributed.links import Inbox, Link, Outbox, PipelineError, mark_failed, pair_groups
from dni.distributed.reports import Record, StageClock, encode, report_buffers, shares, where_time_went
from dni.distributed.stage import Stage, balanced_boundaries, check_boundaries
from dni.errors import CheckpointError, ConfigError, FolderInUse, Interrupted
from dni.methods.base import Method
from dni.run import Run, StopSignals, architecture, hold, info_of
from dni.tracking import METRICS_FILE, folder_lock, read_metrics, write_json
from dni.training import Progress, Task, Trainer

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")
_LOCK_GRACE_S = 3.0
# How long a rank that lost a peer waits for a stop signal of its own before calling it a failure.
_SIGNAL_GRACE_S = 1.0


class Pipeline:
    """How a decoupled method (DNI, cDNI or DGL) is split over processes, and the schedule
    between them.

    Args:
        stages: number of stages; None for one per process launched (torchrun's WORLD_SIZE).
        boundaries: 1-based blocks after which the next stage starts, e.g. [2]; each must be
            followed by an interface. None splits the interfaces so that the stages' compute
            is as even as it can be.
        staleness: how many newer batches a stage may train on before the target of a batch
            must have arrived; 0 is the synchronous schedule (exactly the single-process step,
            unless `p_update < 1`, whose random draws differ between one process and K). DGL
            sends no targets, so it has no use for this bound.
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
            raise ConfigError(f"stages={stages!r} is not allowed; give an integer >= 1, or null")
        if not isinstance(staleness, int) or staleness < 0:
            raise ConfigError(f"staleness={staleness!r} is not allowed; give an integer >= 0")
        if not timeout > 0:
            raise ConfigError(f"timeout={timeout!r} is not allowed; give a number of seconds > 0")
        if backend not in BACKENDS:
            raise ConfigError(f"backend={backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
        self.stages, self.staleness, self.timeout, self.backend = stages, staleness, float(timeout), backend
        self.boundaries = list(boundaries) if boundaries is not None else None
        # One GPU per rank: claim it before the runner builds anything on "cuda".
        if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

    def fit(
        self,
        method: Method,
        data: Task,
        trainer: Trainer,
        out_dir: str | os.PathLike,
        *,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        hparams: dict[str, Any] | None = None,
        resume: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Train this rank's stage of `method` on `data` for `trainer`'s budget and schedule
        (steps or epochs, batch_size, eval_every, log_every, checkpoint_every, keep_checkpoints,
        seed, progress). Every rank must have built `method` from the same seed. Rank 0 writes
        into `out_dir` and returns the final metrics; other ranks return their own summary.

        Every rank saves its stage into `out_dir/checkpoints` at the same steps, and resumes,
        as one process does, from `resume` (a run folder, or its `checkpoints/step_*.pt`) or
        else from the newest checkpoint in `out_dir` that every rank holds intact."""
        cuts = method.pipeline_stage(0, []).cuts  # a rule that cannot be split says so here
        if trainer.compile:
            raise ConfigError("compile=true is not supported with parallel=pipeline yet; set it to false")
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        stages = self.stages or world
        if stages != world:
            raise ConfigError(
                f"stages={stages} needs one process per stage but {world} were launched; run "
                f"torchrun --nproc_per_node={stages} -m dni ..., or set stages=null"
            )
        device = next(method.model.parameters()).device
        backend = self._backend(device)
        owns_group = world > 1 and not dist.is_initialized()
        if owns_group:
            dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout))
        boundaries = (
            check_boundaries(self.boundaries, stages, cuts)
            if self.boundaries is not None
            else balanced_boundaries(method, stages)
        )
        if world > 1:
            _check_agreement(_fingerprint(method, data, trainer, boundaries, self.staleness, hparams))
            out_dir = _agree_on_folder(Path(out_dir), rank)
        out_dir = Path(out_dir)
        try:
            with hold(out_dir, lock=rank == 0, stop_at_once=True) as signals:
                run = _StageRun(self, method, data, trainer, rank, world, boundaries, backend)
                result = run.fit(out_dir, scheduler, hparams, signals, resume)
        except BaseException as error:
            # Its links may still be blocked on live peers: see `links._leave_at_once`.
            mark_failed(getattr(error, "exit_code", 1))
            if rank > 0:
                # A lost peer may be rank 0 dying: its lock goes only once all its files are closed.
                grace = _LOCK_GRACE_S if isinstance(error, PipelineError) else 0.0
                _record_if_rank0_is_gone(out_dir, f"rank {rank}: {error}", grace)
            raise
        if owns_group:  # only after success: a failed rank exits and its peers see it at once
            dist.barrier()
            dist.destroy_process_group()
        return result

    def _backend(self, device: torch.device) -> str:
        wanted = "nccl" if device.type == "cuda" else "gloo"
        if self.backend not in ("auto", wanted):
            raise ConfigError(
                f"backend={self.backend} does not fit a model on {device.type}; use "
                f"backend={wanted} (or auto)"
            )
        return wanted


def _record_if_rank0_is_gone(out_dir: Path, message: str, grace_s: float) -> None:
    """Rank 0 records the run; when it died (killed, out of memory) it could not, and the
    run folder would say "running" forever. Its lock on the folder tells: the kernel drops it
    with the process (within `grace_s`, as the dying process's files are closed). Then this
    surviving rank writes the failure, unless rank 0 managed to write an end of its own first
    (its status is no longer "running")."""
    if not (out_dir / METRICS_FILE).is_file():  # not a folder this machine shares with rank 0
        return
    deadline = time.monotonic() + grace_s
    while True:
        try:
            with folder_lock(out_dir):
                previous = read_metrics(out_dir) or {}
                if previous.get("status", "running") == "running":
                    write_json(out_dir / METRICS_FILE, {**previous, "status": "failed", "error": message})
            return
        except FolderInUse:  # rank 0 is alive (it records the run), or not quite gone yet
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        except OSError:  # a full disk: the error still reaches this rank's log
            return


def _fingerprint(
    method: Method,
    data: Task,
    trainer: Trainer,
    boundaries: list[int],
    staleness: int,
    hparams: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What every rank must agree on: the ranks exchange no labels, inputs or shapes, and each
    builds its own optimisers, so every setting of the run's config (`hparams`) is compared too."""
    _, y = next(data.batches(trainer.batch_size, trainer.seed))
    return {
        "data": (data.name, data.num_train),
        "first labels": y[:16].tolist(),
        "budget": (trainer.total_steps(data.num_train), trainer.batch_size, trainer.seed),
        "schedule": (
            trainer.log_every,
            trainer.eval_every,
            trainer.checkpoint_every,
            trainer.diagnostics_every,
            staleness,
        ),
        "activations": method.model.activation_shapes(),
        "parameters": sum(p.numel() for p in method.parts.parameters()),
        "boundaries": boundaries,
        **{f"config {key}": value for key, value in (hparams or {}).items()},
    }


def _check_agreement(mine: dict[str, Any]) -> None:
    problem = disagreement(_gather(mine, dist.get_world_size()))
    if problem:
        raise ConfigError(problem)


def disagreement(fingerprints: list[dict[str, Any]]) -> str | None:
    """A sentence naming the first rank whose settings differ from rank 0's, or None."""
    for rank, other in enumerate(fingerprints):
        differ = sorted(k for k in fingerprints[0] if other.get(k) != fingerprints[0][k])
        if differ:
            return (
                f"rank {rank} differs from rank 0 in {', '.join(differ)}; launch every rank with the "
                "same command, overrides and data"
            )
    return None


def _agree_on_folder(out_dir: Path, rank: int) -> Path:
    """Rank 0's run folder is the run folder. Hydra, run by every rank, may have named the
    others' differently (`${now:...}` ticks between ranks); an empty one is removed."""
    shared = [str(out_dir)]
    dist.broadcast_object_list(shared, src=0)
    chosen = Path(shared[0])
    if rank > 0 and out_dir.resolve() != chosen.resolve() and out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    return chosen


class _StageRun:
    """One rank's part of one run: its stage, its links, its schedule and its checkpoints (rank
    0 also keeps the record). `fit` is the whole of it; the steps are `Trainer.loop`'s, as in
    one process, and this is what the loop drives (`dni.training.Steps`)."""

    def __init__(
        self,
        pipeline: Pipeline,
        method: Method,
        data: Task,
        trainer: Trainer,
        rank: int,
        world: int,
        boundaries: list[int],
        backend: str,
    ):
        self.method, self.data, self.trainer, self.rank, self.world = method, data, trainer, rank, world
        self.stages: list[Stage] = [method.pipeline_stage(k, boundaries) for k in range(world)]
        self.stage = self.stages[rank]
        self.total = trainer.total_steps(data.num_train)
        self.staleness, self.timeout, self.backend = pipeline.staleness, pipeline.timeout, backend
        self.boundaries = boundaries
        self.device = next(method.model.parameters()).device
        self.clock = StageClock()
        self.record: Record | None = None
        self.pending: deque[tuple[int, Tensor, Tensor, int]] = deque()  # batch, output, labels, regressions
        self.regressions = 0  # targets used so far: a later count means the synthesizer stepped

    # -- the run ------------------------------------------------------------------------
    def fit(
        self,
        out_dir: Path,
        scheduler: Callable | None,
        hparams: dict[str, Any] | None,
        signals: StopSignals,
        resume: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        run, restored = self._begin(out_dir, scheduler, hparams, resume)
        self.run, start = run, run.start
        self._schedule(start)
        self._links(start)
        stage = self.stage
        first, last = (
            stage.start + 1,
            stage.end - 1 if stage.last else stage.end,
        )  # the head is the last block
        where = f"block {first}" if first == last else f"blocks {first}-{last}"
        where = "the head" if last < first else where + (" and the head" if stage.last else "")
        targets = f"staleness bound {self.staleness}" if stage.sends_targets else "no targets sent back"
        log.info("stage %d of %d: %s, %s, %s", self.rank, self.world, where, targets, self.backend)
        if self.rank == 0:
            self._start_record(run, restored)
        if start in self.report_set:  # a resumed run measures where it starts: every stage reports
            self._report(start, {})
        # Rank 0 shows the run's progress: a bar on a terminal, else a line every so many steps.
        mine = self.rank == 0
        bar = Progress(
            self.total, start, self.trainer.progress and mine, self.trainer.progress_every if mine else 0
        )
        self.method.train()
        try:
            with run.ending():
                try:
                    self.trainer.loop(run, self, signals, bar)
                except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through `StopSignals(at_once=True)`
                    raise self._interrupted(signals.signum or signal.SIGINT) from None
                except PipelineError:
                    if signals.arrives(_SIGNAL_GRACE_S):
                        # Ctrl-C reaches every rank; a peer that handled it first looks lost from here.
                        raise self._interrupted(signals.signum) from None
                    raise
                log.info("%s", where_time_went(self.rank, stage, self.clock.total))
                if self.record is not None:
                    return run.summary("completed", run.step)
                return {
                    "status": "completed",
                    "steps": run.step,
                    "test_error": None,
                    **shares(self.clock.total),
                }
        finally:
            bar.close()

    def _begin(
        self,
        out_dir: Path,
        scheduler: Callable | None,
        hparams: dict[str, Any] | None,
        resume: str | os.PathLike | None,
    ) -> tuple[Run, dict[str, Any] | None]:
        """This rank's `Run`, begun from the checkpoint every rank agrees on (see
        `_agreed_checkpoint`), whose part for this stage is loaded; and its state, or None."""
        info = info_of(self.method, self.data)
        signature = {
            **info,
            "architecture": architecture(self.stage.parts()),
            "stage": f"{self.rank} of {self.world}",
            "boundaries": self.boundaries,
        }
        settings = {
            "stages": self.world,
            "boundaries": self.boundaries,
            "staleness": self.staleness,
            "backend": self.backend if self.world > 1 else "local",
        }
        run = Run(
            out_dir,
            info,
            self.total,
            signature,
            self.trainer.checkpoint_every,
            # Ranks are at most one checkpoint apart when one dies: two kept always share one.
            max(2, self.trainer.keep_checkpoints),
            records=self.rank == 0,
            shard=None if self.rank == 0 else f"stage{self.rank}",
            fields={"parallel": settings},
            batches=self.data.batches(self.trainer.batch_size, self.trainer.seed),
            schedulers=[scheduler(o) for o in self.stage.optimizers()] if scheduler else [],
            data=self.data,
        )
        found = _agreed_checkpoint(resume, run, self.world, self.device)
        if found is not None:
            self.stage.load_state_dict(found[1]["stage"])
        return run, run.begin(found, hparams)

    def _start_record(self, run: Run, restored: dict[str, Any] | None) -> None:
        """Rank 0's record of the run (`reports.Record`), as the checkpoint left it."""
        schedule = {
            "steps": self.report_steps,
            "logged": self.logged,
            "eval_steps": self.eval_steps,
            "diagnostics": self.diagnosed - {0},
        }
        self.record = Record(run, self.stages, self.data, schedule, self.report_inboxes)
        if restored:
            self.record.load_state_dict(restored["record"])

    def _interrupted(self, signum: int) -> Interrupted:
        run = self.run
        return Interrupted(
            signum, run.step, str(run.out_dir), saved=False, last_checkpoint=run.last_checkpoint
        )

    def _schedule(self, start: int) -> None:
        """The steps from `start` whose reports rank 0 writes: each `log_every` and `eval_every`
        step after it, the last, and each `diagnostics_every` step, whose reports carry the
        stages' synthesizers too: `start` itself when a resumed run begins on one (the
        checkpoint's own measurement was logged at `start + 1`, which the resumed run purges),
        but not step 0, whose weights are every rank's initial ones."""
        trainer, total = self.trainer, self.total
        self.diagnosed = {s for s in range(start, total) if trainer.diagnoses(s, total)}
        self.eval_steps = {s for s in range(start + 1, total + 1) if trainer.evaluates(s, total)}
        self.logged = {s for s in range(start + 1, total + 1) if trainer.logs(s, total)} | self.eval_steps
        self.report_steps = sorted(self.logged | (self.diagnosed - {0}))
        self.report_set = set(self.report_steps)
        self.weights = {s: "blocks" for s in self.eval_steps}
        self.weights.update({s: "full" for s in self.diagnosed - {0}})

    def _links(self, start: int) -> None:
        k, stage = self.rank, self.stage
        self.inputs = self.targets_in = None  # inboxes
        self.activations = self.targets_out = self.reports_out = None  # outboxes
        self.report_inboxes: dict[int, Inbox] = {}
        if self.world == 1:
            return
        backward = stage.sends_targets  # DGL sends nothing back: no target links at all
        groups = pair_groups(self.world, self.backend, self.timeout, targets=backward)
        shapes = self.method.model.activation_shapes()
        depth = self.staleness + 2  # messages queued for sending before `send` waits

        def link(kind: str, source: int, dest: int, describe: Callable[[int], str]) -> Link:
            peer = dest if source == k else source
            return Link(peer, groups[(kind, source, dest)], self.timeout, describe, self.device)

        def batches(shape: tuple[int, ...]) -> Callable[[int], Tensor]:
            return lambda i: torch.empty(self.trainer.batch_size, *shape, device=self.device)

        def activation(i: int) -> str:  # message i is batch start + i + 1
            return f"stage {k}: the activation of batch {start + i + 1}"

        def target(i: int) -> str:
            return f"stage {k}: the target of batch {start + i + 1}"

        count = self.total - start
        if not stage.first:
            inputs = link("activations", k - 1, k, activation)
            self.inputs = Inbox(inputs, count, batches(shapes[stage.start - 1]))
            if backward:
                self.targets_out = Outbox(link("targets", k, k - 1, target), depth)
        if not stage.last:
            self.activations = Outbox(link("activations", k, k + 1, activation), depth)
            if backward:
                targets = link("targets", k + 1, k, target)
                self.targets_in = Inbox(targets, count, batches(shapes[stage.end - 1]))
        if k > 0:
            self.reports_out = Outbox(link("reports", k, 0, lambda i: f"stage {k}: report {i + 1}"))
            return
        for j in range(1, self.world):

            def report(i: int, j: int = j) -> str:
                return f"stage 0: the report of stage {j} for step {self.report_steps[i]}"

            buffers = report_buffers(self.stages[j], self.report_steps, self.weights)
            self.report_inboxes[j] = Inbox(link("reports", j, 0, report), len(self.report_steps), buffers)

    # -- the steps `Trainer.loop` drives (`dni.training.Steps`) ---------------------------
    def diagnose(self, t: int, batch: tuple[Tensor, Tensor]) -> None:
        """Gradient fidelity is rank 0's: measured on the model assembled from every stage's
        weights of step `t`, once they are in (`Record.diagnose`)."""
        if self.record is not None:
            self.record.diagnose(t, batch)

    def train(self, t: int, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Step `t + 1` of this stage: its input (the batch, or the activation from the stage
        below), its blocks trained at once, its output sent on, and every target that has come
        back used; with more than `staleness` missing, wait for the oldest."""
        stage, clock = self.stage, self.clock
        labels = stage.labels(x, y)  # the same stream on every rank: labels need no sending
        predicted = stage.unlock(x, labels)  # forward unlocking: before the input is here
        if stage.first:
            h = x
        else:
            with clock.waiting("wait_input"):
                h = self.inputs.get()
            if stage.sends_targets:
                h.requires_grad_()  # its gradient is the target of the stage below
        out, metrics = stage.run(h, x, y, labels, predicted, self._target_sender(h))
        if not stage.last:
            with clock.waiting("send"):
                self.activations.send(out)
            if self.targets_in is not None:
                self.pending.append((t, out, labels, self.regressions))
        # At a checkpoint step (and the last) every target must be in: a whole state.
        self._use_targets(t, 0 if self.run.due(t + 1) else self.staleness)
        clock.window["samples"] += len(x)
        return metrics

    def after(self, step: int, metrics: dict[str, Tensor]) -> None:
        """Report `step` to rank 0 when it is a report step; rank 0 writes what is complete."""
        if step in self.report_set:
            self._report(step, metrics)
        if self.record is not None:
            with self.clock.aside():
                self.record.collect(block=False)

    def save(self, step: int) -> None:
        """This rank's part of the checkpoint of `step`. Every target of the stage's batches has
        been used (the schedule waits for them at a checkpoint step, as at the last), so the
        stage's state depends on the batches up to `step` alone, and no message needs saving:
        an activation still in flight is one the next stage's own checkpoint of `step` has
        used. Rank 0 first writes every report up to `step`, so its record is whole too."""
        with self.clock.waiting("checkpoint"):
            self.method.guard.check(step)
            if self.record is not None:
                self.record.collect(block=True, through=step)
            record = self.record.state_dict() if self.record is not None else None
            self.run.save(step, {"stage": self.stage.state_dict(), "record": record})

    def finish(self) -> None:
        """Deliver what is in flight, and on rank 0 write every report still to come."""
        for outbox in (self.activations, self.targets_out, self.reports_out):
            if outbox is not None:
                outbox.flush()
        if self.record is not None:
            self.record.collect(block=True)

    def _target_sender(self, h: Tensor) -> Callable[[Tensor | None], None] | None:
        """What sends the gradient of `h` (this step's input) to the stage below as its target;
        None where nothing is sent back."""
        if self.targets_out is None:
            return None

        def send(grad: Tensor | None) -> None:
            # No gradient (the guard skipped an update): NaN tells the stage below to skip too.
            with self.clock.waiting("send"):
                self.targets_out.send(grad if grad is not None else torch.full_like(h, math.nan))

        return send

    def _use_targets(self, t: int, bound: int) -> None:
        """Use every target that has arrived; wait while more than `bound` are missing."""
        pending = self.pending
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

    def _report(self, step: int, metrics: dict[str, Tensor]) -> None:
        """This stage's report of `step` (see `reports.encode`): to the record on rank 0, else
        sent there."""
        self.method.guard.check(step)  # the checks a step deferred (DGL's), read here in one go
        with self.clock.aside():
            raw = self.clock.close_window(self.method.guard.skipped)
            scalars = {**metrics, **self.stage.stats()}  # the stats after this step's targets
            vector = encode(self.stage, raw, scalars, weights=self.weights.get(step))
        if self.record is not None:
            self.record.add(0, step, vector)
        else:
            with self.clock.waiting("send"):
                self.reports_out.send(vector)


def _gather(value: Any, world: int) -> list[Any]:
    """`value` of every rank, in rank order."""
    if world == 1:
        return [value]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, value)
    return everyone


def _agreed_checkpoint(
    resume: str | os.PathLike | None, run: Run, world: int, device: torch.device
) -> tuple[Path, dict[str, Any]] | None:
    """This rank's part of the newest checkpoint that every rank holds intact, and its state;
    None when they share none (a fresh start).

    Each rank keeps its own part of a checkpoint (`checkpoint.path_of` with its shard; rank 0's
    is the run's `step_*.pt`); a rank killed while the others saved lacks the newest, so the
    ranks agree on the newest step all of them have and can read. `resume` is a run folder to
    take it from, or one of its `checkpoints/step_*.pt` for that step exactly."""
    folder, wanted = run.out_dir, None
    if resume is not None:
        path = Path(resume)
        if path.is_dir():
            folder = path
        else:
            wanted = checkpoint.step_of(path)
            if wanted is None or not path.is_file():
                raise CheckpointError(
                    f"resume={str(path)!r} is not a checkpoint of a pipeline run; point it at a run folder "
                    "or at its checkpoints/step_*.pt"
                )
            folder = path.parent.parent
    mine = [checkpoint.step_of(p, run.shard) for p in checkpoint.checkpoints(folder, run.shard)]
    common = set(mine)
    for theirs in _gather(mine, world):
        common &= set(theirs)
    candidates = sorted(common, reverse=True) if wanted is None else [wanted]
    for step in candidates:
        path = checkpoint.path_of(folder, step, run.shard)
        state, problem = None, None
        try:
            state = checkpoint.load(path, run.signature, device)
        except CheckpointError as error:
            problem = error
        problems = [p for p in _gather(str(problem) if problem else None, world) if p]
        if not problems:
            return path, state
        damaged = all("is corrupt or truncated" in p for p in problems)
        if wanted is not None or not damaged:
            raise CheckpointError(problems[0])
        log.warning("%s; resuming from an earlier checkpoint", problems[0].split("; point")[0])
    if resume is not None:
        raise CheckpointError(
            f"resume={str(resume)!r} holds no checkpoint that every stage has; point it at a run folder "
            "of a pipeline run with as many stages"
        )
    return None
