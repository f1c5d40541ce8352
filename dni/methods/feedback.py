"""Learning without `loss.backward()`: an explicit backward network, feedback alignment, DFA.

All three rules share one backward pass, written out layer by layer with no autograd:
the output error `e = dL/dz` (from `loss.output_error`) enters at the classifier; inside
each block the signal goes back through the block's own local derivatives (ReLU's mask,
BatchNorm1d's exact training-mode derivative) to the output of its Linear layer, where
the weight gradient is the signal transposed times the Linear's input (and the bias
gradient its sum over the batch). The only difference between the rules is the
*feedback*: how the signal reaches the output `h_k` of the hidden block below.

- `backward_net`: through the transpose of block k+1's current forward weight, so the
  gradients are backprop's (tied weights: read afresh at every step).
- `fa` (feedback alignment, Lillicrap et al. 2016): through a fixed random matrix `B_k`
  of the same shape as block k+1's weight.
- `dfa` (direct feedback alignment, Nøkland 2016): the output error itself, through a
  fixed random matrix `D_k` of shape (classes, width of h_k), straight to every block.

Random feedback matrices are drawn as `nn.Linear(width_k, rows)` draws its weight,
uniform in `±scale / sqrt(width_k)`, from their own seeded generator (the global random
state is left alone), and are checkpointed as buffers in `parts["feedback"]`.

Only fully connected networks are supported (blocks `[Flatten] -> Linear -> [BatchNorm1d]
-> [ReLU]`, as `dni.models.FCN` builds them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dni.errors import ConfigError
from dni.functional import forward_without_stat_updates
from dni.guard import Guard
from dni.interface import OptimizerFactory
from dni.methods.base import Method
from dni.models import BlockNet

# Layers whose local derivative the backward pass writes out, after a block's Linear.
_LOCAL = (nn.BatchNorm1d, nn.ReLU, nn.Identity)


@dataclass
class _Block:
    """A fully connected block, split around its one Linear layer."""

    before: list[nn.Module]  # Flatten only: reshapes, nothing to learn
    linear: nn.Linear
    after: list[nn.Module]  # BatchNorm1d / ReLU / Identity, in forward order


@dataclass
class _Trace:
    """What one block's forward pass leaves for its backward pass."""

    linear_input: Tensor
    after: list[tuple[nn.Module, Tensor, Tensor]]  # (layer, its input, its output)


# -- feedback: how the signal reaches a hidden block's output ---------------------------------
class Feedback(nn.Module):
    """Carries the learning signal to the output `h_k` of hidden block k (1-based, k < K)."""

    def forward(self, k: int, above: Tensor, error: Tensor, weight_above: Tensor) -> Tensor:
        """`above`: the signal at the Linear output of block k+1; `error`: `dL/dz` at the
        logits; `weight_above`: block k+1's current forward weight, shape (out, in)."""
        raise NotImplementedError


class TransposedWeights(Feedback):
    """Backprop: `dL/dh_k = above @ W_{k+1}`, with the forward weight as it is now (tied)."""

    def forward(self, k: int, above: Tensor, error: Tensor, weight_above: Tensor) -> Tensor:
        return above @ weight_above


class RandomFeedback(Feedback):
    """Feedback alignment: `above @ B_k` with a fixed random `B_k` shaped like `W_{k+1}`.

    `B_k` is the buffer `block{k}` (named after the block it feeds)."""

    def __init__(self, shapes: list[tuple[int, int]], scale: float, seed: int, like: Tensor):
        super().__init__()
        _register_random(self, shapes, scale, seed, like)

    def forward(self, k: int, above: Tensor, error: Tensor, weight_above: Tensor) -> Tensor:
        return above @ getattr(self, f"block{k}")


class DirectFeedback(Feedback):
    """Direct feedback alignment: `error @ D_k`, a fixed random `D_k` of shape
    (classes, width of h_k) from the output error to every hidden block at once.

    `D_k` is the buffer `block{k}`."""

    def __init__(self, shapes: list[tuple[int, int]], scale: float, seed: int, like: Tensor):
        super().__init__()
        _register_random(self, shapes, scale, seed, like)

    def forward(self, k: int, above: Tensor, error: Tensor, weight_above: Tensor) -> Tensor:
        return error @ getattr(self, f"block{k}")


