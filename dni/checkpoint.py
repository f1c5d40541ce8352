"""Checkpoints written atomically, so a kill at any moment leaves a loadable latest one."""

from __future__ import annotations

import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dni.errors import CheckpointError

FOLDER = "checkpoints"
_NAME = re.compile(r"step_(\d+)\.pt$")


def save(out_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as `checkpoints/step_<step>.pt` (temporary file, then rename) and keep
    only the `keep` newest checkpoints."""
    folder = Path(out_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:09d}.pt"
    temporary = path.with_suffix(".pt.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    for old in checkpoints(out_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """A run's checkpoints, oldest first."""
    folder = Path(out_dir) / FOLDER
    found = [p for p in folder.glob("step_*.pt") if _NAME.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.search(p.name).group(1)))


def latest(out_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def load(
    path: str | os.PathLike, signature: dict[str, Any], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint and check it belongs to a run like this one (same method, model,
    data set and parameter shapes); raise `CheckpointError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"resume={str(path)!r} does not exist; point it at a run folder or a step_*.pt file"
        )
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(error).__name__}); delete it to resume "
            "from an earlier one, or start a new run"
        ) from None
    if not isinstance(state, dict) or "signature" not in state:
        raise CheckpointError(
            f"{path} is not a dni checkpoint; point resume at a step_*.pt file written by dni"
        )
    saved = state["signature"]
    differences = [
        f"{k}={saved.get(k)!r} there, {v!r} here" for k, v in signature.items() if saved.get(k) != v
    ]
    if differences:
        raise CheckpointError(
            f"checkpoint {path} belongs to another run ({'; '.join(differences[:3])}); "
            "resume with the same configuration or start a new output folder"
        )
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
