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
from dni.methods import DecoupledNeuralInterfaces
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
}


def build(settings: dict) -> tuple[DecoupledNeuralInterfaces, object, Trainer]:
    """A small cDNI FCN on synthetic data, seeded, and its budget."""
    settings = {**DEFAULTS, **settings}
    torch.manual_seed(0)
    data = synthetic(num_train=512, num_test=128, separation=0.3)
    model = FCN(data.input_shape, data.num_classes, depth=settings["depth"], width=settings["width"])
    method = DecoupledNeuralInterfaces(
        model,
        partial(torch.optim.Adam, lr=1e-3),
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


def fail_after(step: int) -> None:
    """Fault injection: this rank raises right after its stage has run batch `step`, while the
    messages of that batch are still in flight to live peers."""
    from dni.distributed.stage import Stage

    run, done = Stage.run, [0]

    def failing(self, *args, **kwargs):
        out = run(self, *args, **kwargs)
        done[0] += 1
        if done[0] == step:
            raise RuntimeError(f"injected failure after batch {step}")
        return out

    Stage.run = failing


def slow_down(seconds: float) -> None:
    """Every batch of this rank's stage takes `seconds` longer, so that a test can kill the run
    between two chosen steps."""
    import time

    from dni.distributed.stage import Stage

    run = Stage.run

    def slow(self, *args, **kwargs):
        time.sleep(seconds)
        return run(self, *args, **kwargs)

    Stage.run = slow


def main(settings: dict) -> None:
    from dni.distributed import Pipeline

    if settings.get("fail_rank") == int(os.environ.get("RANK", "0")):
        fail_after(settings["fail_at"])
    if settings.get("step_sleep"):
        slow_down(settings["step_sleep"])

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    method, data, trainer = build(settings)
    pipeline = Pipeline(staleness=settings.get("staleness", 1), timeout=settings.get("timeout", 30))
    pipeline.fit(method, data, trainer, settings["out"], resume=settings.get("resume"))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
