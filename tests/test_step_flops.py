"""The benchmark's FLOP limit is the matmul count of the update-decoupled step (docs/design.md),
from the model's shapes."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from benchmarks.timing import flop_limits
from dni import FCN, Backprop, DecoupledNeuralInterfaces, LinearSynthesizer

adam = functools.partial(torch.optim.Adam, lr=1e-3)


@pytest.mark.parametrize("depth", [3, 6])
@pytest.mark.parametrize("conditioned", [False, True], ids=["dni", "cdni"])
def test_flop_limit_counts_forward_backward_and_the_synthesizers(depth, conditioned):
    batch, width, classes = 32, 64, 10
    model = FCN((100,), classes, depth=depth, width=width)
    methods = {
        "bprop": Backprop(copy.deepcopy(model), adam),
        "dni": DecoupledNeuralInterfaces(
            copy.deepcopy(model), adam, LinearSynthesizer, conditioned=conditioned
        ),
        "dni per-interface": DecoupledNeuralInterfaces(
            copy.deepcopy(model), adam, LinearSynthesizer, conditioned=conditioned, batched=False
        ),
    }
    layers = [(100, width)] + [(width, width)] * (depth - 1) + [(width, classes)]
    # forward 2BIO and backward 4BIO per layer, less the first layer's input gradient
    bprop = sum(6 * batch * i * o for i, o in layers) - 2 * batch * 100 * width
    # per interface: the synthesizer's forward and its weight gradient (its input is detached)
    synthesizer = 4 * batch * (width + (classes if conditioned else 0)) * width
    x, y = torch.randn(batch, 100), torch.randint(classes, (batch,))
    limits = flop_limits(methods, (x, y), "bprop")
    expected = (bprop + depth * synthesizer) / bprop
    assert limits == pytest.approx({"bprop": 1.0, "dni": expected, "dni per-interface": expected}, rel=1e-12)
