"""A pipeline stage: a contiguous run of a decoupled method's blocks, what trains them, and the
head on the last one.

Every rank builds the whole single-process method with the same seed, so all ranks hold
identical initial weights, and each stage then trains only its own slice through the method's
own parts of its step. A method says how it is split by `Method.pipeline_stage`, which gives
one of the stages below: DNI's (`DNIStage`: blocks, interfaces and synthesizers; the gradient
at its input goes back as the target of the stage below) and DGL's (`GreedyStage`: blocks
and their auxiliary classifiers; nothing goes back).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dni.errors import ConfigError
from dni.losses import one_hot

if TYPE_CHECKING:
    from dni.interface import DNI
    from dni.methods.base import Method
    from dni.methods.dgl import DecoupledGreedy
    from dni.methods.dni import DecoupledNeuralInterfaces


class Stage:
    """Stage `index` of `len(boundaries) + 1` of `method`: the blocks after `boundaries[index - 1]`
    up to and including `boundaries[index]` (1-based block indices; each boundary must be a cut
    of the method, `method.cuts`), what trains them, and the head on the last stage.

    `sends_targets` says whether the gradient that reaches the stage's input goes back to the
    stage below as its target (DNI) or nothing travels back at all (DGL); the pipeline then
    builds no backward links. A subclass gives `parts` (blocks first), `optimizers`, `run`,
    `report_keys` and `_forwards`; the rest has defaults for a stage that needs no labels,
    no forward unlocking and no targets.
    """

    sends_targets = True

    def __init__(self, method: Method, index: int, boundaries: Sequence[int]):
        self.method, self.index, self.count = method, index, len(boundaries) + 1
        ends = [*boundaries, len(method.model.blocks)]
        self.start = 0 if index == 0 else ends[index - 1]  # first block, 0-based
        self.end = ends[index]  # one past the last block, 0-based
        self.cuts = [cut for cut in method.cuts if self.start < cut <= self.end]  # 1-based, as the method's
        self.first, self.last = index == 0, index == self.count - 1

    def optimizers(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def parts(self, method: Method | None = None) -> nn.ModuleList:
        """What the stage trains, in `method` (by default its own), its blocks first."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Everything the stage's training depends on: its parts, their optimisers and the
        divergence guard's counts (of this process)."""
        return {
            "parts": self.parts().state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers()],
            "guard": self.method.guard.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.parts().load_state_dict(state["parts"])
        for optimizer, saved in zip(self.optimizers(), state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.method.guard.load_state_dict(state["guard"])

    def labels(self, x: Tensor, y: Tensor) -> Tensor | None:
        """What the stage's rule is conditioned on besides the batch (None: nothing)."""
        return None

    def unlock(self, x: Tensor, labels: Tensor | None) -> Tensor | None:
        """Forward unlocking, before the stage's real input has arrived (None: none)."""
        return None

    def run(
        self,
        h: Tensor,
        x: Tensor,
        y: Tensor,
        labels: Tensor | None,
        predicted: Tensor | None,
        send_target: Callable[[Tensor | None], None] | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Train the stage on batch t: `h` is its input (the network input `x` on the first
        stage, else the activation received, with `requires_grad` if `sends_targets`). Returns
        the stage's output (its last activation, or the logits) and its scalars of the step
        (on the last stage the training loss and accuracy, as `train/...`)."""
        raise NotImplementedError

    def stats(self) -> dict[str, Tensor]:
        """Scalars measured after the step's targets were used (none by default)."""
        return {}

    def learn_target(self, out: Tensor, delta: Tensor, labels: Tensor | None, late: bool) -> None:
        raise NotImplementedError(f"{type(self).__name__} sends no targets")

    def report_keys(self) -> list[str]:
        """The scalars this stage reports, in a fixed order every rank can compute."""
        raise NotImplementedError

    def state_vector(self, method: Method | None = None, full: bool = False) -> Tensor:
        """The floating-point parameters and buffers of the stage's blocks (in `method`, by
        default its own) flattened into one vector: what evaluation needs; with `full`, those of
        its other parts follow (what gradient-fidelity diagnostics need as well)."""
        tensors = self._float_state(method or self.method, full)
        return torch.cat([t.detach().reshape(-1).double() for t in tensors])

    def load_state_vector(self, vector: Tensor, method: Method, full: bool = False) -> None:
        """Copy a `state_vector` into the stage's part of `method` (a copy for evaluation)."""
        offset = 0
        with torch.no_grad():
            for t in self._float_state(method, full):
                t.copy_(vector[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def state_size(self, full: bool = False) -> int:
        return sum(t.numel() for t in self._float_state(self.method, full))

    def _float_state(self, method: Method, full: bool) -> list[Tensor]:
        parts = self.parts(method)
        modules = parts if full else parts[: self.end - self.start]  # the blocks come first
        state = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        return [t for t in state if t.is_floating_point()]

    def _forwards(self, x: Tensor, labels: Tensor) -> list[Callable[[Tensor], Tensor]]:
        """One forward per segment (the blocks up to a cut, with what trains them there), then
        the head's on the last stage, each from the activation below to its own: the units the
        balanced split shares out (`balanced_boundaries`)."""
        raise NotImplementedError

    @torch.no_grad()
    def segment_costs(self, batch_size: int = 2) -> list[float]:
        """The forward FLOPs of each of `_forwards`, on a batch of zeros; no BatchNorm
        statistics are touched."""
        method, model = self.method, self.method.model
        device = next(model.parameters()).device
        modules = list(method.parts.modules())
        modes = [m.training for m in modules]
        method.parts.eval()
        # Token ids for a language model, images otherwise; one-hot labels shaped like the logits
        # (a label at every position for a sequence model).
        dtype = getattr(model, "input_dtype", None)
        x = torch.zeros(batch_size, *model.input_shape, device=device, dtype=dtype)
        labels = torch.zeros(batch_size, *model.activation_shapes()[-1], device=device)
        costs, h = [], x
        try:
            for forward in self._forwards(x, labels):
                with FlopCounterMode(display=False) as counter:
                    h = forward(h)
                costs.append(float(counter.get_total_flops()))
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        return costs


class DNIStage(Stage):
    """A stage of DNI or cDNI: its blocks and their interfaces (synthesizers, input
    synthesizers), and the head on the last stage. The gradient that reaches its input is the
    target of the stage below, sent back as soon as it exists."""

    method: DecoupledNeuralInterfaces

    def __init__(self, method: DecoupledNeuralInterfaces, index: int, boundaries: Sequence[int]):
        super().__init__(method, index, boundaries)
        self.interfaces: list[DNI] = [
            interface for cut, interface in zip(method.cuts, method.interfaces) if cut in self.cuts
        ]
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
            if method.cuts[k] in self.cuts:
                found += [interface.synthesizer, *filter(None, [interface.input_synthesizer])]
        return nn.ModuleList(found)

    def state_dict(self) -> dict:
        """The stage's state (see `Stage`) and its interfaces' step counts."""
        return {**super().state_dict(), "interface_steps": [i.steps_seen for i in self.interfaces]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for interface, seen in zip(self.interfaces, state["interface_steps"], strict=True):
            interface.steps_seen = seen

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
        """See `Stage.run`. The gradient that reaches `h` (the target of the stage below) goes to
        `send_target` as soon as it exists: after the first interface, or after the head."""
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
        keys = ["train/loss", "train/accuracy"] if self.last else []
        for interface in self.interfaces:
            kinds = ["norm", "loss", *(["input_loss"] if interface.input_synthesizer else [])]
            keys += [f"sg/{kind}/{interface.name}" for kind in kinds]
        return keys

    def _forwards(self, x: Tensor, labels: Tensor) -> list[Callable[[Tensor], Tensor]]:
        def through(interface: DNI) -> Callable[[Tensor], Tensor]:
            def forward(h: Tensor) -> Tensor:
                if interface.input_synthesizer is not None:
                    interface.input_synthesizer(x)
                h = interface.block(h)
                interface.synthesizer(h, self.method.context(interface, labels))
                return h

            return forward

        return [*map(through, self.interfaces), *([self.head] if self.head is not None else [])]


class GreedyStage(Stage):
    """A stage of decoupled greedy learning: its blocks and their auxiliary classifiers, each
    segment trained by its own classifier's loss, and the head (the true loss) on the last
    stage. Nothing travels back: the stage sends its last activation on and needs no answer."""

    sends_targets = False
    method: DecoupledGreedy

    def __init__(self, method: DecoupledGreedy, index: int, boundaries: Sequence[int]):
        super().__init__(method, index, boundaries)
        self.segments = [k for k, cut in enumerate(method.cuts) if cut in self.cuts]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        # DGL's one optimiser over every part: only this stage's parameters ever get gradients
        # here, so it steps those alone, and its state holds theirs alone.
        return list(self.method.optimizers)

    def parts(self, method: DecoupledGreedy | None = None) -> nn.ModuleList:
        """What the stage trains, in `method` (by default its own): its blocks (the head's too, on
        the last stage), and its segments' auxiliary classifiers."""
        method = method or self.method
        auxiliary = [method.auxiliary[k] for k in self.segments]
        return nn.ModuleList([*method.model.blocks[self.start : self.end], *auxiliary])

    def run(
        self,
        h: Tensor,
        x: Tensor,
        y: Tensor,
        labels: Tensor | None,
        predicted: Tensor | None,
        send_target: Callable[[Tensor | None], None] | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """See `Stage.run`: the single-process step's updates of this stage's segments and head
        (`DecoupledGreedy.learn`)."""
        h, out = self.method.learn(h, y, self.segments, head=self.last)
        return h, {(k if "/" in k else f"train/{k}"): v for k, v in out.items()}

    def report_keys(self) -> list[str]:
        keys = ["train/loss", "train/accuracy"] if self.last else []
        return keys + [f"dgl/loss/{self.method.names[k]}" for k in self.segments]

    def _forwards(self, x: Tensor, labels: Tensor) -> list[Callable[[Tensor], Tensor]]:
        def through(k: int) -> Callable[[Tensor], Tensor]:
            def forward(h: Tensor) -> Tensor:
                h = self.method.segments[k](h)
                self.method.auxiliary[k](h)
                return h

            return forward

        return [*map(through, self.segments), *([self.method.head] if self.last else [])]


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


def balanced_boundaries(method: Method, stages: int, batch_size: int = 2) -> list[int]:
    """The contiguous split of `method` into `stages` that minimises the largest stage's compute.

    A stage's cost is the forward FLOPs of what it trains: blocks, synthesizers and input
    synthesizers for DNI, blocks and auxiliary classifiers for DGL (backward costs about twice
    as much for all of them alike). Deterministic, so every rank finds the same split.
    """
    whole = method.pipeline_stage(0, [])
    cuts = whole.cuts
    units = len(cuts) + 1  # the segments up to each cut, then the head
    if not 1 <= stages <= units:
        raise ConfigError(
            f"stages={stages} is not allowed: this model has {units} segments (interfaces "
            f"and head) to share out; use at most {units} stages, or more blocks (model.depth)"
        )
    costs = whole.segment_costs(batch_size)
    best, best_cost = None, float("inf")
    for split in itertools.combinations(range(1, units), stages - 1):
        edges = [0, *split, units]
        cost = max(sum(costs[a:b]) for a, b in zip(edges[:-1], edges[1:]))
        if cost < best_cost:
            best, best_cost = split, cost
    return [cuts[i - 1] for i in best]
