"""Data you can trust: damaged or swapped MNIST files stop the run with one sentence naming
the file, made as real corrupted copies in a temporary data root (the shared one is read-only)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dni import integrity
from dni.data import vision
from dni.errors import DataError, DataNotFoundError
from tests.helpers import data_root, run_cli

RAW = data_root() / "MNIST" / "raw"
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
pytestmark = pytest.mark.skipif(not (RAW / FILES[0]).is_file(), reason=f"MNIST is not under {RAW}")


def _copy_of_mnist(tmp_path: Path, with_sums: bool = True) -> Path:
    """A data root whose MNIST/raw links to the real files (only a damaged one is a copy)."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        (raw / name).symlink_to(RAW / name)
    if with_sums:
        shutil.copy(RAW / integrity.SUMS_FILE, raw / integrity.SUMS_FILE)
    return raw


def _replace(raw: Path, name: str, content: bytes) -> Path:
    (raw / name).unlink()
    (raw / name).write_bytes(content)
    return raw / name


def _random_bytes(raw: Path) -> tuple[Path, str]:
    size = (RAW / FILES[0]).stat().st_size
    return _replace(raw, FILES[0], os.urandom(size)), "is not an IDX images file"


def _truncated(raw: Path) -> tuple[Path, str]:
    content = (RAW / FILES[0]).read_bytes()
    return _replace(
        raw, FILES[0], content[: len(content) // 2]
    ), "is truncated (23520008 bytes, not 47040016)"


def _test_labels_as_train_labels(raw: Path) -> tuple[Path, str]:
    path = _replace(raw, FILES[1], (RAW / FILES[3]).read_bytes())
    return path, "holds labels of shape (10000,), but the train split has (60000,)"


def _relabelled(raw: Path) -> tuple[Path, str]:
    """A well-formed file with other labels: only a checksum tells."""
    content = bytearray((RAW / FILES[1]).read_bytes())
    content[8:] = bytes((label + 1) % 10 for label in content[8:])
    sums = raw / integrity.SUMS_FILE
    return _replace(raw, FILES[1], bytes(content)), f"does not match its SHA256 in {sums}"


DAMAGE = {
    "random bytes": _random_bytes,
    "truncated": _truncated,
    "test labels as train labels": _test_labels_as_train_labels,
    "relabelled": _relabelled,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_mnist_file_is_one_sentence_naming_it(damage, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = _copy_of_mnist(tmp_path)
    path, problem = DAMAGE[damage](raw)
    with pytest.raises(DataError) as error:
        vision("mnist", tmp_path / "data", download=False)
    text = str(error.value)
    assert f"{path} {problem}" in text, text
    assert text.endswith("restore the original file, or delete it so that it is downloaded again")
    assert "\n" not in text and ". " not in text


def test_a_missing_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    raw = _copy_of_mnist(tmp_path)
    (raw / FILES[1]).unlink()
    with pytest.raises(
        DataNotFoundError, match=rf"MNIST is not under {tmp_path / 'data'} \(missing {FILES[1]}\)"
    ):
        vision("mnist", tmp_path / "data", download=False)


def test_a_truncated_file_on_the_command_line_is_named_not_reported_missing(tmp_path):
    raw = _copy_of_mnist(tmp_path)
    path, problem = _truncated(raw)
    result = run_cli(
        "dataset=mnist",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"XDG_CACHE_HOME": str(tmp_path / "cache")},
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"MNIST file {path} {problem}; restore the original file" in result.stderr
    assert "not under" not in result.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_published_checksums_hold_without_a_sums_file_and_are_computed_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(integrity, "_digests", {})
    raw = _copy_of_mnist(tmp_path, with_sums=False)
    known = integrity.published(integrity.MNIST_SHA256, "sha256", "the published checksums")
    integrity.check_idx_folder(raw, "MNIST", known)  # the real files pass
    cached = json.loads(integrity.cache_file().read_text())
    assert {Path(p).name for p in cached} == set(FILES)  # keyed by the real files' paths

    # Another process (an empty memory) checks again from the cache file, hashing nothing.
    monkeypatch.setattr(integrity, "_digests", {})
    with monkeypatch.context() as patched:
        patched.setattr(integrity.hashlib, "new", lambda *_: pytest.fail("hashed a cached file"))
        integrity.check_idx_folder(raw, "MNIST", known)

    _relabelled(raw)  # a new file under the same name: new size or time, so hashed again
    with pytest.raises(DataError, match="does not match its SHA256 in the published checksums"):
        integrity.check_idx_folder(raw, "MNIST", known)
