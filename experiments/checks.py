"""Checks Hydra runs before any job starts, so their errors read as one sentence."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class RunFailed(CompactHydraException):
    """Hydra prints this exception's message alone, then exits with status 1."""


class OutputFolderCheck(Callback):
    """Stops, with one sentence, when the run or sweep folder cannot be written.

    Hydra turns exceptions in callbacks into warnings, so this one exits by itself.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _require_writable(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _require_writable(config, "sweep")


def _require_writable(config: DictConfig, mode: str) -> None:
    HydraConfig.instance().set_config(config)  # the folder names use ${hydra:...}
    folder = str(config.hydra[mode].dir)
    problem = why_unwritable(Path(folder))
    if problem:
        print(
            f"cannot write the output folder {folder}: {problem}; set hydra.{mode}.dir to a writable folder",
            file=sys.stderr,
        )
        sys.exit(1)


def why_unwritable(folder: Path) -> str | None:
    """Why `folder` could not be created and written, or None, without creating anything."""
    path = folder.absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        return f"{path} is a file"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None
