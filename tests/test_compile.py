"""`trainer.compile=true`: every method compiles the same units (the blocks, plus its own
synthesizers or auxiliary heads), and a compiled run follows the eager one to float tolerance.

The equivalence tests are marked slow: torch.compile builds C++ kernels on CPU (tens of
seconds per method on two cores)."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from dni import (
    FCN,
    Backprop,
    DecoupledGreedy,
    DecoupledNeuralInterfaces,
    LinearSynthesizer,
    LSTMNet,
    MLPSynthesizer,
    OracleSynthesizer,
    synthetic,
)
from dni.cli.train import run
from dni.errors import ConfigError
from dni.methods import RecurrentDNI
from tests.helpers import batches, compose_config

adam = functools.partial(torch.optim.Adam, lr=1e-3)

# The portable kernel set (DNI_KERNELS=portable) switches ATen's vector kernels off, where
# compiling is refused (tested below): these run under the native and avx2 sets.
needs_vector_kernels = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT",
    reason="torch.compile's CPU kernels need ATen's vector kernels (ATEN_CPU_CAPABILITY is default)",
)
trained_linear = functools.partial(LinearSynthesizer, zero_init=False)  # nonzero from step 1

METHODS = {
    "bprop": lambda model: Backprop(model, adam),
    "dni": lambda model: DecoupledNeuralInterfaces(model, adam, trained_linear),
    "cdni": lambda model: DecoupledNeuralInterfaces(model, adam, trained_linear, conditioned=True),
}


def _model_and_data(seed: int = 0):
    data = synthetic(num_train=512, num_test=128, shape=(1, 6, 6), num_classes=4, seed=seed)
    torch.manual_seed(seed)
    # No biases: a Linear's bias right before BatchNorm has a true gradient of zero, and the
    # rounding noise autograd gives instead is turned by Adam into steps of size lr, one way
    # eager and maybe the other compiled; it cancels in training outputs but not at once in
    # BatchNorm's running mean, so it would blur the comparison without saying anything.
    return FCN(data.input_shape, data.num_classes, depth=3, width=32, bias=False), data


def test_every_method_compiles_its_blocks_and_its_own_modules():
    model, _ = _model_and_data()
    blocks = list(model.blocks)
    bprop = Backprop(model, adam)
    assert bprop.compiled_modules() == blocks
    dni = DecoupledNeuralInterfaces(model, adam, trained_linear)
    assert dni.compiled_modules() == [*blocks, *(i.synthesizer for i in dni.interfaces)]
    dgl = DecoupledGreedy(model, adam)
    assert dgl.compiled_modules() == [*blocks, *dgl.auxiliary]
    # The oracle's forward is a backward pass through the blocks above: left eager.
    oracle = DecoupledNeuralInterfaces(model, adam, OracleSynthesizer)
    assert oracle.compiled_modules() == blocks
    # Complete unlock's input synthesizers are compiled too.
    unlocked = DecoupledNeuralInterfaces(
        model, adam, trained_linear, forward_unlock=True, input_synthesizer=MLPSynthesizer
    )
    inputs = [i.input_synthesizer for i in unlocked.interfaces if i.input_synthesizer is not None]
    assert len(inputs) == 2 and set(map(id, inputs)) <= set(map(id, unlocked.compiled_modules()))


@needs_vector_kernels
def test_compiling_keeps_parameters_and_state_dict_keys():
    model, _ = _model_and_data()
    method = DecoupledNeuralInterfaces(model, adam, trained_linear)
    before = method.parts.state_dict()
    method.compile()  # in place; nothing is built until the first call
    after = method.parts.state_dict()
    assert list(after) == list(before)
    assert all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)


def test_compile_refuses_a_recurrent_core_in_one_sentence():
    method = RecurrentDNI(LSTMNet((4,), 3, hidden_size=8), adam, truncation=2)
    with pytest.raises(ConfigError, match=r"trains a recurrent core, so set compile=false"):
        method.compile()


def test_compile_without_a_cpp_compiler_says_so(monkeypatch):
    monkeypatch.setattr("dni.methods.base.shutil.which", lambda name: None)
    model, _ = _model_and_data()
    with pytest.raises(ConfigError, match=r"needs a C\+\+ compiler .* set compile=false"):
        Backprop(model, adam).compile()


def test_compile_without_vector_kernels_says_so(monkeypatch):
    monkeypatch.setattr("dni.methods.base.torch.backends.cpu.get_cpu_capability", lambda: "DEFAULT")
    model, _ = _model_and_data()
    with pytest.raises(
        ConfigError, match=r"\(ATEN_CPU_CAPABILITY=default\); unset that variable or set compile"
    ):
        Backprop(model, adam).compile()


@pytest.mark.slow
@needs_vector_kernels
@pytest.mark.parametrize("name", list(METHODS))
def test_a_compiled_method_follows_the_eager_one(name):
    """Losses, parameters and the evaluated logits of compiled and eager steps agree to float
    tolerance over a few steps (not bit for bit: the compiler fuses and reorders)."""
    model, data = _model_and_data()
    eager, compiled = (_seeded(METHODS[name], copy.deepcopy(model)) for _ in range(2))
    compiled.compile()
    for x, y in batches(data, 5, size=64):
        a, b = eager.step(x, y), compiled.step(x, y)
        for key in ("loss", "accuracy"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(eager.parts.named_parameters(), compiled.parts.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=functools.partial("{}: {}".format, n))
    eager.model.eval(), compiled.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            compiled.model(data.x_test), eager.model(data.x_test), rtol=1e-4, atol=1e-4
        )


def _seeded(build, model):
    torch.manual_seed(1)  # the synthesizers' initial weights, alike for both
    return build(model)


@pytest.mark.slow
@needs_vector_kernels
def test_a_run_with_trainer_compile_ends_where_the_eager_run_does(tmp_path):
    """Through the runner: evaluation, diagnostics (functional calls of compiled blocks) and
    checkpoints of a compiled cDNI run, against the same run eager."""
    results = {}
    for compiled in (False, True):
        out = tmp_path / f"compile={compiled}"
        cfg = compose_config(
            "debug=fast",
            "method=cdni",
            "trainer.progress=false",
            "device=cpu",
            "model.bias=false",
            f"trainer.compile={compiled}",
        )
        captured = torch._dynamo.utils.counters["stats"]["calls_captured"]
        run(cfg, out)
        results[compiled] = json.loads((out / "metrics.json").read_text())
        assert (torch._dynamo.utils.counters["stats"]["calls_captured"] > captured) == compiled
    assert results[True]["status"] == results[False]["status"] == "completed"
    # Over 20 Adam steps rounding-level differences grow (Adam rescales small gradients), so the
    # bound is looser than the few-step comparison above; a wrong compiled update is far off it.
    assert results[True]["test_loss"] == pytest.approx(results[False]["test_loss"], rel=2e-3)
    # An example near the decision boundary may flip: a few of the 512 test examples at most.
    assert results[True]["test_error"] == pytest.approx(results[False]["test_error"], abs=0.01)
