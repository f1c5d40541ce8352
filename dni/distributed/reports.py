"""What each stage measures, and how rank 0 turns every stage's reports into the run's record.

At every report step (each `log_every` and `eval_every` step, and the last) a stage sends rank 0
one float64 vector: the raw measurements of its window (`RAW`), its scalars (`Stage.report_keys`),
and at evaluation steps its blocks' weights. Rank 0 writes a step once every stage has reported
it: TensorBoard scalars, `pipeline/stage{k}/...` for where each stage's time went, and the test
metrics of the model assembled from the stages' weights of that same step.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from dni.distributed.links import Inbox
from dni.distributed.stage import Stage
from dni.run import Run

log = logging.getLogger(__name__)

# A stage's raw measurements over one report window, in this order.
RAW = (
    "wall_s",  # window wall time, less reporting and evaluation
    "cpu_s",  # CPU time of the stage's main thread in the window (less on a busy machine)
    "samples",
    "wait_input_s",  # blocked on the activation from the stage below
    "wait_target_s",  # blocked on a target from the stage above (the staleness bound)
    "send_s",  # handing messages to the sender thread (only long when the peer falls behind)
    "checkpoint_s",  # saving checkpoints (on rank 0 also waiting for the reports up to them)
    "delay_sum",  # staleness of the targets used: newer batches run before each one arrived
    "delay_count",
    "delay_max",
    "skipped_updates",  # by the divergence guard, so far
)


class StageClock:
    """Where a stage's time goes within one report window, and in total (the run's own wall
    time and throughput are `dni.run.Clock`'s)."""

    def __init__(self) -> None:
        self.window = dict.fromkeys(RAW, 0.0)
        self.total = dict.fromkeys(RAW, 0.0)
        self.started, self.cpu_started = time.perf_counter(), time.thread_time()
        self.excluded = 0.0

    @contextmanager
    def waiting(self, kind: str) -> Iterator[None]:
        """Time spent in the block counts as `kind` ("wait_input", "wait_target", "send",
        "checkpoint")."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.window[f"{kind}_s"] += time.perf_counter() - began

    @contextmanager
    def aside(self) -> Iterator[None]:
        """Time spent in the block (reporting, evaluation) is not training time."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began

    def delay(self, batches: int) -> None:
        """A target was used `batches` batches after its own (its staleness)."""
        self.window["delay_sum"] += batches
        self.window["delay_count"] += 1
        self.window["delay_max"] = max(self.window["delay_max"], batches)

    def close_window(self, skipped: int) -> list[float]:
        """The window's measurements in `RAW` order; the next window starts now."""
        now = time.perf_counter()
        self.window["wall_s"] = now - self.started - self.excluded
        self.window["cpu_s"] = time.thread_time() - self.cpu_started  # reporting included: small
        self.window["skipped_updates"] = skipped
        values = [self.window[k] for k in RAW]
        accumulate(self.total, dict(zip(RAW, values)))
        self.window = dict.fromkeys(RAW, 0.0)
        self.started, self.cpu_started, self.excluded = now, time.thread_time(), 0.0
        return values


def accumulate(total: dict[str, float], window: dict[str, float]) -> None:
    """Add one window's raw measurements to `total`."""
    for key in RAW:
        if key == "delay_max":
            total[key] = max(total[key], window[key])
        elif key == "skipped_updates":
            total[key] = window[key]  # already a running count
        else:
            total[key] += window[key]


def shares(raw: dict[str, float]) -> dict[str, float]:
    """Throughput, the shares of wall time, and staleness, from raw measurements."""
    wall = max(raw["wall_s"], 1e-9)
    waits = raw["wait_input_s"] + raw["wait_target_s"] + raw["send_s"] + raw["checkpoint_s"]
    out = {
        "samples_per_s": raw["samples"] / wall,
        "compute_share": max(0.0, 1.0 - waits / wall),  # not waiting on a peer nor saving
        "cpu_share": min(1.0, raw["cpu_s"] / wall),  # of which the main thread ran on a core
        "wait_input_share": raw["wait_input_s"] / wall,
        "wait_target_share": raw["wait_target_s"] / wall,
        "send_share": raw["send_s"] / wall,
        "checkpoint_share": raw["checkpoint_s"] / wall,
    }
    if raw["delay_count"]:
        out["staleness_mean"] = raw["delay_sum"] / raw["delay_count"]
        out["staleness_max"] = raw["delay_max"]
    return out


