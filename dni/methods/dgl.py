"""Decoupled greedy learning (DGL; Belilovsky, Eickenberg & Oyallon, ICML 2020).

Every decoupled block learns from the loss of its own small auxiliary classifier, placed on
its output; no gradient ever crosses a block boundary, so no block waits for any other's
backward pass (and, in a pipeline, nothing travels back at all). The blocks after the last
cut (the head) learn from the true loss. Where DNI predicts the gradient the rest of the
network would send, DGL replaces the rest of the network by a shallow proxy of it: the
literature's other decoupled baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dni.errors import ConfigError
from dni.functional import forward_without_stat_updates
from dni.guard import Guard
from dni.interface import OptimizerFactory
from dni.methods.base import Method
from dni.methods.dni import _interface_positions, _segment
from dni.models import BlockNet

if TYPE_CHECKING:
    from dni.distributed.stage import GreedyStage

HeadFactory = Callable[..., nn.Module]


class _ClassesFirst(nn.Module):
    def forward(self, logits: Tensor) -> Tensor:
        return logits.transpose(1, 2)


def auxiliary_head(
    shape: Sequence[int],
    out_shape: Sequence[int],
    hidden: Sequence[int] = (),
    pool: int = 2,
) -> nn.Module:
    """A small classifier from an activation of `shape` to logits of `out_shape` (the model's):

    - flat `(features,)` -> `(classes,)`: `hidden` layers of Linear and ReLU, then Linear;
    - feature map `(C, H, W)` -> `(classes,)`: average pooling to `pool` x `pool` (DGL's
      auxiliary nets average spatially first), flattened, then as for flat;
    - token sequence `(T, C)` -> `(classes, T)`: LayerNorm and the same at every position.
    """
    shape, out_shape = tuple(shape), tuple(out_shape)
    hidden = [int(w) for w in hidden]
    if any(w < 1 for w in hidden):
        raise ConfigError(f"method.head.hidden={hidden} is not allowed; give widths >= 1")
    if not isinstance(pool, int) or pool < 1:
        raise ConfigError(f"method.head.pool={pool!r} is not allowed; it must be an integer >= 1")

    def mlp(fan_in: int, classes: int) -> list[nn.Module]:
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        return [*layers, nn.Linear(fan_in, classes)]

    if len(out_shape) == 1 and len(shape) == 1:
        return nn.Sequential(*mlp(shape[0], out_shape[0]))
    if len(out_shape) == 1 and len(shape) == 3:
        side = [min(pool, shape[1]), min(pool, shape[2])]
        return nn.Sequential(
            nn.AdaptiveAvgPool2d(side), nn.Flatten(), *mlp(shape[0] * prod(side), out_shape[0])
        )
    if len(out_shape) == 2 and len(shape) == 2 and out_shape[1] == shape[0]:
        return nn.Sequential(nn.LayerNorm(shape[1]), *mlp(shape[1], out_shape[0]), _ClassesFirst())
    raise ConfigError(
        f"DGL has no auxiliary classifier from activations of shape {shape} to logits of shape "
        f"{out_shape}: it knows flat (features,) and maps (C, H, W) to (classes,), and token "
        "sequences (T, C) to (classes, T); move the cut (method.interfaces) or give method.head"
    )


class DecoupledGreedy(Method):
    """DGL over a `BlockNet`: each segment (the blocks up to an interface) is trained by its
    auxiliary classifier's loss alone, on an input detached from the segment below.

    Args:
        model: the network.
        optimizer: builds the optimiser of every segment with its auxiliary classifier, and
            the head's (one optimiser over all of them: the losses share no parameter, so
            one backward and one step are the separate updates, computed together).
        head: builds an auxiliary classifier from `shape` (the activation's) and `out_shape`
            (the model's logits); `auxiliary_head` by default.
        interfaces: block indices (1..K-1) followed by a cut; None for every hidden block.
        loss: "cross_entropy" or "mse", for the auxiliary classifiers and the head alike.
        guard: divergence checks; with `action="skip"` a block whose loss is not finite skips
            its update alone.
    """

    name = "dgl"

    def __init__(
        self,
        model: BlockNet,
        optimizer: OptimizerFactory,
        head: HeadFactory | None = None,
        interfaces: Sequence[int] | None = None,
        loss: str = "cross_entropy",
        guard: Guard | None = None,
    ):
        super().__init__(model, loss, guard)
        head = head or auxiliary_head
        shapes = model.activation_shapes()
        self.cuts = _interface_positions(interfaces, len(model.blocks))
        device = next(model.parameters()).device
        starts = [0, *self.cuts]
        self.segments = [_segment(model.blocks[start:end]) for start, end in zip(starts[:-1], self.cuts)]
        self.names = [f"block{end}" for end in self.cuts]
        self.auxiliary = nn.ModuleList(
            head(shape=shapes[end - 1], out_shape=shapes[-1]).to(device) for end in self.cuts
        )
        self.head = _segment(model.blocks[self.cuts[-1] :])
        self.parts["auxiliary"] = self.auxiliary
        self.optimizers = [optimizer([*model.parameters(), *self.auxiliary.parameters()])]

    def compiled_modules(self) -> list[nn.Module]:
        """The blocks (see `Method`) and the auxiliary classifiers."""
        return [*super().compiled_modules(), *self.auxiliary]

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return self.learn(x, y, range(len(self.segments)))[1]

    # The step over a slice of the segments, so that a pipeline stage (`dni.distributed`) runs its own.
    def learn(
        self, h: Tensor, y: Tensor, segments: Sequence[int], head: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Train the consecutive `segments` (indices into `self.segments`) on their input `h` and,
        with `head`, the head after them: each on its own loss, in one backward and one step.
        Returns the last output (the detached activation, or the logits) and the losses (the
        true loss and accuracy as `loss` and `accuracy`, each auxiliary one as `dgl/loss/blockK`)."""
        (optimizer,) = self.optimizers
        optimizer.zero_grad(set_to_none=True)
        deferred = self.guard.action == "stop"
        out: dict[str, Tensor] = {}
        losses: list[Tensor] = []

        def use(quantity: str, loss: Tensor, where: str = "") -> None:
            if deferred:
                self.guard.defer(quantity, loss, where)
                losses.append(loss)
            elif self.guard.finite(quantity, loss, where):
                losses.append(loss)

        for k in segments:
            a = self.segments[k](h)  # `h` is detached: this graph ends at the block's own input
            local = self.loss(self.auxiliary[k](a), y)
            out[f"dgl/loss/{self.names[k]}"] = local.detach()
            use("auxiliary loss", local, self.names[k])
            h = a.detach()  # the cut: nothing flows back below it
        if head:
            logits = self.head(h)
            loss = self.loss(logits, y)
            use("loss", loss)
            out, h = {**self._outputs(logits, y, loss), **out}, logits
        if losses:
            torch.autograd.backward(losses)  # each loss reaches its own segment only
            optimizer.step()  # a parameter without a gradient (a skipped segment) is left alone
        if deferred:
            self.guard.end_checks()
        return h, out

    def pipeline_stage(self, index: int, boundaries: Sequence[int]) -> GreedyStage:
        """A stage of blocks with their auxiliary classifiers (`dni.distributed.stage.GreedyStage`),
        which sends nothing back: no target, no gradient."""
        from dni.distributed.stage import GreedyStage  # the pipeline builds on the methods, not the reverse

        return GreedyStage(self, index, boundaries)

    def eval_models(self) -> dict[str, nn.Module]:
        return {"test": self.model}

    def parameter_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Each segment's gradient of its auxiliary loss, the head's of the true loss."""
        names = {p: n for n, p in self.model.named_parameters()}
        grads: dict[str, Tensor] = {}
        h = x
        for segment, auxiliary in zip(self.segments, self.auxiliary):
            h = forward_without_stat_updates(segment, h.detach())
            local = self.loss(forward_without_stat_updates(auxiliary, h), y)
            params = list(segment.parameters())
            grads.update({names[p]: g for p, g in zip(params, torch.autograd.grad(local, params))})
        params = list(self.head.parameters())
        loss = self.loss(forward_without_stat_updates(self.head, h.detach()), y)
        grads.update({names[p]: g for p, g in zip(params, torch.autograd.grad(loss, params))})
        return grads

    def diagnostics(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Weight alignment with backprop and drift (see `Method`), and each auxiliary
        classifier's error on the batch: how much of the task the block alone has solved."""
        out = super().diagnostics(x, y)
        h = x
        with torch.no_grad():
            for segment, auxiliary, name in zip(self.segments, self.auxiliary, self.names):
                h = forward_without_stat_updates(segment, h)
                logits = forward_without_stat_updates(auxiliary, h)
                out[f"dgl/error/{name}"] = (logits.argmax(1) != y).float().mean().item()
        return out
