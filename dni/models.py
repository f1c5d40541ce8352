"""Networks as an ordered list of blocks: the unit that learning rules decouple.

The last block is the classifier and outputs logits; every block before it is a hidden
block `f_k` whose output `h_k` can be given a synthetic-gradient interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dni.errors import ConfigError


class BlockNet(nn.Module):
    """A feed-forward network `f_K ∘ ... ∘ f_1` kept as its blocks."""

    def __init__(self, blocks: Sequence[nn.Module], input_shape: Sequence[int], name: str):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.input_shape = tuple(input_shape)
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    @torch.no_grad()
    def activation_shapes(self) -> list[tuple[int, ...]]:
        """Shape (without batch) of every block's output, found by a forward pass in eval mode."""
        was_training = self.training
        self.eval()
        x = torch.zeros(1, *self.input_shape, device=next(self.parameters()).device)
        shapes = []
        for block in self.blocks:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
        self.train(was_training)
        return shapes


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{name}={value!r} is not allowed; it must be an integer >= 1")
    return value


class FCN(BlockNet):
    """The paper's fully connected network: hidden blocks Linear -> BatchNorm -> ReLU, then a
    linear classifier.

    `widths` overrides `depth` x `width` with explicit hidden sizes (e.g. [1024, 40]);
    `batch_norm=False` and `activation="none"` give the plain linear networks that the
    backward-network experiments use.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 3,
        width: int = 256,
        widths: Sequence[int] | None = None,
        bias: bool = True,
        batch_norm: bool = True,
        activation: str = "relu",
    ):
        if activation not in ("relu", "none"):
            raise ConfigError(f"model.activation={activation!r} is not allowed; choose relu or none")
        if widths is None:
            widths = [_positive("width", width)] * _positive("depth", depth)
        else:
            widths = [_positive("widths", int(w)) for w in widths]
            if not widths:
                raise ConfigError("model.widths is empty; give at least one hidden width")
        sizes = [int(torch.Size(input_shape).numel()), *widths]
        blocks: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm1d(fan_out))
            if activation == "relu":
                layers.append(nn.ReLU())
            blocks.append(nn.Sequential(*layers))
        blocks.append(nn.Linear(sizes[-1], num_classes, bias=bias))
        super().__init__(blocks, input_shape, name="fcn")


class CNN(BlockNet):
    """The paper's convolutional network: blocks of a 5x5 convolution with `channels` filters
    and same padding, BatchNorm, ReLU and 3x3 max pooling of stride 2; then a linear
    classifier on the flattened feature map."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 3,
        channels: int = 128,
        kernel_size: int = 5,
        pool: bool = True,
    ):
        if len(input_shape) != 3:
            raise ConfigError(
                f"model=cnn needs image inputs of shape (channels, height, width), but the data "
                f"set gives {tuple(input_shape)}; use model=fcn for this data set"
            )
        _positive("depth", depth)
        _positive("channels", channels)
        in_channels, height, width = input_shape
        blocks: list[nn.Module] = []
        for _ in range(depth):
            layers = [
                nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
            if pool:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                height, width = (height + 1) // 2, (width + 1) // 2
            blocks.append(nn.Sequential(*layers))
            in_channels = channels
        blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, num_classes)))
        super().__init__(blocks, input_shape, name="cnn")