def where_time_went(rank: int, stage: Stage, raw: dict[str, float]) -> str:
    """Where the time of stage `rank` went over the run, in a line for its log."""
    mine = shares(raw)
    waits = f"waiting for input {100 * mine['wait_input_share']:.0f}%"
    late = ""
    if stage.sends_targets:
        waits += f", for targets {100 * mine['wait_target_share']:.0f}%"
        late = f"; targets {mine.get('staleness_mean', 0.0):.2f} batches late on average"
    return (
        f"stage {rank}: {mine['samples_per_s']:.0f} samples/s; computing {100 * mine['compute_share']:.0f}%, "
        f"{waits}, sending {100 * mine['send_share']:.0f}%, checkpoints {100 * mine['checkpoint_share']:.1f}%"
        f"{late}"
    )


def encode(stage: Stage, raw: list[float], scalars: dict[str, Tensor], weights: str | None) -> Tensor:
    """A stage's report: raw measurements, its scalars (NaN when missing), and its weights if
    asked: "blocks" (for evaluation), or "full" (with the synthesizers', for diagnostics)."""
    values = list(raw)
    for key in stage.report_keys():
        value = scalars.get(key)
        values.append(float(value) if value is not None else math.nan)
    device = next(stage.method.model.parameters()).device
    parts = [torch.tensor(values, dtype=torch.float64, device=device)]
    if weights:
        parts.append(stage.state_vector(full=weights == "full"))
    return torch.cat(parts)


def report_buffers(stage: Stage, steps: list[int], weights: dict[int, str]) -> Callable[[int], Tensor]:
    """What allocates the buffer for report i of `stage`, which rank 0 receives into (see
    `encode`; `weights`: what weights the report of a step carries)."""
    device = next(stage.method.model.parameters()).device
    size = len(RAW) + len(stage.report_keys())
    sizes = [size + (stage.state_size(weights[s] == "full") if s in weights else 0) for s in steps]
    return lambda i: torch.empty(sizes[i], dtype=torch.float64, device=device)


