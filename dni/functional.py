"""Forward passes that leave a module's state alone, for measurements beside training."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def forward_without_stat_updates(module: nn.Module, *inputs: Tensor) -> Tensor:
    """`module(*inputs)` in its current mode, but BatchNorm's running statistics (and any
    other buffer) are updated on copies, so an extra pass for an oracle or a gradient
    measurement does not change what training or evaluation later sees. Parameters are the
    module's own, so gradients reach them as usual."""
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    return torch.func.functional_call(module, buffers, inputs, strict=False)
