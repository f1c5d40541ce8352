"""The explicit backward network, feedback alignment and DFA: exactness against autograd,
against independent autograd references for the random feedback, and learning real MNIST."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dni.cli.train import run
from dni.methods import Backprop, BackwardNetwork, DirectFeedbackAlignment, FeedbackAlignment
from dni.models import FCN
from tests.helpers import assert_above, assert_below, compose_config, read_scalars

FEEDBACK = {"backward_net": BackwardNetwork, "fa": FeedbackAlignment, "dfa": DirectFeedbackAlignment}
# (batch_norm, activation): the plain linear network, ReLU, and the paper's Linear-BN-ReLU.
LAYERS = {"linear": (False, "none"), "relu": (False, "relu"), "bn_relu": (True, "relu"), "bn": (True, "none")}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these nets are small, and the machine is shared (oversubscribed
    OpenMP threads slow a run by tens of times); the runner's `threads=1` is undone after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def small_net(layers: str = "bn_relu", bias: bool = True, dtype=torch.float64) -> FCN:
    batch_norm, activation = LAYERS[layers]
    net = FCN((20,), 5, widths=[16, 12, 8], bias=bias, batch_norm=batch_norm, activation=activation)
    return net.to(dtype)


def batches(steps: int, dtype=torch.float64, batch: int = 32):
    """Gaussian inputs labelled by a fixed random linear teacher: learnable in a few steps."""
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(20, 5, generator=generator, dtype=dtype)
    for _ in range(steps):
        x = torch.randn(batch, 20, generator=generator, dtype=dtype)
        yield x, (x @ teacher).argmax(1)


# -- backward_net is backprop -----------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("layers", LAYERS)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_backward_net_gradients_equal_autograd(loss, layers, bias):
    """Over five SGD steps, the gradient each step applies (and `parameter_gradients`) equals
    autograd's on a twin trained by backprop; parameters and BatchNorm statistics stay equal,
    so the backward weights follow the forward ones as they change (float64)."""
    net = small_net(layers, bias)
    twin = copy.deepcopy(net)
    method, reference = BackwardNetwork(net, sgd, loss=loss), Backprop(twin, sgd, loss=loss)
    for x, y in batches(5):
        measured = method.parameter_gradients(x, y)
        method.step(x, y), reference.step(x, y)
        for (name, p), q in zip(net.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
            torch.testing.assert_close(measured[name], q.grad, rtol=1e-9, atol=1e-12, msg=name)
    for mine, theirs in zip(net.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.learning
def test_backward_net_follows_backprop_losses_with_adam():
    """In float32 with Adam (the experiments' optimiser), 40 steps of the backward network and
    of backprop from the same weights give the same losses to float tolerance."""
    net = small_net("bn_relu", dtype=torch.float32)
    method, reference = BackwardNetwork(net, adam), Backprop(copy.deepcopy(net), adam)
    ours, theirs = [], []
    for x, y in batches(40, torch.float32, batch=64):
        ours.append(method.step(x, y)["loss"].item())
        theirs.append(reference.step(x, y)["loss"].item())
    # it trained, so the comparison means something
    assert_below("backward network loss, last step / first", ours[-1] / ours[0], 0.8)
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("method", FEEDBACK)
def test_no_autograd_on_the_main_network(method, monkeypatch):
    """A step trains the network with every entry into autograd's backward disabled."""
    net = small_net()
    rule = FEEDBACK[method](net, sgd)
    before = copy.deepcopy(net.state_dict())

    def forbidden(*args, **kwargs):
        raise AssertionError("autograd was called")

    for target in ("torch.autograd.backward", "torch.autograd.grad", "torch.Tensor.backward"):
        monkeypatch.setattr(target, forbidden)
    x, y = next(batches(1))
    rule.step(x, y)
    weights = {n for n, p in net.named_parameters() if p.dim() == 2}
    assert len(weights) == 4 and all(not torch.equal(net.state_dict()[n], before[n]) for n in weights)


# -- fa and dfa against independent autograd references -----------------------------------------
class _FeedbackLinear(torch.autograd.Function):
    """A Linear layer whose backward sends the input gradient through `feedback`, not the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, feedback = ctx.saved_tensors
        return g @ feedback, g.T @ x, g.sum(0) if ctx.has_bias else None, None


def _fa_reference(net: FCN, rule: FeedbackAlignment, x, y) -> dict:
    """Autograd with every Linear above the first replaced by one that feeds back `B_k`."""
    h = x
    for k, block in enumerate(net.blocks):
        for layer in block if isinstance(block, nn.Sequential) else [block]:
            if isinstance(layer, nn.Linear):
                feedback = getattr(rule.feedback, f"block{k}") if k else layer.weight
                h = _FeedbackLinear.apply(h, layer.weight, layer.bias, feedback)
            else:
                h = layer(h)
    grads = torch.autograd.grad(rule.loss(h, y), list(net.parameters()))
    return dict(zip(dict(net.named_parameters()), grads))


def _dfa_reference(net: FCN, rule: DirectFeedbackAlignment, x, y) -> dict:
    """Autograd within each block, fed with `dL/dz @ D_k` at the block's output."""
    outputs, h = [], x
    for block in net.blocks[:-1]:
        h = block(h.detach())
        outputs.append(h)
    logits = net.blocks[-1](h.detach())
    loss = rule.loss(logits, y)
    error = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    names = {p: n for n, p in net.named_parameters()}
    last = list(net.blocks[-1].parameters())
    grads = {names[p]: g for p, g in zip(last, torch.autograd.grad(loss, last))}
    for k, (block, h) in enumerate(zip(net.blocks[:-1], outputs), start=1):
        params = list(block.parameters())
        signal = error @ getattr(rule.feedback, f"block{k}")
        grads.update({names[p]: g for p, g in zip(params, torch.autograd.grad(h, params, signal))})
    return grads


@pytest.mark.parametrize("layers", ["linear", "bn_relu"])
@pytest.mark.parametrize("method", ["fa", "dfa"])
def test_random_feedback_matches_an_autograd_reference(method, layers):
    """Over four steps, the gradient `fa`/`dfa` applies equals an independent autograd
    implementation with the same feedback matrices, which stay fixed."""
    net = small_net(layers, bias=layers != "linear")
    rule = FEEDBACK[method](net, sgd, scale=0.5, seed=3)
    reference = {"fa": _fa_reference, "dfa": _dfa_reference}[method]
    fixed = copy.deepcopy(rule.feedback.state_dict())
    for x, y in batches(4):
        expected = reference(copy.deepcopy(net), rule, x, y)
        rule.step(x, y)
        for name, p in net.named_parameters():
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)
    for key, matrix in rule.feedback.state_dict().items():
        assert torch.equal(matrix, fixed[key]), key
    # and the rule is not backprop in disguise: its hidden gradients differ from autograd's
    first = "blocks.0.1.weight"  # block 1 is Flatten -> Linear -> ...
    assert not torch.allclose(rule.parameter_gradients(x, y)[first], rule.true_gradients(x, y)[first])


