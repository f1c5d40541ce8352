"""The sequence tasks: layouts, seeds and resumes, the curriculum, the text loaders, bits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dni.errors import DataNotFoundError
from dni.lstm import LSTMNet, step_losses
from dni.tasks import copy, repeat_copy, text
from tests.helpers import data_root


class Recaller(nn.Module):
    """A perfect copier that cheats: it reads the answer from the input it was given."""

    def forward(self, x, state=None):
        bits = x.shape[2] - 1
        n = int(x[0, :, bits].argmax())  # the delimiter's step
        logits = torch.full((x.shape[0], x.shape[1], bits), -30.0)
        logits[:, n + 1 :] = 60 * x[:, :n, :bits] - 30  # +30 where the bit is 1
        return logits, state


class Silent(nn.Module):
    """Logits of zero: one bit of loss per bit, a uniform guess among classes."""

    def __init__(self, outputs: int):
        super().__init__()
        self.outputs = outputs

    def forward(self, x, state=None):
        return torch.zeros(*x.shape[:2], self.outputs), state


def test_copy_sequences_ask_for_the_inputs_back_after_the_delimiter():
    task = copy(bits=8)
    x, y = task.sample(5, 1, 3, torch.Generator().manual_seed(0))
    assert x.shape == (3, 11, 9) and y.shape == (3, 11, 8) and task.input_shape == (9,)
    assert torch.equal(y[:, 6:], x[:, :5, :8])  # the N vectors, in order, after the delimiter
    assert (y[:, :6] == -1).all()  # nothing to predict while reading
    assert torch.equal(x[:, :, 8], (torch.arange(11) == 5).float().expand(3, -1))
    assert (x[:, 6:] == 0).all()


def test_repeat_copy_asks_r_times_then_for_the_end_marker():
    task = repeat_copy(bits=4, max_repeats=3)
    x, y = task.sample(2, 3, 2, torch.Generator().manual_seed(0))
    assert x.shape == (2, 2 + 1 + 6 + 1, 6) and y.shape == (2, 10, 5)
    assert x[0, 2, 5] == 1.0 and x[0, 2, 4] == 1.0  # R / max_repeats and the delimiter
    assert torch.equal(y[:, 3:9, :4], x[:, :2, :4].repeat(1, 3, 1))
    assert (y[:, 3:9, 4] == 0).all() and (y[:, 9, 4] == 1).all() and (y[:, 9, :4] == 0).all()


@pytest.mark.parametrize("make", [copy, repeat_copy])
def test_batches_are_reproducible_from_the_seed_and_resume_exactly(make):
    task = make()
    task.length = 4
    a, b, other = task.batches(8, seed=3), task.batches(8, seed=3), task.batches(8, seed=4)
    for _ in range(3):
        xa, _ = next(a)
        assert torch.equal(xa, next(b)[0])
    assert not torch.equal(next(a)[0], next(other)[0])
    saved = a.state_dict()
    expected = [next(a) for _ in range(3)]
    resumed = make().batches(8, seed=99)
    resumed.task.length = 4
    resumed.load_state_dict(saved)
    for x, y in expected:
        rx, ry = next(resumed)
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_curriculum_raises_n_only_when_the_loss_is_below_the_threshold():
    task = copy(bits=8, min_length=3, max_length=5, eval_size=16)
    stuck = task.evaluate(Silent(8))
    assert stuck["loss"] == pytest.approx(8.0) and stuck["level"] == 0 and task.length == 3
    levels = [task.evaluate(Recaller())["level"] for _ in range(4)]
    assert levels == [3, 4, 5, 5] and task.length == 5  # stops raising at max_length
    assert task.state_dict() == {"length": 5, "solved": 5}
    fresh = copy(bits=8)
    fresh.load_state_dict(task.state_dict())
    assert (fresh.length, fresh.solved) == (5, 5)


def test_the_runner_sees_the_task_sizes():
    for task, inputs, outputs in ((copy(), 9, 8), (repeat_copy(), 10, 9)):
        model = LSTMNet(task.input_shape, task.num_classes, hidden_size=4)
        x, _ = next(task.batches(2, seed=0))
        logits, _ = model(x)
        assert x.shape[-1] == inputs and logits.shape[-1] == outputs


def test_step_losses_sum_bits_and_skip_ignored_steps():
    logits = torch.zeros(2, 3, 4)
    bits = torch.tensor([[[1.0, 0, 1, 0], [-1, -1, -1, -1], [0, 0, 0, 0]]] * 2)
    assert torch.allclose(step_losses(logits, bits) / math.log(2), torch.tensor([4.0, 0.0, 4.0]))
    classes = torch.tensor([[1, -1, 2], [0, -1, 3]])
    assert torch.allclose(step_losses(logits, classes) / math.log(2), torch.tensor([2.0, 0.0, 2.0]))


@pytest.fixture(scope="module")
def shakespeare():
    root = data_root()
    if not (root / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"Tiny Shakespeare is not under {root}; set DNI_DATA_ROOT")
    return text(root, length=20, eval_size=1000)


def test_tiny_shakespeare_is_read_whole_and_split(shakespeare):
    assert len(shakespeare.train) + len(shakespeare.test) == 1_115_394
    assert len(shakespeare.test) == 111_539 and shakespeare.num_classes == len(shakespeare.vocabulary) == 65
    decoded = "".join(shakespeare.vocabulary[i] for i in shakespeare.train[:14].tolist())
    assert decoded == "First Citizen:"


def test_text_streams_continue_from_batch_to_batch_and_resume(shakespeare):
    stream = shakespeare.batches(4, seed=0)
    x1, y1 = next(stream)
    x2, _ = next(stream)
    assert x1.shape == (4, 20) and torch.equal(x1[:, 1:], y1[:, :-1]) and torch.equal(x2[:, 0], y1[:, -1])
    saved = stream.state_dict()
    expected = next(stream)
    again = shakespeare.batches(4, seed=0)
    again.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(next(again), expected))


def test_random_windows_are_reproducible(shakespeare):
    shakespeare.contiguous = False
    try:
        a, b = shakespeare.batches(4, seed=1), shakespeare.batches(4, seed=1)
        xa, ya = next(a)
        assert torch.equal(xa, next(b)[0]) and torch.equal(xa[:, 1:], ya[:, :-1])
    finally:
        shakespeare.contiguous = True


def test_a_uniform_guess_scores_log2_of_the_vocabulary(shakespeare):
    result = shakespeare.evaluate(Silent(65))
    assert result["bpc"] == pytest.approx(math.log2(65)) and result["loss"] == pytest.approx(math.log(65))


def test_penn_treebank_character_files_are_read(tmp_path):
    folder = tmp_path / "ptb"
    folder.mkdir()
    (folder / "ptb.char.train.txt").write_text("a b _ c\nb a\n")
    (folder / "ptb.char.valid.txt").write_text("c c\n")
    (folder / "ptb.char.test.txt").write_text("a _ d\n")
    task = text(tmp_path, file="ptb", length=2, split="test")
    assert task.name == "ptb_char" and task.vocabulary == ["\n", "_", "a", "b", "c", "d"]
    assert task.train.tolist() == [2, 3, 1, 4, 0, 3, 2, 0] and task.test.tolist() == [2, 1, 5, 0]


def test_missing_text_is_one_sentence_naming_the_fix(tmp_path):
    with pytest.raises(DataNotFoundError, match="DNI_DATA_ROOT or dataset.root"):
        text(tmp_path)
    (tmp_path / "ptb").mkdir()
    with pytest.raises(DataNotFoundError, match="ptb.char.train.txt"):
        text(tmp_path, file="ptb")
