"""Checkpoints written atomically and durably, and verified before they are trusted.

A checkpoint is `torch.save`'s zip archive, which stores a CRC-32 checksum of every record
(the pickled structure and each tensor's bytes). `load` checks them all before unpickling,
so flipped bytes are reported instead of training on silently damaged weights.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import random
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dni.errors import CheckpointError, CorruptCheckpoint

log = logging.getLogger(__name__)

FOLDER = "checkpoints"
CORRUPT_SUFFIX = ".corrupt"  # a damaged checkpoint set aside (kept, never deleted)


def _pattern(shard: str | None) -> re.Pattern:
    return re.compile(rf"step_(\d+){re.escape('.' + shard) if shard else ''}\.pt$")


def path_of(out_dir: str | os.PathLike, step: int, shard: str | None = None) -> Path:
    """Where the checkpoint of `step` lies: `checkpoints/step_<step>.pt`, or for one process's part
    of a run spread over several (a pipeline stage), `checkpoints/step_<step>.<shard>.pt`."""
    return Path(out_dir) / FOLDER / f"step_{step:09d}{'.' + shard if shard else ''}.pt"


def save(
    out_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2, shard: str | None = None
) -> Path:
    """Write `state` as `checkpoints/step_<step>.pt` (see `path_of` for a `shard`) and keep only
    the `keep` newest (of that shard).

    The bytes go to a temporary file that is fsynced, then renamed over the final name, and
    the folder is fsynced, so a kill or a power cut leaves either the old set of checkpoints
    or the new one. When the write fails (a full disk) the temporary file is removed and the
    older checkpoints are left as they were.
    """
    path = path_of(out_dir, step, shard)
    folder = path.parent
    temporary = path.with_suffix(".pt.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file, _checksums_on():
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _fsync_folder(folder)
    except (OSError, RuntimeError) as error:
        temporary.unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot write the checkpoint {path}: {write_error_reason(error)}; free space in {folder} "
            "and run the same command again, or write the run into another folder"
        ) from None
    for old in checkpoints(out_dir, shard)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def checkpoints(out_dir: str | os.PathLike, shard: str | None = None) -> list[Path]:
    """A run's checkpoints (of `shard`, see `path_of`), oldest first."""
    folder, name = Path(out_dir) / FOLDER, _pattern(shard)
    found = [p for p in folder.glob("step_*.pt") if name.search(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(name.search(p.name).group(1)))


def step_of(path: str | os.PathLike, shard: str | None = None) -> int | None:
    """The step a checkpoint file was saved at, read from its name; None for another name."""
    found = _pattern(shard).search(Path(path).name)
    return int(found.group(1)) if found else None


def latest(out_dir: str | os.PathLike, shard: str | None = None) -> Path | None:
    found = checkpoints(out_dir, shard)
    return found[-1] if found else None


def load(
    path: str | os.PathLike, signature: dict[str, Any], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint, verify its checksums and check it belongs to a run like this one
    (same method, model, data set and parameter shapes); raise `CheckpointError` naming the
    file otherwise (`CorruptCheckpoint` when its bytes are damaged)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"resume={str(path)!r} does not exist; point it at a run folder or a step_*.pt file"
        )
    verify(path)
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise _corrupt(path, type(error).__name__) from None
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


def load_latest(
    out_dir: str | os.PathLike,
    signature: dict[str, Any],
    device: torch.device | str = "cpu",
    set_aside: bool = False,
) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint in a run folder and its state, or None when it has none.

    A damaged newest checkpoint is reported and the one before it is used; with `set_aside`
    (the folder is this run's) the damaged ones are renamed `*.pt.corrupt`, kept for a look
    but out of the way of the checkpoints the resumed run writes. When no checkpoint is
    intact, raise `CheckpointError` naming the newest two.
    """
    found = checkpoints(out_dir)
    damaged: list[tuple[Path, CorruptCheckpoint]] = []
    for path in reversed(found):
        try:
            state = load(path, signature, device)
        except CorruptCheckpoint as error:
            damaged.append((path, error))
            continue
        for bad, error in damaged:
            kept = bad
            if set_aside:
                kept = bad.with_name(bad.name + CORRUPT_SUFFIX)
                os.replace(bad, kept)
            log.warning("%s; kept as %s, resuming from %s, the one before it", error.damage, kept, path)
        return path, state
    if not damaged:
        return None
    if len(damaged) == 1:
        raise CheckpointError(
            f"{damaged[0][1].damage} and there is no earlier one; move it away to start this run "
            "afresh, or write into a new output folder"
        )
    (newest, _), (previous, _) = damaged[:2]
    raise CheckpointError(
        f"checkpoints {newest} and {previous} are both corrupt; nothing was changed, so move "
        "them away to start this run afresh, or write into a new output folder"
    )


def verify(path: Path) -> None:
    """Raise `CorruptCheckpoint` unless every record of the archive matches its CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise _corrupt(path, type(error).__name__) from None
    if bad is not None:
        raise _corrupt(path, f"the checksum of its record {bad} does not match")


def _corrupt(path: Path, reason: str) -> CorruptCheckpoint:
    error = CorruptCheckpoint(
        f"checkpoint {path} is corrupt or truncated ({reason}); point resume at an earlier "
        "checkpoint, or start a new output folder"
    )
    error.damage = f"checkpoint {path} is corrupt or truncated ({reason})"  # without the fix
    return error


@contextlib.contextmanager
def _checksums_on() -> Iterator[None]:
    """torch can be told not to compute the records' CRC-32 (for speed); ours need them."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None or get():  # older torch always writes them
        yield
        return
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(False)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable: a directory's entries reach the disk with its fsync."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_error_reason(error: BaseException) -> str:
    """Why a write failed, in words a user acts on ("the disk is full")."""
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC:
        return "the disk is full"
    if code == errno.EDQUOT:
        return "the disk quota is exceeded"
    return getattr(error, "strerror", None) or str(error).splitlines()[0] or type(error).__name__


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
