"""Classification losses, each with its derivative with respect to the logits written out.

Every loss is a batch mean, so `dL/dz` carries a 1/B factor (see `dni.interface` for how
synthetic gradients deal with it). Targets are class indices or one-hot rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dni.errors import ConfigError


def one_hot(y: Tensor, num_classes: int, like: Tensor) -> Tensor:
    """Labels as one-hot rows (the cDNI context) with the device of `like` and its dtype, or
    the default float dtype when `like` holds token ids. Labels `(B, T)` of a prediction at
    every position give `(B, classes, T)`: classes in dim 1, the layout of the logits."""
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return F.one_hot(y, num_classes).movedim(-1, 1).to(dtype)


class CrossEntropy:
    """Softmax cross-entropy; `dL/dz = (softmax(z) - onehot(y)) / B`."""

    name = "cross_entropy"

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target)

    def output_error(self, logits: Tensor, target: Tensor) -> Tensor:
        return (logits.softmax(dim=1) - _dense(target, logits)) / logits.shape[0]


class MeanSquaredError:
    """Mean squared error to the one-hot target; `dL/dz = 2 (z - onehot(y)) / (B C)`."""

    name = "mse"

    def __call__(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(logits, _dense(target, logits))

    def output_error(self, logits: Tensor, target: Tensor) -> Tensor:
        return 2 * (logits - _dense(target, logits)) / logits.numel()


LOSSES = {"cross_entropy": CrossEntropy, "mse": MeanSquaredError}


def get_loss(name: str) -> CrossEntropy | MeanSquaredError:
    if name not in LOSSES:
        raise ConfigError(f"loss={name!r} is unknown; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]()


def _dense(target: Tensor, logits: Tensor) -> Tensor:
    if target.dtype.is_floating_point:
        return target
    return one_hot(target, logits.shape[1], like=logits)
