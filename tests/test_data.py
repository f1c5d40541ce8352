"""Data sets: tensors loaded once, shuffled batches by index, and the offline error."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from dni.data import Batches, synthetic, vision
from dni.errors import ConfigError, DataNotFoundError


def test_mnist_is_normalised_tensors(mnist):
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.num_classes == 10 and mnist.y_train.dtype == torch.long
    assert abs(mnist.x_train.mean().item()) < 1e-3 and abs(mnist.x_train.std().item() - 1) < 1e-3


def test_missing_root_without_download_names_the_variable(tmp_path):
    with pytest.raises(DataNotFoundError, match="DNI_DATA_ROOT") as error:
        vision("mnist", tmp_path, download=False)
    assert str(tmp_path) in str(error.value) and "MNIST/raw" in str(error.value)


def test_missing_root_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError) as error:
        vision("mnist", tmp_path, download=True)
    message = str(error.value)
    assert "could not be downloaded" in message and "DNI_DATA_ROOT" in message and "\n" not in message


def test_unknown_data_set_lists_the_choices():
    with pytest.raises(ConfigError, match="mnist, fashion_mnist, cifar10, synthetic"):
        vision("imagenet")


def test_batches_cover_an_epoch_without_repeats_and_resume_exactly():
    data = synthetic(num_train=100, num_test=10, shape=(3,))
    stream = Batches(data.x_train, data.y_train, batch_size=32, seed=1)
    seen = torch.cat([next(stream)[0] for _ in range(3)])  # 96 of 100: the rest is dropped
    assert len({tuple(row.tolist()) for row in seen}) == 96
    saved = stream.state_dict()
    ahead = [next(stream)[1] for _ in range(5)]  # crosses into the next epoch
    again = Batches(data.x_train, data.y_train, batch_size=32, seed=999)
    again.load_state_dict(saved)
    assert all(torch.equal(a, next(again)[1]) for a in ahead)


@pytest.mark.parametrize("batch_size", [0, 101])
def test_batch_size_must_fit_the_training_set(batch_size):
    data = synthetic(num_train=100, num_test=10, shape=(3,))
    with pytest.raises(ConfigError, match=r"^batch_size=.* \[1, 100\]"):
        Batches(data.x_train, data.y_train, batch_size=batch_size, seed=0)
