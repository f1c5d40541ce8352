"""The recurrent core for the sequence tasks, and the per-time-step losses it is trained on.

`LSTMNet` is one LSTM layer (the *core*) with a linear readout at every time step. Its
state is the pair `(h, c)`; recurrent DNI sees it as one flat vector `s = [h, c]` of
`2 * hidden_size` entries, the activation whose gradient a synthesizer predicts.

Targets say what loss they want, so one model and one method serve every task:
integer targets (B, L) are classes (cross-entropy, e.g. the next character); float
targets (B, L, F) are independent bits (binary cross-entropy summed over the F bits,
e.g. the copy task). Entries below zero are ignored, which is how a task marks the steps
that have nothing to predict (the copy task's input phase).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dni.errors import ConfigError

State = tuple[Tensor, Tensor]
LN2 = math.log(2.0)


class LSTMNet(nn.Module):
    """An LSTM core of `hidden_size` units and a linear readout, applied step by step.

    `forward(x, state)` runs the core over `x` (B, L, input_size) floats, or (B, L) class
    indices which are one-hot encoded, from `state` (zeros when None), and returns the
    readout at every step (B, L, num_classes) and the final state `(h, c)`, each (B, H).
    The forget gates' biases start at `forget_bias` (split over PyTorch's two bias vectors).
    """

    recurrent = True

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, hidden_size: int = 256, forget_bias: float = 1.0
    ):
        super().__init__()
        if len(tuple(input_shape)) != 1:
            raise ConfigError(
                f"model=lstm is a recurrent core for sequence tasks, but the data set gives inputs of "
                f"shape {tuple(input_shape)}; use dataset=copy, repeat_copy or text (or a feed-forward model)"
            )
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ConfigError(f"hidden_size={hidden_size!r} is not allowed; it must be an integer >= 1")
        self.input_size, self.hidden_size, self.num_classes = int(input_shape[0]), hidden_size, num_classes
        self.input_shape = (self.input_size,)
        self.core = nn.LSTM(self.input_size, hidden_size, batch_first=True)
        self.readout = nn.Linear(hidden_size, num_classes)
        with torch.no_grad():  # a forget gate that starts open keeps memories, which long copies need
            for bias in (self.core.bias_ih_l0, self.core.bias_hh_l0):
                bias[hidden_size : 2 * hidden_size] = forget_bias / 2
        self.name = "lstm"

    @property
    def state_size(self) -> int:
        """Entries of the flat state `[h, c]`."""
        return 2 * self.hidden_size

    def initial_state(self, batch_size: int, like: Tensor) -> State:
        zeros = torch.zeros(batch_size, self.hidden_size, device=like.device, dtype=self.readout.weight.dtype)
        return zeros, zeros.clone()

    def encode(self, x: Tensor) -> Tensor:
        """Inputs as floats (B, L, input_size): class indices are one-hot encoded."""
        if x.dtype.is_floating_point:
            return x
        return F.one_hot(x, self.input_size).to(self.readout.weight.dtype)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        inputs = self.encode(x)
        if state is None:
            state = self.initial_state(inputs.shape[0], inputs)
        h0, c0 = state
        outputs, (h, c) = self.core(inputs, (h0.unsqueeze(0), c0.unsqueeze(0)))
        return self.readout(outputs), (h.squeeze(0), c.squeeze(0))


def flat(state: State) -> Tensor:
    """The state `(h, c)` as one vector `[h, c]` per example, (B, 2H)."""
    return torch.cat(state, dim=1)


def split(flat_state: Tensor) -> State:
    """Inverse of `flat`."""
    h, c = flat_state.chunk(2, dim=1)
    return h, c


def step_losses(logits: Tensor, target: Tensor) -> Tensor:
    """The loss at every time step, in nats, averaged over the batch: shape (L,).

    Integer targets (B, L): softmax cross-entropy. Float targets (B, L, F): binary
    cross-entropy summed over the F bits. Negative targets are ignored (they add 0).
    """
    if target.dtype.is_floating_point:
        mask = target >= 0
        per_bit = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
        per_example = (per_bit * mask).sum(dim=2)
    else:
        per_example = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-1, reduction="none")
    return per_example.mean(dim=0)


def loss_steps(target: Tensor) -> Tensor:
    """Which time steps have something to predict, (L,) booleans."""
    mask = target >= 0
    while mask.dim() > 2:
        mask = mask.any(dim=-1)
    return mask.any(dim=0)


@torch.no_grad()
def prediction_errors(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Wrong predictions and how many were made: wrong bits (threshold 0.5) for bit
    targets, wrong argmax classes for class targets; ignored entries do not count."""
    mask = target >= 0
    if target.dtype.is_floating_point:
        wrong = ((logits > 0).to(target.dtype) != target) & mask
    else:
        wrong = (logits.argmax(-1) != target) & mask
    return wrong.sum(), mask.sum()
