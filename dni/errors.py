"""Errors a user can cause. Each carries one sentence that names the fix."""


class DNIError(Exception):
    """Base class: the runner prints the message alone, without a traceback."""


class ConfigError(DNIError, ValueError):
    """A configuration value that cannot work."""


class DataNotFoundError(DNIError, FileNotFoundError):
    """A data set that is neither on disk nor downloadable."""


class DataError(DNIError):
    """A data file that is damaged or is not the file its name says."""


class CheckpointError(DNIError):
    """A checkpoint that is corrupt or belongs to another run."""


class Divergence(DNIError, FloatingPointError):
    """Training produced a non-finite or exploding quantity."""

    def __init__(self, quantity: str, value: float, where: str = "", step: int | None = None):
        self.quantity, self.value, self.where, self.step = quantity, value, where, step
        super().__init__(self._message())

    def at_step(self, step: int) -> "Divergence":
        self.step = step
        self.args = (self._message(),)
        return self

    def _message(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        block = f" in {self.where}" if self.where else ""
        return (
            f"training diverged{at}: {self.quantity}{block} is {self.value:.4g}; lower the "
            "learning rate or the synthetic-gradient scale, or set guard.action=skip"
        )