def _register_random(
    module: nn.Module, shapes: list[tuple[int, int]], scale: float, seed: int, like: Tensor
) -> None:
    """One fixed matrix per hidden block, uniform in ±scale/sqrt(columns), from `seed` alone."""
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"scale={scale!r} is not allowed; the feedback scale must be a number > 0")
    generator = torch.Generator().manual_seed(int(seed))
    for k, (rows, columns) in enumerate(shapes, start=1):
        bound = scale / math.sqrt(columns)
        matrix = (2 * torch.rand(rows, columns, generator=generator, dtype=torch.float64) - 1) * bound
        module.register_buffer(f"block{k}", matrix.to(like))


# -- the engine -------------------------------------------------------------------------------
class ExplicitBackward(Method):
    """A learning rule whose gradient is an explicit backward pass (see the module docstring).

    Subclasses choose the `Feedback`; everything else, the step, the local derivatives and
    `parameter_gradients` (which the alignment diagnostics compare with autograd), is shared.
    The step runs entirely under `torch.no_grad()`: no autograd graph is ever built.
    """

    name = "explicit_backward"

    def __init__(
        self,
        model: BlockNet,
        optimizer: OptimizerFactory,
        loss: str = "cross_entropy",
        guard: Guard | None = None,
    ):
        super().__init__(model, loss, guard)
        self.blocks = _split_blocks(model, self.name)
        self.optimizers = [optimizer(model.parameters())]
        self._names = {p: n for n, p in model.named_parameters()}

    def _set_feedback(self, feedback: Feedback) -> None:
        """Subclasses call this once, in their constructor."""
        self.feedback = feedback
        self.parts["feedback"] = feedback  # fixed random matrices are part of the run's state

    # -- the two passes ---------------------------------------------------------------------
    def _forward(self, x: Tensor, update_stats: bool) -> tuple[Tensor, list[_Trace]]:
        run: Callable[[nn.Module, Tensor], Tensor] = (
            (lambda layer, h: layer(h)) if update_stats else forward_without_stat_updates
        )
        traces, h = [], x
        for block in self.blocks:
            for layer in block.before:
                h = layer(h)
            linear_input, h = h, block.linear(h)
            after = []
            for layer in block.after:
                out = run(layer, h)
                after.append((layer, h, out))
                h = out
            traces.append(_Trace(linear_input, after))
        return h, traces

    def _backward(self, traces: list[_Trace], error: Tensor) -> dict[nn.Parameter, Tensor]:
        grads: dict[nn.Parameter, Tensor] = {}
        signal = error  # at the output of the last block: the logits
        for k in range(len(self.blocks), 0, -1):  # 1-based block index, top down
            block, trace = self.blocks[k - 1], traces[k - 1]
            if k < len(self.blocks):
                above = self.blocks[k].linear.weight
                signal = self.feedback(k, signal, error, above)
            signal = _local_backward(block, trace, signal, grads)
        return grads

    # -- Method -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        (optimizer,) = self.optimizers
        logits, traces = self._forward(x, update_stats=True)
        loss = self.loss(logits, y)
        if self.guard.finite("loss", loss):
            grads = self._backward(traces, self.loss.output_error(logits, y))
            optimizer.zero_grad(set_to_none=True)
            for param, grad in grads.items():
                param.grad = grad
            optimizer.step()
        return self._outputs(logits, y, loss)

    @torch.no_grad()
    def parameter_gradients(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits, traces = self._forward(x, update_stats=False)
        grads = self._backward(traces, self.loss.output_error(logits, y))
        return {self._names[p]: g for p, g in grads.items()}


class BackwardNetwork(ExplicitBackward):
    """`backward_net`: the backward network through the transposed forward weights; its
    gradients equal autograd's, without a call to `loss.backward()`."""

    name = "backward_net"

    def __init__(
        self,
        model: BlockNet,
        optimizer: OptimizerFactory,
        loss: str = "cross_entropy",
        guard: Guard | None = None,
    ):
        super().__init__(model, optimizer, loss, guard)
        self._set_feedback(TransposedWeights())


class FeedbackAlignment(ExplicitBackward):
    """`fa`: the backward network with fixed random matrices in place of the transposes.

    Args:
        scale: the matrices are uniform in ±scale/sqrt(fan-in of the layer they replace).
        seed: seeds the matrices' own generator.
    """

    name = "fa"

    def __init__(
        self,
        model: BlockNet,
        optimizer: OptimizerFactory,
        scale: float = 1.0,
        seed: int = 0,
        loss: str = "cross_entropy",
        guard: Guard | None = None,
    ):
        super().__init__(model, optimizer, loss, guard)
        shapes = [tuple(b.linear.weight.shape) for b in self.blocks[1:]]  # B_k replaces W_{k+1}
        self._set_feedback(RandomFeedback(shapes, scale, seed, like=self.blocks[0].linear.weight))


class DirectFeedbackAlignment(ExplicitBackward):
    """`dfa`: the output error to every hidden block's output through its own fixed random
    matrix, then the block's local backward.

    Args:
        scale: the matrices are uniform in ±scale/sqrt(width of the block they feed).
        seed: seeds the matrices' own generator.
    """

    name = "dfa"

    def __init__(
        self,
        model: BlockNet,
        optimizer: OptimizerFactory,
        scale: float = 1.0,
        seed: int = 0,
        loss: str = "cross_entropy",
        guard: Guard | None = None,
    ):
        super().__init__(model, optimizer, loss, guard)
        classes = self.blocks[-1].linear.out_features
        shapes = [(classes, b.linear.out_features) for b in self.blocks[:-1]]
        self._set_feedback(DirectFeedback(shapes, scale, seed, like=self.blocks[0].linear.weight))


# -- local derivatives ------------------------------------------------------------------------
def _local_backward(block: _Block, trace: _Trace, signal: Tensor, grads: dict) -> Tensor:
    """From the signal at the block's output to its Linear's output, filling `grads`;
    returns the signal at the Linear's output."""
    for layer, inp, out in reversed(trace.after):
        if isinstance(layer, nn.ReLU):
            signal = signal * (out > 0)  # autograd's convention: no gradient at exactly 0
        elif isinstance(layer, nn.BatchNorm1d):
            signal = _batch_norm_backward(layer, inp, signal, grads)
    grads[block.linear.weight] = signal.T @ trace.linear_input
    if block.linear.bias is not None:
        grads[block.linear.bias] = signal.sum(0)
    return signal


def _batch_norm_backward(bn: nn.BatchNorm1d, z: Tensor, signal: Tensor, grads: dict) -> Tensor:
    """BatchNorm1d's exact derivative: through the batch statistics in training mode (or
    without running statistics), through the running ones otherwise, as `bn` computed."""
    batch_stats = bn.training or bn.running_mean is None
    if batch_stats:
        mean, var = z.mean(0), z.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    inv_std = torch.rsqrt(var + bn.eps)
    normalised = (z - mean) * inv_std
    if bn.affine:
        grads[bn.weight] = (signal * normalised).sum(0)
        grads[bn.bias] = signal.sum(0)
        signal = signal * bn.weight
    if not batch_stats:
        return signal * inv_std
    # The batch mean and variance depend on every example: their terms remove the signal's
    # mean and its projection on the normalised input.
    return inv_std * (signal - signal.mean(0) - normalised * (signal * normalised).mean(0))


def _split_blocks(model: BlockNet, method: str) -> list[_Block]:
    """Each block as [Flatten] -> Linear -> [BatchNorm1d | ReLU | Identity]*, or a clear error."""
    blocks = []
    for k, block in enumerate(model.blocks, start=1):
        layers = list(block) if isinstance(block, nn.Sequential) else [block]
        linears = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
        unsupported = [
            type(layer).__name__
            for i, layer in enumerate(layers)
            if not (
                (linears and i < linears[0] and isinstance(layer, nn.Flatten))
                or isinstance(layer, nn.Linear)
                or (linears and i > linears[0] and isinstance(layer, _LOCAL))
            )
        ]
        if len(linears) != 1 or unsupported:
            holds = ", ".join(unsupported) if unsupported else f"{len(linears)} Linear layers"
            raise ConfigError(
                f"method={method} supports fully connected networks only (blocks of Linear, "
                f"BatchNorm1d and ReLU), but block {k} holds {holds}; use model=fcn"
            )
        i = linears[0]
        blocks.append(_Block(layers[:i], layers[i], layers[i + 1 :]))
    return blocks
