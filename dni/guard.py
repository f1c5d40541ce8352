"""The divergence guard: a non-finite or exploding quantity never hides behind a finished run."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dni.errors import ConfigError, Divergence

ACTIONS = ("stop", "skip")


class Guard:
    """Checks losses and synthetic gradients before they are used for an update.

    `action="stop"` raises `Divergence` naming the quantity and the block (the runner adds
    the step, records `status: diverged` and exits non-zero); `action="skip"` drops that
    one update and counts it in `skipped`. `max_sg_norm` bounds the L2 norm of an injected
    synthetic gradient (infinite by default: only non-finite values are caught).

    Skipping is for a rare bad batch, not for a run whose weights are already lost: when
    `max_skipped_steps` steps in a row each skipped an update, `end_step` raises `Divergence`,
    so such a run ends "diverged" instead of "completed" with nothing learnt.
    """

    def __init__(self, action: str = "stop", max_sg_norm: float = math.inf, max_skipped_steps: int = 50):
        if action not in ACTIONS:
            raise ConfigError(f"guard.action={action!r} is unknown; choose one of {', '.join(ACTIONS)}")
        if not max_sg_norm > 0:
            raise ConfigError(f"guard.max_sg_norm={max_sg_norm!r} is not allowed; it must be > 0")
        if not isinstance(max_skipped_steps, int) or max_skipped_steps < 1:
            raise ConfigError(
                f"guard.max_skipped_steps={max_skipped_steps!r} is not allowed; give an integer >= 1"
            )
        self.action, self.max_sg_norm = action, float(max_sg_norm)
        self.max_skipped_steps = max_skipped_steps
        self.skipped = 0
        self.skipped_in_a_row = 0  # steps, each of which skipped at least one update
        self._skipped_before = 0  # `skipped` when the current step began

    def finite(self, quantity: str, value: Tensor, where: str = "") -> bool:
        """True when every entry of `value` is finite."""
        if bool(torch.isfinite(value).all()):
            return True
        bad = value[~torch.isfinite(value)].flatten()[0].item()
        return self._fail(quantity, bad, where)

    def synthetic_gradient(self, gradient: Tensor, where: str) -> bool:
        """True when an injected gradient is finite and its norm within `max_sg_norm`."""
        norm = gradient.norm()
        if not bool(torch.isfinite(norm)):
            return self._fail("synthetic gradient", norm.item(), where)
        if self.max_sg_norm < math.inf and norm.item() > self.max_sg_norm:
            return self._fail(f"synthetic-gradient norm (bound {self.max_sg_norm:g})", norm.item(), where)
        return True

    def _fail(self, quantity: str, value: float, where: str) -> bool:
        if self.action == "stop":
            raise Divergence(quantity, value, where)
        self.skipped += 1
        return False

    def end_step(self) -> None:
        """Called by the loop after every training step; raises `Divergence` when the last
        `max_skipped_steps` steps all skipped an update."""
        skipped_now = self.skipped > self._skipped_before
        self._skipped_before = self.skipped
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped_now else 0
        if self.skipped_in_a_row >= self.max_skipped_steps:
            raise Divergence(
                "the number of steps in a row that skipped an update",
                self.skipped_in_a_row,
                fix="lower the learning rate or the synthetic-gradient scale, or raise "
                "guard.max_skipped_steps if such stretches are expected",
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "skipped_in_a_row": self.skipped_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = self._skipped_before = state["skipped"]
        self.skipped_in_a_row = state.get("skipped_in_a_row", 0)  # absent from older checkpoints
