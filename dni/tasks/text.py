"""Character-level language modelling, measured in bits per character on a held-out split.

The text is read once into a tensor of character ids. Training batches are `B` parallel
contiguous streams of the training split, read `length` characters at a time, so batch
k+1 continues batch k (`contiguous`, the default: the recurrent methods then carry the
core's state across batches, as truncated BPTT over a long stream does; the method
configs read `dataset.contiguous`). With `contiguous=False` every batch is `B` windows
at random places instead, each read from a zero state.

Two layouts are read:
- one plain text file (Tiny Shakespeare's `input.txt`): its last `test_fraction` is held
  out, and the vocabulary is every character of the file;
- a folder of Penn Treebank character files (`ptb.char.train.txt`, `ptb.char.valid.txt`,
  `ptb.char.test.txt`: space-separated characters, `_` between words, one sentence a
  line): each token is a symbol and every line ends with a newline symbol; `split` picks
  the held-out file.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dni.data import ROOT_VARIABLE, ClassificationData, data_root
from dni.errors import ConfigError, DataNotFoundError

PTB_FILES = {"train": "ptb.char.train.txt", "valid": "ptb.char.valid.txt", "test": "ptb.char.test.txt"}


class CharacterText:
    """A character corpus as id tensors: the runner's task for language modelling.

    Args:
        name: for logs and metrics.
        train, test: character ids of the two splits.
        vocabulary: the symbol of every id.
        length: characters per stream per batch.
        eval_size: held-out characters evaluated (None: the whole split).
        eval_streams: parallel streams the held-out text is cut into for evaluation.
        contiguous: batches continue each other (else: random windows).
    """

    num_train = None

    def __init__(
        self,
        name: str,
        train: Tensor,
        test: Tensor,
        vocabulary: list[str],
        length: int = 50,
        eval_size: int | None = None,
        eval_streams: int = 16,
        contiguous: bool = True,
    ):
        if not isinstance(length, int) or length < 1:
            raise ConfigError(f"length={length!r} is not allowed; it must be an integer >= 1")
        if eval_size is not None and (not isinstance(eval_size, int) or eval_size < 2):
            raise ConfigError(f"eval_size={eval_size!r} is not allowed; give null or an integer >= 2")
        self.name, self.train, self.test, self.vocabulary = name, train, test, list(vocabulary)
        self.length, self.eval_size, self.eval_streams = length, eval_size, eval_streams
        self.contiguous = contiguous

    @property
    def input_shape(self) -> tuple[int]:
        return (len(self.vocabulary),)

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)

    def to(self, device: torch.device | str) -> CharacterText:
        self.train, self.test = self.train.to(device), self.test.to(device)
        return self

    def batches(self, batch_size: int, seed: int) -> StreamBatches:
        if self.contiguous:
            return StreamBatches(self.train, batch_size, self.length, seed)
        return WindowBatches(self.train, batch_size, self.length, seed)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, chunk: int = 250) -> dict[str, float]:
        """Bits per character (`bpc`), cross-entropy in nats (`loss`) and the rate of wrong
        next-character guesses (`error`) over the held-out text, read as `eval_streams`
        parallel streams with the state carried from chunk to chunk."""
        model.eval()
        ids = self.test if self.eval_size is None else self.test[: self.eval_size]
        streams = max(1, min(self.eval_streams, (len(ids) - 1) // 2))
        per = (len(ids) - 1) // streams
        x = ids[: streams * per].view(streams, per)
        y = ids[1 : streams * per + 1].view(streams, per)
        state, nats, wrong = None, 0.0, 0
        for i in range(0, per, chunk):
            logits, state = model(x[:, i : i + chunk], state)
            target = y[:, i : i + chunk]
            nats += F.cross_entropy(logits.transpose(1, 2), target, reduction="sum").item()
            wrong += (logits.argmax(-1) != target).sum().item()
        count = streams * per
        return {"loss": nats / count, "bpc": nats / count / math.log(2), "error": wrong / count}


class StreamBatches:
    """`batch_size` contiguous streams of the training ids, `length` characters per batch,
    each batch continuing the last; back to the start after the end (a new epoch). The
    seed sets where in the first window the streams begin. Position and epoch are the
    state, so a resumed run reads exactly what it would have read."""

    def __init__(self, ids: Tensor, batch_size: int, length: int, seed: int):
        per = len(ids) // batch_size if isinstance(batch_size, int) and batch_size >= 1 else 0
        if per < length + 1:
            raise ConfigError(
                f"batch_size={batch_size!r} does not fit {len(ids)} training characters in streams "
                f"of at least dataset.length + 1 = {length + 1}; choose a smaller batch size or length"
            )
        self.streams = ids[: per * batch_size].view(batch_size, per)
        self.length = length
        self.position = int(torch.randint(0, length, (), generator=torch.Generator().manual_seed(seed)))
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        p = self.position
        if p + self.length + 1 > self.streams.shape[1]:
            p, self.epoch = 0, self.epoch + 1
        self.position = p + self.length
        return self.streams[:, p : p + self.length], self.streams[:, p + 1 : p + self.length + 1]

    def state_dict(self) -> dict:
        return {"position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


class WindowBatches:
    """`batch_size` windows of `length` characters at random places, from a seeded
    generator (its state is the iterator's state)."""

    def __init__(self, ids: Tensor, batch_size: int, length: int, seed: int):
        if not isinstance(batch_size, int) or batch_size < 1 or len(ids) < length + 1:
            raise ConfigError(
                f"batch_size={batch_size!r} or length={length} does not fit {len(ids)} "
                "training characters; choose a batch size >= 1 and a shorter length"
            )
        self.ids, self.batch_size, self.length = ids, batch_size, length
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, len(self.ids) - self.length, (self.batch_size,), generator=self.generator)
        index = starts.to(self.ids.device)[:, None] + torch.arange(self.length + 1, device=self.ids.device)
        window = self.ids[index]
        return window[:, :-1], window[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def text(
    root: str | None = None,
    file: str = "tinyshakespeare/input.txt",
    length: int = 50,
    test_fraction: float = 0.1,
    split: str = "test",
    eval_size: int | None = None,
    eval_streams: int = 16,
    contiguous: bool = True,
    name: str | None = None,
) -> CharacterText:
    """Read `root/file`: a plain text file, or a folder of Penn Treebank character files."""
    path = data_root(root) / file
    if path.is_dir():
        train, held_out, vocabulary = _read_ptb(path, split)
    elif path.is_file():
        if not 0 < test_fraction < 1:
            raise ConfigError(f"test_fraction={test_fraction!r} is not allowed; it must lie in (0, 1)")
        content = path.read_text(encoding="utf-8")
        vocabulary = sorted(set(content))
        ids = _encode(list(content), vocabulary)
        cut = len(ids) - int(len(ids) * test_fraction)
        train, held_out = ids[:cut], ids[cut:]
    else:
        raise DataNotFoundError(
            f"{path} does not exist; set {ROOT_VARIABLE} or dataset.root to the folder holding {file} "
            "(Tiny Shakespeare: tinyshakespeare/input.txt; Penn Treebank characters: a folder with "
            f"{', '.join(PTB_FILES.values())})"
        )
    default = "ptb_char" if path.is_dir() else path.parent.name or path.stem
    return CharacterText(
        name or default, train, held_out, vocabulary, length, eval_size, eval_streams, contiguous
    )


def _read_ptb(folder: Path, split: str) -> tuple[Tensor, Tensor, list[str]]:
    if split not in ("valid", "test"):
        raise ConfigError(f"split={split!r} is unknown; choose valid or test")
    missing = [f for f in (PTB_FILES["train"], PTB_FILES[split]) if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{folder} lacks {', '.join(missing)}; point dataset.file at a folder holding the Penn "
            "Treebank character files"
        )
    tokens = {}
    for key in PTB_FILES:
        if (folder / PTB_FILES[key]).is_file():
            lines = (folder / PTB_FILES[key]).read_text(encoding="utf-8").splitlines()
            tokens[key] = [t for line in lines for t in [*line.split(), "\n"]]
    vocabulary = sorted({t for symbols in tokens.values() for t in symbols})
    return _encode(tokens["train"], vocabulary), _encode(tokens[split], vocabulary), vocabulary


def _encode(symbols: list[str], vocabulary: list[str]) -> Tensor:
    index = {s: i for i, s in enumerate(vocabulary)}
    return torch.from_numpy(np.fromiter((index[s] for s in symbols), dtype=np.int64, count=len(symbols)))


def next_character(
    root: str | None = None,
    file: str = "tinyshakespeare/input.txt",
    context: int = 8,
    test_fraction: float = 0.1,
    num_train: int | None = 200_000,
    num_test: int | None = 20_000,
    seed: int = 0,
) -> ClassificationData:
    """A feed-forward classification task from a text: the next character from the `context`
    characters before it, one-hot and flattened (`context * vocabulary` inputs, one class per
    character). Windows are drawn at random from each split (at most `num_train` / `num_test`;
    None for all), so the feed-forward methods meet data other than images."""
    if not isinstance(context, int) or context < 1:
        raise ConfigError(f"context={context!r} is not allowed; it must be an integer >= 1")
    corpus = text(root, file, length=context, test_fraction=test_fraction)
    vocabulary = len(corpus.vocabulary)
    generator = torch.Generator().manual_seed(seed)

    def windows(ids: Tensor, count: int | None) -> tuple[Tensor, Tensor]:
        starts = torch.randperm(len(ids) - context, generator=generator)[:count]
        previous = ids[starts[:, None] + torch.arange(context)]
        return F.one_hot(previous, vocabulary).flatten(1).float(), ids[starts + context]

    x_train, y_train = windows(corpus.train, num_train)
    x_test, y_test = windows(corpus.test, num_test)
    name = f"{corpus.name}_next_character"
    return ClassificationData(name, x_train, y_train, x_test, y_test, num_classes=vocabulary)
