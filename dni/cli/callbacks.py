"""Hydra callbacks: an early check of the output folder, and a sweep's report at its end."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dni.cli import sweep  # noqa: F401  (registers the resolvers that name a sweep's jobs)
from dni.errors import FolderInUse
from dni.tracking import lock_folder

log = logging.getLogger("dni")


class RunFailed(CompactHydraException):
    """Hydra prints this exception's message alone, then exits with status 1."""


class OutputFolderCheck(Callback):
    """Stops, with one sentence, when the run or sweep folder cannot be written.

    Hydra turns exceptions in callbacks into warnings, so this one exits by itself.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _require_writable(config, "run")
        _lock_run_folder(Path(str(config.hydra.run.dir)))

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


def _lock_run_folder(folder: Path) -> None:
    """Claim the run folder before Hydra writes `.hydra/` into it, so a second run started
    into it stops without touching what the first one wrote; held until this process ends."""
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun rank 0 holds the folder
        return
    try:
        lock_folder(folder)
    except FolderInUse as error:
        print(error, file=sys.stderr)
        sys.exit(1)


def why_unwritable(folder: Path) -> str | None:
    """Why `folder` could not be created and written, or None.

    Permission bits do not tell for root, nor for /proc or a read-only mount, so the folder
    is created (Hydra would create it next anyway) and a temporary file written in it.
    """
    path = folder.absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        return f"{path} is a file"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"it cannot be created or written there ({error.strerror or type(error).__name__})"
    return None


class SweepSetup(Callback):
    """At the start of a multirun: what the sweep varies, for the jobs' folder names, log lines
    and HPARAMS columns (`dni.cli.sweep`)."""

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        from dni.cli.sweep import plan, write_plan

        HydraConfig.instance().set_config(config)
        sweep_plan = plan(config, config_name)
        if sweep_plan is not None:
            write_plan(Path(str(config.hydra.sweep.dir)), sweep_plan)
            if sweep_plan["swept"]:
                log.info("sweeping %s: %d jobs", ", ".join(sweep_plan["swept"]), len(sweep_plan["jobs"]))


class SweepReport(Callback):
    """At the end of a multirun: the sweep's table, figures and CSV files (what they show from
    the experiment's `report:` node, else from what the sweep varied), and a non-zero exit
    when any job failed or diverged, after all jobs ran."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from dni.cli.report import ReportSpec, collect, make_report

        sweep_dir = getattr(self, "sweep_dir", None) or Path(str(config.hydra.sweep.dir))
        runs = collect(sweep_dir)
        if runs:
            spec = ReportSpec.from_dict(
                OmegaConf.to_container(config.report) if config.get("report") else None
            )
            report = make_report(sweep_dir, spec)
            log.info("\n%s", report.read_text())
        failed = [run for run in runs if run.status != "completed"]
        if failed:
            listing = ", ".join(f"{run.path.name} ({run.status})" for run in failed)
            log.error("%d of %d jobs did not complete: %s", len(failed), len(runs), listing)
            sys.exit(1)