@pytest.mark.parametrize("method", ["fa", "dfa"])
def test_feedback_matrices_are_seeded_scaled_and_checkpointed(method):
    cls = FEEDBACK[method]
    one, same = cls(small_net(), sgd, seed=1), cls(small_net(), sgd, seed=1)
    other, double = cls(small_net(), sgd, seed=2), cls(small_net(), sgd, seed=1, scale=2.0)
    for key, matrix in one.feedback.state_dict().items():
        assert torch.equal(matrix, same.feedback.state_dict()[key])
        assert not torch.equal(matrix, other.feedback.state_dict()[key])
        torch.testing.assert_close(2 * matrix, double.feedback.state_dict()[key])
    other.load_state_dict(one.state_dict())
    for key, matrix in one.feedback.state_dict().items():
        assert torch.equal(matrix, other.feedback.state_dict()[key])
    shapes = [tuple(m.shape) for m in one.feedback.state_dict().values()]
    assert shapes == ([(12, 16), (8, 12), (5, 8)] if method == "fa" else [(5, 16), (5, 12), (5, 8)])


def test_backward_net_alignment_diagnostics_are_exact():
    """`diagnostics` compares with autograd at the same parameters: for the backward network
    every block's cosine is 1 and relative error 0; for fa the hidden blocks are not."""
    x, y = next(batches(1))
    exact = BackwardNetwork(small_net(), sgd).diagnostics(x, y)
    for k in range(1, 5):
        assert exact[f"align/cosine/block{k}"] == pytest.approx(1.0, abs=1e-12)
        assert exact[f"align/rel_error/block{k}"] == pytest.approx(0.0, abs=1e-9)
    fa = FeedbackAlignment(small_net(), sgd).diagnostics(x, y)
    assert fa["align/cosine/block4"] == pytest.approx(1.0) and fa["align/cosine/block1"] < 0.9


def test_non_positive_feedback_scale_is_one_clear_error():
    from dni.errors import ConfigError

    with pytest.raises(ConfigError, match="scale=0.0 is not allowed"):
        FeedbackAlignment(small_net(), sgd, scale=0.0)


# -- learning real MNIST ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["fa", "dfa"])
def test_feedback_alignment_learns_mnist(method, mnist, tmp_path, monkeypatch):
    """The FCN experiment, shortened to 500 steps and without its twin: below 6% test error
    (the issue asks for 10%), and every block's weight gradient has a cosine above 0.1 to the
    true gradient once training has started. (After 300 steps fa and dfa were at 4.2-4.5%
    under every kernel set; 500 steps buy the bound a wider margin for about 4 s.)"""
    monkeypatch.setattr("dni.data.vision", lambda *a, **k: mnist)
    cfg = compose_config(
        "experiment=mnist_fcn_feedback",
        f"method={method}",
        "trainer.steps=500",
        "trainer.eval_every=500",
        "trainer.diagnostics_every=100",
        "control=false",
        "threads=1",
        "trainer.progress=false",
        "device=cpu",
    )
    result = run(cfg, tmp_path)
    assert result["status"] == "completed"
    assert_below(f"{method} MNIST test error, 500 steps", result["test_error"], 0.06)
    scalars = read_scalars(tmp_path)
    for k in range(1, 4):
        (step, cosine), *_ = scalars[f"align/cosine/block{k}"][-1:]
        assert step > 1
        assert_above(f"{method} gradient cosine, block {k}", cosine, 0.1)
    (_, head), *_ = scalars["align/cosine/block4"][-1:]
    assert head == pytest.approx(1.0)  # the head learns from the true error under either rule
