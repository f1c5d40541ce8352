"""Errors a user can cause. Each carries one sentence that names the fix."""

from __future__ import annotations

import signal


class DNIError(Exception):
    """Base class: the runner prints the message alone, without a traceback.

    `record` says whether the runner should write the error into the run folder's
    `metrics.json`; it is False when the folder already tells of it, or is not this run's.
    """

    record = True


class ConfigError(DNIError, ValueError):
    """A configuration value that cannot work."""


class DataNotFoundError(DNIError, FileNotFoundError):
    """A data set that is neither on disk nor downloadable."""


class DataError(DNIError):
    """A data file that is damaged or is not the file its name says."""


class CheckpointError(DNIError):
    """A checkpoint that is corrupt, cannot be written, or belongs to another run."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose bytes are damaged: unreadable, truncated, or failing its checksums."""


class RunFolderError(DNIError, OSError):
    """The run folder cannot be written (a full disk)."""


class FolderInUse(DNIError):
    """Another live process is writing the same run folder; it is not ours to touch."""

    record = False


class Interrupted(DNIError):
    """Training stopped on SIGINT or SIGTERM; its status is recorded.

    `saved`: a checkpoint of this very step was saved. Otherwise (a pipeline stops at once,
    mid-step) `last_checkpoint` is the step of the newest checkpoint, or None if none was saved.
    """

    record = False

    def __init__(
        self, signum: int, step: int, out_dir: str, saved: bool = True, last_checkpoint: int | None = None
    ):
        self.signum = signum
        name = signal.Signals(signum).name
        if saved:
            then = (
                f"a checkpoint is saved in {out_dir}, so running the same command again continues from there"
            )
        elif last_checkpoint:
            then = (
                f"running the same command again continues from the checkpoint of step {last_checkpoint} "
                f"in {out_dir}"
            )
        else:
            then = "no checkpoint was saved yet, so running the same command again starts over"
        super().__init__(f"training interrupted by {name} at step {step}; {then}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 128 + its number (130, 143)."""
        return 128 + self.signum


class Divergence(DNIError, FloatingPointError):
    """Training produced a non-finite or exploding quantity."""

    record = False  # the loop records it itself, with the run's history

    def __init__(
        self, quantity: str, value: float, where: str = "", step: int | None = None, fix: str | None = None
    ):
        self.quantity, self.value, self.where, self.step = quantity, value, where, step
        self.fix = fix or (
            "lower the learning rate or the synthetic-gradient scale, or set guard.action=skip"
        )
        super().__init__(self._message())

    def at_step(self, step: int) -> Divergence:
        self.step = step
        self.args = (self._message(),)
        return self

    def _message(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        block = f" in {self.where}" if self.where else ""
        return f"training diverged{at}: {self.quantity}{block} is {self.value:.4g}; {self.fix}"
