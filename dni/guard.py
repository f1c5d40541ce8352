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

    Deferred checks (`defer`, `end_checks`, `check`) serve a step that must not wait on the
    device (the batched DNI step): the step records its quantities as tensors, stacked into
    one row per step and kept on the device, and `check` reads the rows in one go, raising
    `Divergence` for the first quantity that went bad, with the step it went bad at.
    They exist for `action="stop"` only: skipping an update needs to know at once.
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
        # Deferred checks: this step's (quantity, where, value); the keys of a step's checks; one
        # row of values per step since the last `check`, with its position in that window.
        self._pending: list[tuple[str, str, Tensor]] = []
        self._keys: tuple[tuple[str, str], ...] | None = None
        self._rows: list[tuple[int | Tensor, Tensor]] = []
        self._window = 0

    def finite(self, quantity: str, value: Tensor, where: str = "") -> bool:
        """True when every entry of `value` is finite."""
        if bool(torch.isfinite(value).all()):
            return True
        bad = value[~torch.isfinite(value)].flatten()[0].item()
        return self._fail(quantity, bad, where)

    def synthetic_gradient(self, gradient: Tensor, where: str, norm: Tensor | None = None) -> bool:
        """True when an injected gradient is finite and its norm (`norm`, if already computed)
        within `max_sg_norm`."""
        norm = gradient.norm() if norm is None else norm
        if not bool(torch.isfinite(norm)):
            return self._fail("synthetic gradient", norm.item(), where)
        if self.max_sg_norm < math.inf and norm.item() > self.max_sg_norm:
            return self._fail(f"synthetic-gradient norm (bound {self.max_sg_norm:g})", norm.item(), where)
        return True

    def defer(self, quantity: str, value: Tensor, where: str = "") -> None:
        """Check the scalar `value` later, without reading it now: it must be finite and, for a
        synthetic-gradient norm (`quantity="synthetic gradient"`), within `max_sg_norm`."""
        if self.action != "stop":
            raise ConfigError(f"guard.action={self.action!r} needs checks at once; deferred checks stop only")
        self._pending.append((quantity, where, value.detach()))

    KEEP = 256  # rows a loop that never calls `check` holds before it keeps only the first bad one

    def end_checks(self) -> None:
        """End this step's deferred checks: their values are stacked into one row, kept on the
        device; called once at the end of every step that defers."""
        if not self._pending:
            return
        keys = tuple((q, w) for q, w, _ in self._pending)
        dtype = self._pending[0][2].dtype
        row = torch.stack([v if v.dtype == dtype else v.to(dtype) for _, _, v in self._pending])
        self._pending = []
        if self._keys is not None and keys != self._keys:  # another set of checks: read the last
            self.check()
        self._keys = keys
        self._rows.append((self._window, row))
        self._window += 1
        if len(self._rows) >= 2 * self.KEEP:  # still no sync: keep the first bad row of the oldest
            older = self._rows[: self.KEEP]
            rows = torch.stack([r for _, r in older])
            first = torch.where(
                self._bad(rows).any(1), torch.arange(len(older), device=rows.device), len(older)
            )
            first = first.min().clamp(max=len(older) - 1)  # the last row, if none is bad
            positions = torch.stack([torch.as_tensor(p, device=rows.device) for p, _ in older])
            self._rows = [(positions[first], rows[first]), *self._rows[self.KEEP :]]

    def _bad(self, rows: Tensor) -> Tensor:
        bad = ~torch.isfinite(rows)
        if self.max_sg_norm < math.inf:
            bounded = torch.tensor([q == "synthetic gradient" for q, _ in self._keys], device=rows.device)
            bad |= bounded & (rows > self.max_sg_norm)
        return bad

    def check(self, step: int | None = None) -> None:
        """Read the deferred checks (one host sync) and raise `Divergence` for the first quantity
        that went bad, naming the step it went bad at; `step` is the number of steps completed
        now (without it the step is left for the caller to add)."""
        self.end_checks()
        held, window = self._rows, self._window
        self._rows, self._window = [], 0
        if not held:
            return
        rows = torch.stack([r for _, r in held])
        bad = self._bad(rows).tolist()
        found = next(((s, n) for s, row in enumerate(bad) for n, b in enumerate(row) if b), None)
        if found is None:
            return
        s, n = found
        (quantity, where), value = self._keys[n], rows[s, n].item()
        if quantity == "synthetic gradient" and math.isfinite(value):
            quantity = f"synthetic-gradient norm (bound {self.max_sg_norm:g})"
        at = None if step is None else step - window + int(held[s][0]) + 1
        raise Divergence(quantity, value, where, step=at)

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
