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
    """

    def __init__(self, action: str = "stop", max_sg_norm: float = math.inf):
        if action not in ACTIONS:
            raise ConfigError(f"guard.action={action!r} is unknown; choose one of {', '.join(ACTIONS)}")
        if not max_sg_norm > 0:
            raise ConfigError(f"guard.max_sg_norm={max_sg_norm!r} is not allowed; it must be > 0")
        self.action, self.max_sg_norm = action, float(max_sg_norm)
        self.skipped = 0

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

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = state["skipped"]