class Record:
    """Rank 0's record of the pipeline's run, kept through `run` (`dni.run.Run`): each stage's
    reports, written once every stage has reported a step, in step order; the test metrics of
    the model assembled from the stages' weights of that step; and at the steps `diagnostics`
    names, the gradient fidelity of the method assembled likewise, on that step's batch.

    `add` takes rank 0's own reports, `collect` the others' from `inboxes` (stage -> inbox).
    `steps` are the report steps, `logged` those whose scalars are written, `weights` what
    weights the reports of a step carry ("blocks" or "full"), `eval_steps` and `diagnostics`
    the steps after which the assembled model is tested and measured.
    """

    def __init__(
        self,
        run: Run,
        stages: list[Stage],
        data: Any,
        schedule: dict[str, Any],
        inboxes: dict[int, Inbox],
    ):
        self.run, self.stages, self.data, self.inboxes = run, stages, data, inboxes
        self.steps, self.logged = schedule["steps"], schedule["logged"]
        self.eval_steps, self.diagnostics = schedule["eval_steps"], schedule["diagnostics"]
        method = stages[0].method
        # Its learning rate is logged as `train/lr`, as one process logs the first optimiser's.
        self.lr_group = method.optimizers[0].param_groups[0]
        # Assembled from the stages' weights of one step; until the first, all ranks' initial ones.
        self.assembled = copy.deepcopy(method)
        self.batches: dict[int, tuple[Tensor, Tensor]] = {}  # the batch each measurement is taken on
        self.assembled_step: int | None = None  # a step written whose measurement awaits its batch
        self.arrived: dict[int, dict[int, Tensor]] = {}
        self.written = 0
        self.totals = [dict.fromkeys(RAW, 0.0) for _ in stages]
        run.measures = self.measures

    def measures(self) -> dict[str, Any]:
        """What the stages measured over the run, for `metrics.json`."""
        last = self.totals[-1]
        return {
            "samples_per_s": last["samples"] / max(last["wall_s"], 1e-9),
            "skipped_updates": int(sum(t["skipped_updates"] for t in self.totals)),
            "stages": [{k: round(v, 4) for k, v in shares(t).items()} for t in self.totals],
        }

    def state_dict(self) -> dict:
        return {"totals": self.totals}

    def load_state_dict(self, state: dict) -> None:
        self.totals = [{**dict.fromkeys(RAW, 0.0), **t} for t in state["totals"]]

    def diagnose(self, step: int, batch: tuple[Tensor, Tensor]) -> None:
        """Measure after `step` on `batch` (the next one), on the method assembled from every
        stage's weights of that step: now for step 0, whose weights are every rank's initial
        ones, and for a step already written (its weights stay assembled: no later step can be
        written before rank 0 itself has trained and reported it); else once they are in (a
        resumed run's first step too: rank 0 holds only its own stage's)."""
        if step == 0 or step == self.assembled_step:
            self.assembled_step = None
            self._diagnose(step, batch)
        else:
            self.batches[step] = batch

    def add(self, stage: int, step: int, vector: Tensor) -> None:
        self.arrived.setdefault(step, {})[stage] = vector

    def collect(self, block: bool, through: int | None = None) -> None:
        """Take the reports that have arrived and write every step that is complete; with
        `block`, wait for all of them (`through` a step: for those up to it)."""
        for k, inbox in self.inboxes.items():
            while inbox.received < len(self.steps) and (vector := inbox.poll()) is not None:
                self.add(k, self.steps[inbox.received - 1], vector)
        while self.written < len(self.steps):
            step = self.steps[self.written]
            if through is not None and step > through:
                return
            got = self.arrived.setdefault(step, {})
            if len(got) < len(self.stages):
                if not block:
                    return
                for k, inbox in self.inboxes.items():
                    if k not in got:
                        got[k] = inbox.get()  # reports arrive in step order: this is `step`'s
            self._write(step, self.arrived.pop(step))
            self.written += 1

    def _write(self, step: int, vectors: dict[int, Tensor]) -> None:
        scalars: dict[str, float] = {"train/lr": self.lr_group["lr"]}
        for k, stage in enumerate(self.stages):
            vector = vectors[k].cpu()
            raw = dict(zip(RAW, vector[: len(RAW)].tolist()))
            accumulate(self.totals[k], raw)
            keys = stage.report_keys()
            values = vector[len(RAW) : len(RAW) + len(keys)].tolist()
            scalars.update({key: v for key, v in zip(keys, values) if not math.isnan(v)})
            scalars.update({f"pipeline/stage{k}/{key}": v for key, v in shares(raw).items()})
            if stage.last:  # what leaves the pipeline
                scalars["train/samples_per_s"] = shares(raw)["samples_per_s"]
            if step in self.eval_steps or step in self.diagnostics:
                weights = vectors[k][len(RAW) + len(keys) :]
                stage.load_state_vector(weights, self.assembled, full=step in self.diagnostics)
        if step in self.logged:
            self.run.tracker.scalars(scalars, step)
        if step in self.eval_steps:
            results = {f"test/{key}": v for key, v in self.data.evaluate(self.assembled.model).items()}
            self.run.evaluated(step, results)
        if step in self.diagnostics:
            if step in self.batches:
                self._diagnose(step, self.batches.pop(step))
            else:  # written at its checkpoint, before the loop reached the next batch
                self.assembled_step = step

    def _diagnose(self, step: int, batch: tuple[Tensor, Tensor]) -> None:
        """Gradient fidelity of the assembled method after `step`, logged at `step + 1` as one
        process logs the measurement it takes before training on that batch."""
        self.assembled.train()
        values = self.assembled.diagnostics(*batch)
        self.run.tracker.scalars(values, step + 1)
