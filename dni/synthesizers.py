"""Synthesizers `M_k`: small models that predict the gradient of the loss at an activation.

A synthesizer maps an activation `h` of shape (B, *shape) (and, for cDNI, a context such
as the one-hot label) to a tensor of the same shape: its prediction of the per-example
gradient `B * dL/dh` (the scale convention is explained in `dni.interface`). The final
layer starts at zero, so the first synthetic gradients are exactly zero and a fresh
interface leaves its block untouched until the synthesizer has learned something.

The same classes serve as input synthesizers `I_k` for forward unlocking: given
`out_shape`, they map the network input to a block's input instead.

Which kind fits which activation: `MLPSynthesizer` / `LinearSynthesizer` flat activations
`(features,)`, `ConvSynthesizer` feature maps `(C, H, W)`, `PositionwiseSynthesizer` token
sequences `(T, C)`; `auto` picks by the shape. A synthesizer knows the shape and context it
was built for and stops in one sentence when called with others (a wrong feature-map size,
a cDNI synthesizer called without its labels), instead of failing inside a matmul.

A context is `(B, classes)` (one label per example, broadcast over positions), or has the
activation's positions after its classes: `(B, classes, T)` for a label at every position of
a sequence, `(B, classes, H, W)` for one at every pixel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod

import torch
from torch import Tensor, nn

from dni.errors import ConfigError


class Synthesizer(nn.Module):
    """Base class. `needs_labels` marks synthesizers that must see the label as context.

    `shape` is the activation's shape without the batch, `context_dim` the size of the context
    (0: none). Subclasses call `self.check(h, context)` first in `forward`; `where` (an
    interface's name, e.g. "block2") is named in its messages when whoever owns the
    synthesizer sets it.
    """

    needs_labels = False
    # Predicts from the rest of the network (the oracle): its owner hands that over with `attach`.
    needs_downstream = False
    kind = "synthesizer"
    compilable = True  # `torch.compile` may compile its forward (see `Method.compile`)

    def __init__(self, shape: Sequence[int], out_shape: Sequence[int] | None = None, context_dim: int = 0):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        self.out_shape = tuple(int(d) for d in out_shape) if out_shape is not None else self.shape
        if not isinstance(context_dim, int) or context_dim < 0:
            raise ConfigError(f"context_dim={context_dim!r} is not allowed; it must be an integer >= 0")
        self.context_dim = context_dim
        self.where = ""

    def attach(self, downstream: Callable[[Tensor, Tensor | None], Tensor]) -> None:
        """Hand over the loss of the rest of the network as a function of `h` (and the
        context). A synthesizer that predicts from `h` alone ignores it (and keeps no reference);
        one that `needs_downstream` differentiates it. Every owner calls it, so none asks which
        kind of synthesizer it holds."""

    def positions(self) -> tuple[int, ...]:
        """The activation's positions that a per-position context must match (none for flat)."""
        return ()

    def check(self, h: Tensor, context: Tensor | None) -> None:
        """One sentence when `h` or `context` is not what this synthesizer was built for."""
        got = tuple(h.shape[1:])
        if got != self.shape:
            raise ConfigError(
                f"{self._who()} was built for activations of shape {self.shape} but got {got}; build it with "
                f"shape={got}, the output shape of its block (without the batch)"
            )
        if context is None:
            if self.context_dim:
                raise ConfigError(
                    f"{self._who()} was built for a context of {self.context_dim} features (cDNI's one-hot "
                    "labels) but was called without one; pass the labels as context, or build it with "
                    "context_dim=0 for DNI"
                )
            return
        if not self.context_dim:
            raise ConfigError(
                f"{self._who()} was built without a context but was given one of shape "
                f"{tuple(context.shape[1:])}; build it with context_dim={context.shape[1]} for cDNI, "
                "or pass no context"
            )
        wanted = ((self.context_dim,), (self.context_dim, *self.positions()))
        if tuple(context.shape[1:]) not in wanted or context.shape[0] != h.shape[0]:
            shown = " or ".join(str(w) for w in dict.fromkeys(wanted))
            raise ConfigError(
                f"{self._who()} takes a context of shape {shown} per example but got "
                f"{tuple(context.shape[1:])} for a batch of {context.shape[0]}; give one-hot labels with "
                "classes in dim 1"
            )

    def _who(self) -> str:
        # Formed only for a message: read on every call, `where` would make a compiled forward
        # recompile for each interface's name.
        return f"the synthesizer of {self.where}" if self.where else f"a {self.kind} synthesizer"


def _zero_(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _flat_output(kind: str, shape: tuple[int, ...]) -> int:
    if len(shape) != 1:
        raise ConfigError(
            f"the {kind} synthesizer needs flat activations but got shape {shape}; "
            "use synthesizer=conv for convolutional models, or synthesizer=auto to pick by shape"
        )
    return shape[0]


# What the methods take: a synthesizer class or partial, called with the shapes it serves.
SynthesizerFactory = Callable[..., Synthesizer]


class MLPSynthesizer(Synthesizer):
    """Fully connected synthesizer: `hidden` layers (Linear, optional BatchNorm, ReLU) and a
    zero-initialised linear output. `hidden=[]` is the linear synthesizer."""

    def __init__(
        self,
        shape: Sequence[int],
        context_dim: int = 0,
        hidden: Sequence[int] = (1024, 1024),
        batch_norm: bool = True,
        out_shape: Sequence[int] | None = None,
        zero_init: bool = True,
    ):
        super().__init__(shape, out_shape, context_dim)
        self.kind = "linear" if not hidden else "mlp"
        out_features = _flat_output(self.kind, self.out_shape)
        sizes = [prod(self.shape) + context_dim, *hidden]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers.append(nn.Linear(fan_in, fan_out))
            if batch_norm:
                layers.append(nn.BatchNorm1d(fan_out))
            layers.append(nn.ReLU())
        last = nn.Linear(sizes[-1], out_features)
        layers.append(_zero_(last) if zero_init else last)
        self.net = nn.Sequential(*layers)

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        self.check(h, context)
        z = h.flatten(1)
        if context is not None:
            z = torch.cat([z, context], dim=1)
        return self.net(z)


class LinearSynthesizer(MLPSynthesizer):
    """`g = W h + U c + b`, zero-initialised: the paper's linear synthesizer."""

    def __init__(
        self,
        shape: Sequence[int],
        context_dim: int = 0,
        out_shape: Sequence[int] | None = None,
        zero_init: bool = True,
    ):
        super().__init__(shape, context_dim, hidden=(), out_shape=out_shape, zero_init=zero_init)


class ConvSynthesizer(Synthesizer):
    """Convolutional synthesizer for feature maps (C, H, W): `hidden_layers` convolutions of
    `channels` filters (same padding, BatchNorm, ReLU) and a zero-initialised output
    convolution. A context is broadcast over the map and appended as extra channels."""

    def __init__(
        self,
        shape: Sequence[int],
        context_dim: int = 0,
        hidden_layers: int = 2,
        channels: int = 128,
        kernel_size: int = 5,
        batch_norm: bool = True,
        out_shape: Sequence[int] | None = None,
        zero_init: bool = True,
    ):
        super().__init__(shape, out_shape, context_dim)
        self.kind = "conv"
        if len(self.shape) != 3 or len(self.out_shape) != 3:
            raise ConfigError(
                f"the conv synthesizer needs feature maps (C, H, W) but got shape {self.shape}; "
                "use synthesizer=linear or mlp for fully connected models"
            )
        padding = kernel_size // 2
        in_channels = self.shape[0] + context_dim
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            layers.append(nn.Conv2d(in_channels, channels, kernel_size, padding=padding))
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.ReLU())
            in_channels = channels
        if self.out_shape[1:] != self.shape[1:]:  # an input synthesizer whose target is pooled
            layers.append(nn.AdaptiveAvgPool2d(self.out_shape[1:]))
        last = nn.Conv2d(in_channels, self.out_shape[0], kernel_size, padding=padding)
        layers.append(_zero_(last) if zero_init else last)
        self.net = nn.Sequential(*layers)

    def positions(self) -> tuple[int, ...]:
        return self.shape[1:]

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        self.check(h, context)
        if context is not None:
            planes = context if context.dim() == 4 else context[:, :, None, None].expand(-1, -1, *h.shape[2:])
            h = torch.cat([h, planes.to(h.dtype)], dim=1)
        return self.net(h)


class PositionwiseSynthesizer(Synthesizer):
    """Synthesizer for token sequences (T, C), as a Transformer's layers give: the same small
    network at every position (`hidden` layers of Linear and ReLU, then a zero-initialised
    linear output), seeing that position's activation and context only. A per-position
    context `(B, classes, T)` (cDNI's one-hot next character) is appended to each position's
    features; a `(B, classes)` one to every position."""

    kind = "position-wise"

    def __init__(
        self,
        shape: Sequence[int],
        context_dim: int = 0,
        hidden: Sequence[int] = (),
        out_shape: Sequence[int] | None = None,
        zero_init: bool = True,
    ):
        super().__init__(shape, out_shape, context_dim)
        if len(self.shape) != 2 or len(self.out_shape) != 2 or self.out_shape[0] != self.shape[0]:
            raise ConfigError(
                f"the position-wise synthesizer needs token sequences (T, C) in and out, but got shape "
                f"{self.shape} -> {self.out_shape}; use synthesizer=linear, mlp or conv for other activations"
            )
        sizes = [self.shape[1] + context_dim, *(int(w) for w in hidden)]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        last = nn.Linear(sizes[-1], self.out_shape[1])
        layers.append(_zero_(last) if zero_init else last)
        self.net = nn.Sequential(*layers)

    def positions(self) -> tuple[int, ...]:
        return self.shape[:1]

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        self.check(h, context)
        if context is not None:
            per_position = (
                context.movedim(1, -1) if context.dim() == 3 else context[:, None].expand(-1, h.shape[1], -1)
            )
            h = torch.cat([h, per_position.to(h.dtype)], dim=-1)
        return self.net(h)


def auto(
    shape: Sequence[int],
    context_dim: int = 0,
    hidden_layers: int = 0,
    width: int | None = None,
    kernel_size: int = 3,
    batch_norm: bool = True,
    out_shape: Sequence[int] | None = None,
    zero_init: bool = True,
) -> Synthesizer:
    """The synthesizer that fits an activation of `shape` (`synthesizer=auto`): linear (or an
    MLP, with `hidden_layers`) for flat activations `(features,)`, convolutional for feature
    maps `(C, H, W)`, position-wise for token sequences `(T, C)`.

    `hidden_layers` hidden layers of `width` units or channels each (default: the
    activation's own features or channels) come before the zero-initialised output layer;
    0 is the paper's linear synthesizer (a single convolution of `kernel_size` for maps).
    `batch_norm` applies to the hidden layers of the flat and convolutional kinds.
    """
    shape = tuple(int(d) for d in shape)
    if not isinstance(hidden_layers, int) or hidden_layers < 0:
        raise ConfigError(
            f"synthesizer.hidden_layers={hidden_layers!r} is not allowed; it must be an integer >= 0"
        )
    if width is not None and (not isinstance(width, int) or width < 1):
        raise ConfigError(f"synthesizer.width={width!r} is not allowed; give an integer >= 1, or null")
    if len(shape) == 1:
        hidden = [width or shape[0]] * hidden_layers
        return MLPSynthesizer(shape, context_dim, hidden, batch_norm, out_shape, zero_init)
    if len(shape) == 2:
        hidden = [width or shape[1]] * hidden_layers
        return PositionwiseSynthesizer(shape, context_dim, hidden, out_shape, zero_init)
    if len(shape) == 3:
        channels = width or shape[0]
        return ConvSynthesizer(
            shape, context_dim, hidden_layers, channels, kernel_size, batch_norm, out_shape, zero_init
        )
    raise ConfigError(
        f"synthesizer=auto has no kind for activations of shape {shape}: it knows flat (features,), "
        "token sequences (T, C) and feature maps (C, H, W); reshape that block's output to one of "
        "them or give a synthesizer of your own"
    )


class OracleSynthesizer(Synthesizer):
    """Returns the true per-example gradient `B * dL/dh`, for ablations and tests.

    It needs the rest of the network: its owner calls `attach(downstream)` with a function
    giving the loss of what follows `h` (for a feed-forward DNI the blocks above, from `h` and
    the one-hot labels, its context; for recurrent DNI the rest of the sequence), computed
    without touching BatchNorm's running statistics.
    """

    needs_labels = True
    needs_downstream = True
    compilable = False  # its forward is a backward pass through the blocks above
    kind = "oracle"

    def __init__(self, shape: Sequence[int], context_dim: int = 0, out_shape: Sequence[int] | None = None):
        super().__init__(shape, out_shape)
        self.downstream: Callable[[Tensor, Tensor], Tensor] | None = None

    def attach(self, downstream: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.downstream = downstream

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        if self.downstream is None:
            raise RuntimeError("the oracle synthesizer needs attach(downstream) before it predicts")
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self.downstream(h, context), h)
        return grad * h.shape[0]
