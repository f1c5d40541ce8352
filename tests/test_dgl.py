"""Decoupled greedy learning: every block learns from its own auxiliary classifier, and no
gradient crosses a block boundary."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from dni import FCN, Backprop, CharTransformer, DecoupledGreedy, ResNet, synthetic
from dni.errors import ConfigError
from dni.methods.dgl import auxiliary_head
from tests.helpers import assert_below, batches

adam = functools.partial(torch.optim.Adam, lr=1e-3)


class Spy(nn.Module):
    """Identity that records whether its input can carry a gradient back, and any gradient that
    reaches it."""

    def __init__(self):
        super().__init__()
        self.inputs_needing_grad, self.gradients = [], []

    def forward(self, x):
        self.inputs_needing_grad.append(x.requires_grad)
        if x.requires_grad:
            x.register_hook(self.gradients.append)
        return x


def spied(model):
    spies = []
    for k in range(1, len(model.blocks)):
        spies.append(Spy())
        model.blocks[k] = nn.Sequential(spies[-1], model.blocks[k])
    return spies


@pytest.mark.parametrize(
    "build, batch",
    [
        (lambda: FCN((24,), 10, depth=3, width=16), lambda: (torch.randn(8, 24), torch.randint(10, (8,)))),
        (
            lambda: ResNet((1, 12, 12), 10, widths=[4, 8], blocks_per_stage=1),
            lambda: (torch.randn(8, 1, 12, 12), torch.randint(10, (8,))),
        ),
        (
            lambda: CharTransformer((10,), 7, depth=2, width=16, heads=2),
            lambda: (torch.randint(7, (8, 10)), torch.randint(7, (8, 10))),
        ),
    ],
    ids=["fcn", "resnet", "transformer"],
)
def test_no_gradient_crosses_a_block_boundary(build, batch):
    model = build()
    spies = spied(model)
    method = DecoupledGreedy(model, adam)
    x, y = batch()
    for spy in spies:
        spy.inputs_needing_grad.clear()  # the constructor's forward to find the shapes
    method.step(x, y)
    for spy in spies:  # every block above the first gets a detached input: nothing flows back
        assert spy.inputs_needing_grad == [False] and spy.gradients == []
    # and each block's gradient is exactly that of its own auxiliary loss (the head's: the true loss)
    model.zero_grad(set_to_none=True)
    method.auxiliary.zero_grad(set_to_none=True)
    h = x
    for segment, auxiliary in zip(method.segments, method.auxiliary):
        a = segment(h)
        method.loss(auxiliary(a), y).backward()
        h = a.detach()
    method.loss(method.head(h), y).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert method.parameter_gradients(x, y).keys() == expected.keys()
    for name, g in method.parameter_gradients(x, y).items():
        assert torch.allclose(g, expected[name], atol=1e-6, rtol=1e-4), name


def test_a_blocks_update_does_not_depend_on_the_blocks_above():
    """Changing every block above the first leaves the first block's update unchanged."""
    updates = []
    for seed in (1, 2):
        torch.manual_seed(0)
        model = FCN((24,), 10, depth=3, width=16)
        torch.manual_seed(seed)
        for block in model.blocks[1:]:
            for p in block.parameters():
                p.data.normal_()
        torch.manual_seed(0)
        method = DecoupledGreedy(model, adam)
        before = [p.clone() for p in model.blocks[0].parameters()]
        method.step(torch.randn(8, 24, generator=torch.Generator().manual_seed(3)), torch.arange(8))
        updates.append([p - q for p, q in zip(model.blocks[0].parameters(), before)])
    for a, b in zip(*updates):
        assert torch.equal(a, b)


