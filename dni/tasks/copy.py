"""The copy and repeat-copy tasks, with the paper's curriculum on the sequence length N.

Copy: the core reads N random `bits`-bit vectors, then a delimiter (an extra input
channel), and must then output the N vectors in order while reading nothing. Repeat
copy: at the delimiter a second extra channel carries the number of repeats R (as
R / max_repeats); the core must output the sequence R times and then raise an end
marker (an extra output bit). R is drawn per batch, uniformly from 1..max_repeats.

Losses are in bits: binary cross-entropy summed over a step's output bits, averaged over
the output steps. The curriculum starts at N = `min_length`; at every evaluation the
current N is tested on a fixed held-out batch and, when its loss is below `threshold`
bits, N counts as solved and training moves on to N + 1. The metric is `level`, the
largest N solved so far.

Sequences are made on the fly from a seeded generator, so a run's batches are exactly
reproducible from its seed; the generator's state and the curriculum are checkpointed,
so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from dni.errors import ConfigError
from dni.lstm import LN2, loss_steps, prediction_errors, step_losses


class CopyTask:
    """Copy (`max_repeats=None`) or repeat copy (`max_repeats=R_max`), with a curriculum.

    Args:
        bits: width of the vectors to copy.
        max_repeats: None for copy; the largest R for repeat copy.
        min_length: the N the curriculum starts at.
        max_length: the N it stops raising at (None: no limit).
        threshold: bits per output step under which the current N counts as solved.
        eval_size: held-out sequences per evaluation (split over R for repeat copy).
        eval_seed: seed of the held-out sequences (one fixed set per N and R).
    """

    num_train = None

    def __init__(
        self,
        bits: int = 8,
        max_repeats: int | None = None,
        min_length: int = 1,
        max_length: int | None = None,
        threshold: float = 0.15,
        eval_size: int = 256,
        eval_seed: int = 12345,
    ):
        for key, value in (("bits", bits), ("min_length", min_length), ("eval_size", eval_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}={value!r} is not allowed; it must be an integer >= 1")
        if max_repeats is not None and (not isinstance(max_repeats, int) or max_repeats < 1):
            raise ConfigError(f"max_repeats={max_repeats!r} is not allowed; give an integer >= 1")
        if max_length is not None and (not isinstance(max_length, int) or max_length < min_length):
            raise ConfigError(
                f"max_length={max_length!r} is not allowed; give null or an integer >= min_length"
            )
        self.bits, self.max_repeats = bits, max_repeats
        self.min_length, self.max_length, self.threshold = min_length, max_length, float(threshold)
        self.eval_size, self.eval_seed = eval_size, eval_seed
        self.name = "copy" if max_repeats is None else "repeat_copy"
        self.length = min_length  # the curriculum's current N
        self.solved = 0  # the largest N solved so far
        self.device = torch.device("cpu")

    # -- what the runner needs --------------------------------------------------------------
    @property
    def repeat(self) -> bool:
        return self.max_repeats is not None

    @property
    def input_shape(self) -> tuple[int]:
        return (self.bits + (2 if self.repeat else 1),)

    @property
    def num_classes(self) -> int:
        """Output bits per step (the readout's width)."""
        return self.bits + (1 if self.repeat else 0)

    def to(self, device: torch.device | str) -> CopyTask:
        self.device = torch.device(device)
        return self

    def batches(self, batch_size: int, seed: int) -> CopyBatches:
        return CopyBatches(self, batch_size, seed)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Loss (bits per output step) and bit error rate at the current N on the held-out
        sequences; advances the curriculum when the loss is below the threshold."""
        model.eval()
        n = self.length
        repeats = range(1, self.max_repeats + 1) if self.repeat else [1]
        per = max(1, self.eval_size // len(repeats))
        loss = steps = wrong = total = 0.0
        for r in repeats:
            generator = torch.Generator().manual_seed(self.eval_seed + 1000 * n + r)
            x, y = self.sample(n, r, per, generator)
            logits, _ = model(x)
            loss += step_losses(logits, y).sum().item()
            steps += loss_steps(y).sum().item()
            w, t = prediction_errors(logits, y)
            wrong, total = wrong + w.item(), total + t.item()
        bits = loss / steps / LN2
        if bits < self.threshold:
            self.solved = max(self.solved, n)
            if self.max_length is None or n < self.max_length:
                self.length = n + 1
        return {"loss": bits, "error": wrong / total, "level": float(self.solved), "length": float(n)}

    def state_dict(self) -> dict:
        return {"length": self.length, "solved": self.solved}

    def load_state_dict(self, state: dict) -> None:
        self.length, self.solved = int(state["length"]), int(state["solved"])

    # -- the sequences ----------------------------------------------------------------------
    def sequence_length(self, n: int, r: int = 1) -> int:
        return n + 1 + r * n + (1 if self.repeat else 0)

    def sample(self, n: int, r: int, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`batch_size` sequences of N = n vectors (R = r repeats): inputs (B, L, bits+1|2)
        and targets (B, L, bits|bits+1), -1 where nothing is to be predicted."""
        bits, length = self.bits, self.sequence_length(n, r)
        data = torch.randint(0, 2, (batch_size, n, bits), generator=generator).float()
        x = torch.zeros(batch_size, length, self.input_shape[0])
        x[:, :n, :bits] = data
        x[:, n, bits] = 1.0  # the delimiter
        y = torch.full((batch_size, length, self.num_classes), -1.0)
        y[:, n + 1 : n + 1 + r * n, :bits] = data.repeat(1, r, 1)
        if self.repeat:
            x[:, n, bits + 1] = r / self.max_repeats
            y[:, n + 1 :, bits] = 0.0  # the end marker: off while copying ...
            y[:, -1, :bits] = 0.0
            y[:, -1, bits] = 1.0  # ... and on at the last step
        return x.to(self.device), y.to(self.device)


class CopyBatches:
    """Endless batches at the task's current N, from a seeded generator (checkpointed)."""

    def __init__(self, task: CopyTask, batch_size: int, seed: int):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} is not allowed; it must be an integer >= 1")
        self.task, self.batch_size = task, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        task = self.task
        r = int(torch.randint(1, task.max_repeats + 1, (), generator=self.generator)) if task.repeat else 1
        return task.sample(task.length, r, self.batch_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def copy(**kwargs) -> CopyTask:
    """The copy task (see `CopyTask`)."""
    return CopyTask(max_repeats=None, **kwargs)


def repeat_copy(max_repeats: int = 3, **kwargs) -> CopyTask:
    """The repeat-copy task (see `CopyTask`)."""
    return CopyTask(max_repeats=max_repeats, **kwargs)
