"""A pipeline stage: a contiguous run of a DNI method's interfaces, and the head on the last one.

Every rank builds the whole single-process method (`DecoupledNeuralInterfaces`) with the
same seed, so all ranks hold identical initial weights, and each stage then trains only
its own slice through the method's own `unlock`, `advance` and `learn_head`: the
interfaces and synthesizers are the single-process ones, unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dni.errors import ConfigError
from dni.interface import DNI
from dni.losses import one_hot
from dni.methods.dni import DecoupledNeuralInterfaces


class Stage:
    """Stage `index` of `len(boundaries) + 1`: the blocks after `boundaries[index - 1]` up to
    and including `boundaries[index]` (1-based block indices; each boundary must be a block
    followed by an interface), their interfaces, and the head on the last stage."""

    def __init__(self, method: DecoupledNeuralInterfaces, index: int, boundaries: Sequence[int]):
        self.method, self.index, self.count = method, index, len(boundaries) + 1
        ends = [*boundaries, len(method.model.blocks)]
        self.start = 0 if index == 0 else ends[index - 1]  # first block, 0-based
        self.end = ends[index]  # one past the last block, 0-based
        self.interfaces: list[DNI] = [
            interface
            for cut, interface in zip(method.cuts, method.interfaces)
            if self.start < cut <= self.end
        ]
        self.first, self.last = index == 0, index == self.count - 1
        self.head = method.head if self.last else None

    def optimizers(self) -> list[torch.optim.Optimizer]:
        found = [self.method.head_optimizer] if self.last else []
        for i in self.interfaces:
            found += [o for o in (i.optimizer, i.synthesizer_optimizer, i.input_optimizer) if o]
        return found

    def parts(self, method: DecoupledNeuralInterfaces | None = None) -> nn.ModuleList:
        """What the stage trains, in `method` (by default its own): its blocks (the head's too, on
        the last stage), and its interfaces' synthesizers and input synthesizers."""
        method = method or self.method
        found = [*method.model.blocks[self.start : self.end]]
        for k, interface in enumerate(method.interfaces):
            if self.start < method.cuts[k] <= self.end:
                found += [interface.synthesizer, *filter(None, [interface.input_synthesizer])]
        return nn.ModuleList(found)

    def state_dict(self) -> dict:
        """Everything the stage's training depends on: its parts, their optimisers, its
        interfaces' step counts and the divergence guard's counts (of this process)."""
        return {
            "parts": self.parts().state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers()],
            "interface_steps": [i.steps_seen for i in self.interfaces],
            "guard": self.method.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.parts().load_state_dict(state["parts"])
        for optimizer, saved in zip(self.optimizers(), state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for interface, seen in zip(self.interfaces, state["interface_steps"], strict=True):
            interface.steps_seen = seen
        self.method.guard.load_state_dict(state["guard"])

    def labels(self, x: Tensor, y: Tensor) -> Tensor:
        return one_hot(y, self.method.num_classes, like=x)

    def unlock(self, x: Tensor, labels: Tensor) -> Tensor | None:
        """Forward unlocking of the stage's first interface, before its real input has arrived."""
        if self.first or not self.interfaces:
            return None
        return self.method.unlock(self.interfaces[0], x, labels)

    def run(
        self,
        h: Tensor,
        x: Tensor,
        y: Tensor,
        labels: Tensor,
        predicted: Tensor | None,
        send_target: Callable[[Tensor | None], None] | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Train the stage on batch t: `h` is its input (the network input `x` on the first
        stage, else the activation received, with `requires_grad`). The gradient that reaches
        `h` (the target of the stage below) goes to `send_target` as soon as it exists: after
        the first interface, or after the head. Returns the stage's output (the last
        interface's, or the logits) and, on the last stage, the training loss and accuracy."""
        received, out = h, {}
        for i, interface in enumerate(self.interfaces):
            ahead = predicted if i == 0 else self.method.unlock(interface, x, labels)
            h = self.method.advance(interface, h, labels, ahead)
            if i == 0 and send_target is not None:
                send_target(received.grad)
        if self.head is not None:
            logits, loss = self.method.learn_head(h, y)
            if not self.interfaces and send_target is not None:
                send_target(received.grad)
            out = {f"train/{k}": v for k, v in self.method._outputs(logits, y, loss).items()}
            h = logits
        return h, out

    def stats(self) -> dict[str, Tensor]:
        """The interfaces' latest measurements: synthetic-gradient norms, regression losses."""
        return {f"sg/{key}/{i.name}": v for i in self.interfaces for key, v in i.stats.items()}

    def learn_target(self, out: Tensor, delta: Tensor, labels: Tensor, late: bool) -> None:
        """Use the target `delta` that arrived for the stage's output `out` of some batch.

        On time (`late=False`: the synthesizer has not stepped since that batch) this is
        exactly the single-process path, the hook on `out`; a late target is regressed from a
        fresh prediction (`DNI.regress_late`)."""
        interface = self.interfaces[-1]
        if late:
            interface.regress_late(out, delta, self.method.context(interface, labels))
        else:
            out.backward(delta)

    def report_keys(self) -> list[str]:
        """The scalars this stage reports, in a fixed order every rank can compute."""
        keys = ["train/loss", "train/accuracy"] if self.last else []
        for interface in self.interfaces:
            kinds = ["norm", "loss", *(["input_loss"] if interface.input_synthesizer else [])]
            keys += [f"sg/{kind}/{interface.name}" for kind in kinds]
        return keys

    def state_vector(self, method: DecoupledNeuralInterfaces | None = None, full: bool = False) -> Tensor:
        """The floating-point parameters and buffers of the stage's blocks (in `method`, by
        default its own) flattened into one vector: what evaluation needs; with `full`, those of
        its synthesizers follow (what gradient-fidelity diagnostics need as well)."""
        tensors = self._float_state(method or self.method, full)
        return torch.cat([t.detach().reshape(-1).double() for t in tensors])

    def load_state_vector(
        self, vector: Tensor, method: DecoupledNeuralInterfaces, full: bool = False
    ) -> None:
        """Copy a `state_vector` into the stage's part of `method` (a copy for evaluation)."""
        offset = 0
        with torch.no_grad():
            for t in self._float_state(method, full):
                t.copy_(vector[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def state_size(self, full: bool = False) -> int:
        return sum(t.numel() for t in self._float_state(self.method, full))

    def _float_state(self, method: DecoupledNeuralInterfaces, full: bool) -> list[Tensor]:
        parts = self.parts(method)
        modules = parts if full else parts[: self.end - self.start]  # the blocks come first
        state = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        return [t for t in state if t.is_floating_point()]


def check_boundaries(boundaries: Sequence[int], stages: int, cuts: Sequence[int]) -> list[int]:
    """`boundaries` as a list, or a `ConfigError` naming what would fit."""
    found = [int(b) for b in boundaries]
    if len(found) != stages - 1 or found != sorted(set(found)) or any(b not in cuts for b in found):
        raise ConfigError(
            f"boundaries={list(boundaries)} does not split the model into {stages} stages; give "
            f"{stages - 1} increasing block indices from {list(cuts)} (a stage ends where an interface "
            "sits), or null to balance the stages by compute"
        )
    return found


def balanced_boundaries(method: DecoupledNeuralInterfaces, stages: int, batch_size: int = 2) -> list[int]:
    """The contiguous split into `stages` that minimises the largest stage's compute.

    A stage's cost is the forward FLOPs of its blocks, synthesizers and input synthesizers
    (backward costs about twice as much for all of them alike). Deterministic, so every rank
    finds the same split.
    """
    cuts = list(method.cuts)
    units = len(cuts) + 1  # the interfaces' segments, then the head
    if not 1 <= stages <= units:
        raise ConfigError(
            f"stages={stages} is not allowed: this model has {units} segments (interfaces "
            f"and head) to share out; use at most {units} stages, or more blocks (model.depth)"
        )
    costs = _segment_costs(method, batch_size)
    best, best_cost = None, float("inf")
    for split in itertools.combinations(range(1, units), stages - 1):
        edges = [0, *split, units]
        cost = max(sum(costs[a:b]) for a, b in zip(edges[:-1], edges[1:]))
        if cost < best_cost:
            best, best_cost = split, cost
    return [cuts[i - 1] for i in best]


@torch.no_grad()
def _segment_costs(method: DecoupledNeuralInterfaces, batch_size: int) -> list[float]:
    model = method.model
    device = next(model.parameters()).device
    was_training = model.training
    modules = [model, *(i.synthesizer for i in method.interfaces)]
    modules += [i.input_synthesizer for i in method.interfaces if i.input_synthesizer is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()  # no BatchNorm statistics are touched
    # Token ids for a language model, images otherwise; one-hot labels shaped like the logits
    # (a label at every position for a sequence model).
    x = torch.zeros(batch_size, *model.input_shape, device=device, dtype=getattr(model, "input_dtype", None))
    labels = torch.zeros(batch_size, *model.activation_shapes()[-1], device=device)
    costs, h = [], x
    try:
        for interface in method.interfaces:
            with FlopCounterMode(display=False) as counter:
                if interface.input_synthesizer is not None:
                    interface.input_synthesizer(x)
                h = interface.block(h)
                interface.synthesizer(h, method.context(interface, labels))
            costs.append(float(counter.get_total_flops()))
        with FlopCounterMode(display=False) as counter:
            method.head(h)
        costs.append(float(counter.get_total_flops()))
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
        model.train(was_training)
    return costs