def test_diagnostics_compare_its_block_gradients_with_backprops():
    data = synthetic(num_train=256, num_test=64, shape=(24,), separation=1.0)
    method = DecoupledGreedy(FCN((24,), 10, depth=3, width=16), adam, interfaces=[1, 2])
    x, y = next(batches(data, 1))
    out = method.diagnostics(x, y)
    for block in ("block1", "block2"):
        assert -1.0 <= out[f"align/cosine/{block}"] < 0.999
    # the head (blocks 3 and 4, after the last cut) learns from the true loss: backprop's gradient
    assert out["align/cosine/block3"] == pytest.approx(1.0) and out["align/cosine/block4"] == pytest.approx(
        1.0
    )
    assert 0.0 <= out["dgl/error/block2"] <= 1.0 and "drift/block1" in out


def test_auxiliary_heads_fit_flat_map_and_sequence_activations():
    assert auxiliary_head((16,), (10,), hidden=[8])(torch.randn(2, 16)).shape == (2, 10)
    assert auxiliary_head((4, 7, 7), (10,))(torch.randn(2, 4, 7, 7)).shape == (2, 10)
    assert auxiliary_head((12, 16), (11, 12))(torch.randn(2, 12, 16)).shape == (2, 11, 12)
    with pytest.raises(ConfigError, match="no auxiliary classifier from activations of shape"):
        auxiliary_head((1, 2, 3, 4), (10,))


@pytest.mark.learning
def test_dgl_learns_mnist(mnist):
    """FCN 3x256 on MNIST, 600 steps of batch 128, linear auxiliary classifiers (measured 3.4%
    under the native kernels)."""
    torch.manual_seed(0)
    dgl = DecoupledGreedy(FCN((1, 28, 28), 10, depth=3, width=256), adam)
    for x, y in batches(mnist, 600, size=128):
        dgl.step(x, y)
    error = mnist.evaluate(dgl.model)["error"]
    assert_below("DGL MNIST FCN-3 test error, 600 steps", error, 0.045)


def test_dgl_runs_through_the_runner(tmp_path):
    from dni.cli.train import run
    from tests.helpers import compose_config

    cfg = compose_config(
        "method=dgl",
        "dataset=synthetic",
        "model.width=32",
        "trainer.steps=20",
        "trainer.eval_every=10",
        "trainer.diagnostics_every=10",
        "trainer.progress=false",
        "device=cpu",
    )
    metrics = run(cfg, tmp_path)
    assert metrics["status"] == "completed" and metrics["test_error"] < 0.9


def test_dgl_and_backprop_agree_when_there_is_nothing_to_decouple():
    """With one block after the only cut and a linear auxiliary classifier, the first block
    trains on a loss of the same form as backprop's: one step moves the head identically."""
    model = FCN((24,), 10, depth=1, width=16)
    reference = Backprop(FCN((24,), 10, depth=1, width=16), adam)
    reference.model.load_state_dict(model.state_dict())
    method = DecoupledGreedy(model, adam)
    x, y = torch.randn(8, 24), torch.randint(10, (8,))
    method.step(x, y)
    reference.step(x, y)
    head, theirs = model.blocks[-1], reference.model.blocks[-1]
    assert torch.allclose(head.weight, theirs.weight, atol=1e-6)


def test_a_resumed_dgl_run_continues_exactly(tmp_path):
    """Auxiliary classifiers and their optimiser state are saved with the blocks: 5 steps, then
    5 more from the checkpoint, end where 10 uninterrupted steps end."""
    from dni.cli.train import run
    from tests.helpers import compose_config

    settings = [
        "method=dgl",
        "dataset=synthetic",
        "dataset.num_train=256",
        "model.width=16",
        "trainer.batch_size=32",
        "trainer.eval_every=5",
        "trainer.checkpoint_every=5",
        "trainer.progress=false",
        "device=cpu",
    ]
    whole = run(compose_config(*settings, "trainer.steps=10"), tmp_path / "whole")
    run(compose_config(*settings, "trainer.steps=5"), tmp_path / "halves")
    resumed = run(compose_config(*settings, "trainer.steps=10"), tmp_path / "halves")
    assert resumed["steps"] == whole["steps"] == 10
    assert resumed["test_loss"] == whole["test_loss"]
    assert resumed["final"]["dgl/loss/block2"] == whole["final"]["dgl/loss/block2"]
