"""One rank of a pipeline run for tests/test_pipeline.py, without Hydra (it starts faster).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \\
        python -m tests.pipeline_worker '{"out": "/tmp/run", "staleness": 0, "steps": 30}'

Run from the repository's root with `-m`, so that it imports this checkout's `dni`. The same
`build` gives the single-process reference in the test itself.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from functools import partial

import torch

from dni.data import synthetic
from dni.methods import DecoupledGreedy, DecoupledNeuralInterfaces, Method
from dni.methods.dgl import auxiliary_head
from dni.models import FCN
from dni.synthesizers import LinearSynthesizer, MLPSynthesizer
from dni.training import Trainer

DEFAULTS = {
    "steps": 30,
    "depth": 3,
    "width": 64,
    "batch_size": 32,
    "eval_every": 10,
    "forward_unlock": False,
    "checkpoint_every": 1000,
    "diagnostics_every": 0,
    "method": "cdni",
}


def build(settings: dict) -> tuple[Method, object, Trainer]:
    """A small cDNI (or, with `"method": "dgl"`, DGL) FCN on synthetic data, seeded, and its
    budget."""
    settings = {**DEFAULTS, **settings}
    torch.manual_seed(0)
    data = synthetic(num_train=512, num_test=128, separation=0.3)
    model = FCN(data.input_shape, data.num_classes, depth=settings["depth"], width=settings["width"])
    adam = partial(torch.optim.Adam, lr=1e-3)
    if settings["method"] == "dgl":
        method = DecoupledGreedy(model, adam, head=partial(auxiliary_head, hidden=[16]))
    else:
        method = DecoupledNeuralInterfaces(
            model,
            adam,
            partial(MLPSynthesizer, hidden=[32]) if settings.get("mlp") else LinearSynthesizer,
            conditioned=True,
            forward_unlock=settings["forward_unlock"],
            input_synthesizer=partial(MLPSynthesizer, hidden=[32], zero_init=False),
        )
    trainer = Trainer(
        steps=settings["steps"],
        batch_size=settings["batch_size"],
        eval_every=settings["eval_every"],
        log_every=1,
        checkpoint_every=settings["checkpoint_every"],
        diagnostics_every=settings["diagnostics_every"],
        progress=False,
    )
    return method, data, trainer


def fail_after(step: int, stage_class: type) -> None:
    """Fault injection: this rank raises right after its stage (of class `stage_class`) has run batch
    `step`, while the messages of that batch are still in flight to live peers."""
    run, done = stage_class.run, [0]

    def failing(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        done[0] += 1
        if done[0] == step:
            raise RuntimeError(f"injected failure after batch {step}")
        return out

    stage_class.run = failing


def slow_down(seconds: float, stage_class: type) -> None:
    """Every batch of this rank's stage (of class `stage_class`) takes `seconds` longer, so that a test
    can kill the run between two chosen steps."""
    import time

    run = stage_class.run

    def slow(self, *args, **kwargs):
        time.sleep(seconds)
        return run(self, *args, **kwargs)

    stage_class.run = slow


def record_sends(path: str) -> None:
    """Count the messages this rank sends, by the kind of link each travels on ("activations 0
    -> 1", "reports 1 -> 0", ...: `pair_groups` names them), and write the counts with the kinds
    of link made at all into the JSON file `path` when the run is over."""
    import atexit
    from collections import Counter

    import torch.distributed as dist

    from dni.distributed import pipeline

    kinds: dict[int, str] = {}
    sent: Counter = Counter()
    pair_groups, isend = pipeline.pair_groups, dist.isend

    def named_groups(*args, **kwargs):
        groups = pair_groups(*args, **kwargs)
        kinds.update({id(g): f"{kind} {source} -> {dest}" for (kind, source, dest), g in groups.items()})
        return groups

    def counted_isend(tensor, dst=None, group=None, **kwargs):
        sent[kinds.get(id(group), "other")] += 1
        return isend(tensor, dst=dst, group=group, **kwargs)

    pipeline.pair_groups, dist.isend = named_groups, counted_isend

    def write() -> None:
        with open(path, "w") as f:
            json.dump({"links": sorted(kinds.values()), "sent": dict(sent)}, f)

    atexit.register(write)


def main(settings: dict) -> None:
    from dni.distributed import Pipeline

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    method, data, trainer = build(settings)
    rank = int(os.environ.get("RANK", "0"))
    stage_class = type(method.pipeline_stage(0, []))
    if settings.get("fail_rank") == rank:
        fail_after(settings["fail_at"], stage_class)
    if settings.get("step_sleep"):
        slow_down(settings["step_sleep"], stage_class)
    if settings.get("record_sends"):
        record_sends(f"{settings['record_sends']}.rank{rank}.json")
    pipeline = Pipeline(staleness=settings.get("staleness", 1), timeout=settings.get("timeout", 30))
    pipeline.fit(method, data, trainer, settings["out"], resume=settings.get("resume"))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
