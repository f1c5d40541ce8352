"""Character language modelling for feed-forward sequence models (a Transformer): windows of
character ids, each with the next character at every position.

Unlike `dni.tasks.text` (contiguous streams whose state a recurrent core carries), every
window here stands alone, so the data is a `ClassificationData` whose inputs are `(N, T)`
ids and whose labels are `(N, T)` ids, batched by index like images; the model predicts
logits `(B, classes, T)`. Evaluation reads the held-out text as consecutive windows and
scores every position (the first positions of a window see little context, so this is a
little above the bits per character of a sliding window).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dni.data import ClassificationData
from dni.errors import ConfigError
from dni.tasks.text import text


class TokenWindows(ClassificationData):
    """Windows of token ids `(N, T)` labelled with the next token at every position `(N, T)`."""

    def to(self, device: torch.device | str) -> TokenWindows:
        move = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return TokenWindows(self.name, num_classes=self.num_classes, **move)

    def evaluate(self, model: nn.Module, batch_size: int = 256) -> dict[str, float]:
        """Per-character cross-entropy in nats (`loss`), bits per character (`bpc`) and the rate
        of wrong next-character guesses (`error`) over the held-out windows, in eval mode."""
        scores = super().evaluate(model, batch_size)
        return {**scores, "bpc": scores["loss"] / math.log(2)}


def char_windows(
    root: str | None = None,
    file: str = "tinyshakespeare/input.txt",
    length: int = 64,
    test_fraction: float = 0.1,
    num_train: int | None = 100_000,
    num_test: int | None = None,
    seed: int = 0,
) -> TokenWindows:
    """Windows of `length` characters of `root/file`: `num_train` drawn at random places of the
    training split (None: every start), and the held-out split cut into consecutive windows
    (at most `num_test`; None: all of it)."""
    if not isinstance(length, int) or length < 1:
        raise ConfigError(f"length={length!r} is not allowed; it must be an integer >= 1")
    corpus = text(root, file, length=length, test_fraction=test_fraction)
    generator = torch.Generator().manual_seed(seed)

    def windows(starts: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        index = starts[:, None] + torch.arange(length + 1)
        both = ids[index]
        return both[:, :-1].contiguous(), both[:, 1:].contiguous()

    if len(corpus.train) <= length or len(corpus.test) <= length:
        raise ConfigError(f"length={length} is longer than a split of {file}; choose a shorter window")
    starts = torch.randperm(len(corpus.train) - length, generator=generator)[:num_train]
    x_train, y_train = windows(starts, corpus.train)
    held_out = torch.arange(0, len(corpus.test) - length, length)[:num_test]
    x_test, y_test = windows(held_out, corpus.test)
    name = f"{corpus.name}_windows"
    return TokenWindows(name, x_train, y_train, x_test, y_test, num_classes=len(corpus.vocabulary))
