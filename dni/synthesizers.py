"""Synthesizers `M_k`: small models that predict the gradient of the loss at an activation.

A synthesizer maps an activation `h` of shape (B, *shape) (and, for cDNI, a context such
as the one-hot label) to a tensor of the same shape: its prediction of the per-example
gradient `B * dL/dh` (the scale convention is explained in `dni.interface`). The final
layer starts at zero, so the first synthetic gradients are exactly zero and a fresh
interface leaves its block untouched until the synthesizer has learned something.

The same classes serve as input synthesizers `I_k` for forward unlocking: given
`out_shape`, they map the network input to a block's input instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod

import torch
from torch import Tensor, nn

from dni.errors import ConfigError


class Synthesizer(nn.Module):
    """Base class. `needs_labels` marks synthesizers that must see the label as context."""

    needs_labels = False

    def __init__(self, shape: Sequence[int], out_shape: Sequence[int] | None = None):
        super().__init__()
        self.shape = tuple(shape)
        self.out_shape = tuple(out_shape) if out_shape is not None else self.shape


def _zero_(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def _flat_output(kind: str, shape: tuple[int, ...]) -> int:
    if len(shape) != 1:
        raise ConfigError(
            f"the {kind} synthesizer needs flat activations but got shape {shape}; "
            "use synthesizer=conv for convolutional models"
        )
    return shape[0]


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
        super().__init__(shape, out_shape)
        out_features = _flat_output("linear" if not hidden else "mlp", self.out_shape)
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
        super().__init__(shape, out_shape)
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

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            planes = context[:, :, None, None].expand(-1, -1, *h.shape[2:])
            h = torch.cat([h, planes], dim=1)
        return self.net(h)


class OracleSynthesizer(Synthesizer):
    """Returns the true per-example gradient `B * dL/dh`, for ablations and tests.

    It needs the rest of the network: the DNI method calls `attach(downstream)` with a
    function giving the loss of the blocks above from `h` and the one-hot labels (the
    context), computed without touching BatchNorm's running statistics.
    """

    needs_labels = True

    def __init__(self, shape: Sequence[int], context_dim: int = 0, out_shape: Sequence[int] | None = None):
        super().__init__(shape, out_shape)
        self.downstream: Callable[[Tensor, Tensor], Tensor] | None = None

    def attach(self, downstream: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.downstream = downstream

    def forward(self, h: Tensor, context: Tensor | None = None) -> Tensor:
        if self.downstream is None or context is None:
            raise RuntimeError("the oracle synthesizer needs attach(downstream) and the labels as context")
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            (grad,) = torch.autograd.grad(self.downstream(h, context), h)
        return grad * h.shape[0]
