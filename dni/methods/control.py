"""The side-by-side control: any method, with a backprop twin trained beside it.

The twin is the same network from the same initial weights, with the same optimiser,
stepped on the same batches; the two runs' losses and test errors share TensorBoard charts.

Which "true gradient" each diagnostic uses:

- `align/{cosine,pearson,rel_error,sign_agreement}/blockK`: the method's weight gradient
  against autograd's gradient **at the method's own parameters** on the same batch. This
  is exact: it says how good the rule's update is where the rule actually is.
- `align_twin/{cosine,pearson,rel_error,sign_agreement}/blockK`: the method's weight
  gradient against the twin's backprop gradient **at the twin's parameters** on the same
  batch. The two networks start equal (so at the first step both keys agree) and drift
  apart as they train, so this mixes the rule's error with the distance between the runs.
- `control/relative_distance`: `|θ - θ_twin| / |θ_twin|` over all parameters, that distance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dni.errors import ConfigError
from dni.methods.base import Method, weight_alignment
from dni.methods.bprop import Backprop

if TYPE_CHECKING:
    from dni.distributed.stage import Stage


class Controlled(Method):
    """`method` plus its backprop twin `control`; the training loop sees one method.

    `name`, `model`, `loss` and `guard` are the method's (the twin answers to the same
    guard, so `guard.action` applies to both); `optimizers` are the method's followed by the
    twin's, so a scheduler drives both. `step` returns the method's metrics plus
    `control/train/loss` and `control/train/accuracy`; `eval_models` adds "control/test".

    Raises `ValueError` when the twin does not start from the method's weights: build it
    with `copy.deepcopy(model)` before the method's first step.
    """

    def __init__(self, method: Method, control: Backprop):
        self.method, self.control = method, control
        self.name, self.model, self.loss = method.name, method.model, method.loss
        self.guard = control.guard = method.guard
        _check_same_start(method.model, control.model)
        self.parts = nn.ModuleDict({"method": method.parts, "control": control.parts})
        self.optimizers = [*method.optimizers, *control.optimizers]

    def train(self) -> None:
        self.method.train()
        self.control.train()

    def eval_models(self) -> dict[str, nn.Module]:
        return {**self.method.eval_models(), "control/test": self.control.model}

    def compile(self) -> None:
        """Compile the method's modules and the twin's alike (see `Method.compile`)."""
        self.method.compile()
        self.control.compile()

    def pipeline_stage(self, index: int, boundaries: Sequence[int]) -> Stage:
        """Refused: the twin is trained by backprop through the whole network, in one process."""
        raise ConfigError(
            "control=true trains a backprop twin of the whole network in one process; set "
            "control=false with parallel=pipeline"
        )

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out = self.method.step(x, y)
        for key, value in self.control.step(x, y).items():
            out[f"control/{key if '/' in key else f'train/{key}'}"] = value
        return out

    def true_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return self.method.true_gradients(x, y)

    def parameter_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return self.method.parameter_gradients(x, y)

    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """The method's own diagnostics (`align/...` against autograd at its parameters) plus
        `align_twin/...` against the twin's gradient at the twin's parameters."""
        out = self.method.diagnostics(x, y)
        twin = self.control.parameter_gradients(x, y)
        out.update(weight_alignment(self.model, self.method.parameter_gradients(x, y), twin, "align_twin"))
        out["control/relative_distance"] = _relative_distance(self.model, self.control.model)
        return out

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "control": self.control.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.control.load_state_dict(state["control"])


def _check_same_start(model: nn.Module, twin: nn.Module) -> None:
    if twin is model or any(p is q for p, q in zip(model.parameters(), twin.parameters())):
        raise ValueError("the control shares the model's parameters; build it with copy.deepcopy(model)")
    mine, theirs = model.state_dict(), twin.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
        raise ValueError(
            "the control does not start from the method's weights; build it with "
            "copy.deepcopy(model) before the method's first step"
        )


@torch.no_grad()
def _relative_distance(model: nn.Module, twin: nn.Module) -> float:
    pairs = list(zip(model.parameters(), twin.parameters()))
    difference = sum(((p - q).double().pow(2).sum() for p, q in pairs), torch.zeros((), dtype=torch.float64))
    size = sum((q.double().pow(2).sum() for _, q in pairs), torch.zeros((), dtype=torch.float64))
    return (difference.sqrt() / size.sqrt().clamp_min(1e-300)).item()
