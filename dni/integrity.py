"""Data files checked before they are read: IDX headers and sizes, and known checksums.

A damaged or swapped data file would otherwise fail deep inside torchvision (an opaque
`AssertionError`), be reported as missing, or, worst, train without a word on the wrong
labels. Each problem here is one sentence naming the file and what is wrong with it.

Hashing the files is the only slow part (a few hundred MB for CIFAR-10), so each file's
digest is cached, keyed by its path, size and modification time, in a JSON file under
$XDG_CACHE_HOME/dni (never inside the data root, which may be read-only or shared); when
that cache cannot be written the digests are kept for this process only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from dni.errors import DataError

SUMS_FILE = "SHA256SUMS"
_FIX = "restore the original file, or delete it so that it is downloaded again"

# The published SHA-256 of the four uncompressed MNIST files (torchvision only lists the MD5s
# of the .gz archives, which are gone once the files are unpacked).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# MNIST and Fashion-MNIST: file stem -> (IDX magic number, shape the file must hold).
IDX_FILES = {
    "train-images-idx3-ubyte": (0x803, (60000, 28, 28)),
    "train-labels-idx1-ubyte": (0x801, (60000,)),
    "t10k-images-idx3-ubyte": (0x803, (10000, 28, 28)),
    "t10k-labels-idx1-ubyte": (0x801, (10000,)),
}

_digests: dict[str, dict] = {}  # this process's cache: path -> {"size", "mtime_ns", algorithm: hex}


# file name -> (hash algorithm, hex digest, where the digest comes from)
Known = dict[str, tuple[str, str, str]]


def published(digests: dict[str, str], algorithm: str, source: str) -> Known:
    return {name: (algorithm, value, source) for name, value in digests.items()}


def check_idx_folder(folder: Path, name: str, known: Known | None = None) -> None:
    """Check the MNIST-layout files present in `folder` (missing ones are the downloader's
    business): header, shape, size and label range, then known checksums; raise `DataError`."""
    for stem in IDX_FILES:
        if (folder / stem).is_file():
            check_idx_file(folder / stem, name)
    check_sums(folder, known or {})


def check_idx_file(path: Path, name: str) -> None:
    """One IDX file of MNIST's layout: the header's magic number and shape, the file's size,
    and for labels that every label is a class (0-9)."""
    magic, shape = IDX_FILES[path.name]
    kind = "images" if magic == 0x803 else "labels"
    header_size = 4 + 4 * len(shape)
    size = path.stat().st_size
    with path.open("rb") as file:
        header = file.read(header_size)
    if len(header) < header_size or struct.unpack(">I", header[:4])[0] != magic:
        raise DataError(
            f"{name} file {path} is not an IDX {kind} file (it starts with {header[:4].hex() or 'nothing'}, "
            f"not {magic:08x}); {_FIX}"
        )
    found = struct.unpack(f">{len(shape)}I", header[4:])
    if found != shape:
        split = "train" if path.name.startswith("train") else "test"
        raise DataError(
            f"{name} file {path} holds {kind} of shape {found}, but the {split} split has "
            f"{shape}; it is another file under this name: {_FIX}"
        )
    expected = header_size + int(torch.Size(shape).numel())
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{name} file {path} is {state} ({size} bytes, not {expected}); {_FIX}")
    if kind == "labels":
        labels = path.read_bytes()[header_size:]
        if max(labels) > 9:
            raise DataError(f"{name} file {path} holds a label {max(labels)}, not a class 0-9; {_FIX}")


def check_sums(folder: Path, known: Known) -> None:
    """Compare the digest of each file present in `folder` with `known`, and with the folder's
    own SHA256SUMS (as `sha256sum` writes it) where it has one, which takes precedence."""
    known = {**known, **published(read_sums(folder), "sha256", str(folder / SUMS_FILE))}
    for file_name, (algorithm, expected, source) in sorted(known.items()):
        path = folder / file_name
        if path.is_file() and digest(path, algorithm) != expected.lower():
            raise DataError(
                f"{path} does not match its {algorithm.upper()} in {source} (a damaged file, or "
                f"another file under this name); {_FIX}"
            )


def read_sums(folder: Path) -> dict[str, str]:
    """`folder/SHA256SUMS` as file name -> digest; empty if there is none."""
    path = folder / SUMS_FILE
    if not path.is_file():
        return {}
    sums = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and len(parts[0]) == 64:
            sums[parts[1].strip().lstrip("*")] = parts[0].lower()
    return sums


def digest(path: Path, algorithm: str) -> str:
    """The file's hex digest, from the cache when its size and modification time are unchanged."""
    stat = path.stat()
    key = str(path.resolve())
    cache = _load_cache()
    entry = cache.get(key) or {}
    if entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
        entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if algorithm not in entry:
        hasher = hashlib.new(algorithm)
        with path.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                hasher.update(chunk)
        entry[algorithm] = hasher.hexdigest()
        cache[key] = entry
        _save_cache(cache)
    _digests[key] = entry
    return entry[algorithm]


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dni" / "digests.json"


def _load_cache() -> dict[str, dict]:
    try:
        return {**json.loads(cache_file().read_text()), **_digests}
    except (OSError, ValueError):
        return dict(_digests)


def _save_cache(cache: dict[str, dict]) -> None:
    """Written whole to a temporary file, then renamed: concurrent runs at worst lose an entry."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache, indent=1))
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only home: the digests stay in this process's memory
