"""Bring your own network: any model cut into blocks computes what it computed, and the
learning rules treat its blocks as they treat the paper's (oracle DNI equals backprop)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import dni
from dni import (
    DNI,
    Backprop,
    BlockNet,
    CharTransformer,
    ConvSynthesizer,
    DecoupledNeuralInterfaces,
    LinearSynthesizer,
    MLPSynthesizer,
    OracleSynthesizer,
    PositionwiseSynthesizer,
    ResNet,
    split,
)
from dni.errors import ConfigError
from dni.synthesizers import auto

sgd = functools.partial(torch.optim.SGD, lr=0.1)


# -- a GPT written as people write them (nanoGPT's layout), not as a BlockNet ----------------
class CausalSelfAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocabulary=11, length=12, width=16, heads=2, depth=3):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocabulary, width),
                wpe=nn.Embedding(length, width),
                drop=nn.Dropout(0.0),
                h=nn.ModuleList(Block(width, heads) for _ in range(depth)),
                ln_f=nn.LayerNorm(width),
            )
        )
        self.lm_head = nn.Linear(width, vocabulary)

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocabulary)


def resnet18():
    return split(
        torchvision.models.resnet18(weights=None, num_classes=10), ["layer1", "layer2", "layer3"], (3, 32, 32)
    )


def gpt():
    return split(GPT(), ["transformer.h.0", "transformer.h.1"], (12,), input_dtype="long", classes_last=True)


def images(n=4):
    return torch.randn(n, 3, 32, 32), torch.randint(10, (n,))


def tokens(n=4):
    return torch.randint(11, (n, 12)), torch.randint(11, (n, 12))


# -- splitting ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_split_resnet18_computes_the_models_output_exactly(mode):
    original = torchvision.models.resnet18(weights=None, num_classes=10)
    model = split(original, ["layer1", "layer2", "layer3"], (3, 32, 32))
    assert len(model.blocks) == 4
    assert model.activation_shapes() == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (10,)]
    x, _ = images()
    getattr(original, mode)(), getattr(model, mode)()
    assert torch.equal(model(x), original(x))
    # the blocks are the model's own modules: training one trains the other
    assert {id(p) for p in model.parameters()} == {id(p) for p in original.parameters()}


def test_split_transformer_computes_the_models_output_exactly():
    original = GPT()
    model = split(
        original, ["transformer.h.0", "transformer.h.1"], (12,), input_dtype="long", classes_last=True
    )
    assert model.activation_shapes() == [(12, 16), (12, 16), (11, 12)]
    x, _ = tokens()
    assert torch.equal(model(x), original(x).transpose(1, 2))


def test_split_builds_from_a_constructor_with_the_number_of_classes():
    model = split(torchvision.models.resnet18, ["layer2"], (3, 32, 32), num_classes=7)
    assert model.activation_shapes()[-1] == (7,)
    assert model.name == "resnet"


def test_from_sequential_cuts_between_children():
    sequential = nn.Sequential(
        nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    )
    every = BlockNet.from_sequential(sequential, (2, 4))
    assert len(every.blocks) == 6
    grouped = BlockNet.from_sequential(sequential, (2, 4), at=["2", "4"])
    assert grouped.activation_shapes() == [(6,), (5,), (3,)]
    x = torch.randn(3, 2, 4)
    assert torch.equal(grouped(x), sequential(x)) and torch.equal(every(x), sequential(x))
    assert torch.equal(split(sequential, ["2"], (2, 4))(x), sequential(x))  # split takes the same path


@pytest.mark.parametrize(
    "cuts, says",
    [
        (["layerx"], "no submodule of that name; its children are conv1"),
        (["layer1.0.conv1"], "flows across the cut"),  # the residual's shortcut skips it
        (["fc"], "the last block must be the classifier"),
        (["layer2", "layer2"], "twice"),
        (["layer1", "layer1.0"], "one inside the other"),
    ],
)
def test_split_refuses_a_cut_that_cannot_work_in_one_sentence(cuts, says):
    with pytest.raises(ConfigError, match=says):
        split(torchvision.models.resnet18(weights=None), cuts, (3, 32, 32))


def test_split_names_an_input_the_model_cannot_take():
    with pytest.raises(ConfigError, match=r"cannot take inputs of shape \(1, 28, 28\).*3 channels"):
        split(torchvision.models.resnet18(weights=None), ["layer1"], (1, 28, 28))


def test_from_sequential_refuses_other_modules():
    with pytest.raises(ConfigError, match="takes an nn.Sequential"):
        BlockNet.from_sequential(torchvision.models.resnet18(weights=None), (3, 32, 32))


# -- oracle DNI on them equals backprop ----------------------------------------------------
@pytest.mark.parametrize(
    "build, batch",
    [
        (resnet18, images),
        (gpt, tokens),
        (
            lambda: ResNet((1, 12, 12), 10, widths=[4, 8], blocks_per_stage=1),
            lambda: (torch.randn(4, 1, 12, 12), torch.randint(10, (4,))),
        ),
        (lambda: CharTransformer((12,), 11, depth=2, width=16, heads=2), tokens),
    ],
    ids=["torchvision-resnet18", "gpt", "resnet", "char-transformer"],
)
def test_oracle_dni_gives_backprops_gradients(build, batch):
    model = build()
    reference = Backprop(copy.deepcopy(model), sgd)
    method = DecoupledNeuralInterfaces(model, sgd, OracleSynthesizer)
    x, y = batch()
    method.step(x, y)
    reference.step(x, y)
    for (name, p), q in zip(method.model.named_parameters(), reference.model.parameters()):
        scale = q.grad.abs().max().clamp_min(1e-12)
        assert torch.allclose(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4), name
        assert torch.allclose(p, q, atol=1e-6), name


# -- synthesizers by shape -----------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, kind",
    [
        ((32,), LinearSynthesizer | MLPSynthesizer),
        ((12, 16), PositionwiseSynthesizer),
        ((4, 6, 6), ConvSynthesizer),
    ],
)
def test_auto_picks_the_synthesizer_for_the_activations_shape(shape, kind):
    synthesizer = auto(shape, context_dim=5)
    assert isinstance(synthesizer, kind)
    g = synthesizer(torch.randn(3, *shape), torch.eye(5)[:3])
    assert g.shape == (3, *shape) and not g.any()  # zero-initialised output layer


def test_auto_hidden_layers_and_width():
    flat = auto((32,), hidden_layers=2, width=64)
    assert [m.out_features for m in flat.net if isinstance(m, nn.Linear)] == [64, 64, 32]
    maps = auto((4, 6, 6), hidden_layers=1)
    assert [m.out_channels for m in maps.net if isinstance(m, nn.Conv2d)] == [4, 4]


def test_positionwise_context_is_per_position():
    synthesizer = PositionwiseSynthesizer((5, 8), context_dim=3, zero_init=False)
    h = torch.randn(2, 5, 8)
    context = torch.eye(3)[torch.randint(3, (2, 5))].movedim(-1, 1)  # (B, classes, T)
    g = synthesizer(h, context)
    # each position sees only its own activation and context
    h2, c2 = h.clone(), context.clone()
    h2[:, 3], c2[:, :, 3] = 0.0, 0.0
    moved = synthesizer(h2, c2)
    assert torch.equal(moved[:, [0, 1, 2, 4]], g[:, [0, 1, 2, 4]]) and not torch.equal(moved[:, 3], g[:, 3])


@pytest.mark.parametrize(
    "call, says",
    [
        (
            lambda: ConvSynthesizer((4, 6, 6))(torch.randn(2, 4, 8, 8)),
            r"built for activations of shape \(4, 6, 6\) but got \(4, 8, 8\)",
        ),
        (
            lambda: LinearSynthesizer((32,), context_dim=10)(torch.randn(2, 32)),
            "called without one; pass the labels as context",
        ),
        (
            lambda: LinearSynthesizer((32,))(torch.randn(2, 32), torch.randn(2, 10)),
            "build it with context_dim=10",
        ),
        (
            lambda: PositionwiseSynthesizer((5, 8), context_dim=3)(
                torch.randn(2, 5, 8), torch.randn(2, 3, 4)
            ),
            r"context of shape \(3,\) or \(3, 5\)",
        ),
        (lambda: auto((1, 2, 3, 4)), "no kind for activations of shape"),
    ],
    ids=["conv-wrong-size", "cdni-without-labels", "dni-given-context", "wrong-positions", "auto-unknown"],
)
def test_synthesizers_refuse_what_they_were_not_built_for_in_one_sentence(call, says):
    with pytest.raises(ConfigError, match=says):
        call()


def test_a_synthesizer_names_its_interface_when_told():
    synthesizer = LinearSynthesizer((32,), context_dim=10)
    synthesizer.where = "block2"
    with pytest.raises(ConfigError, match="the synthesizer of block2 was built for a context"):
        synthesizer(torch.randn(2, 32))


@pytest.mark.parametrize("conditioned", [False, True])
def test_dni_with_auto_synthesizers_trains_a_transformer_and_a_resnet(conditioned):
    for model, (x, y) in [
        (CharTransformer((12,), 11, depth=2, width=16, heads=2), tokens()),
        (
            ResNet((1, 12, 12), 10, widths=[4, 8], blocks_per_stage=1),
            (torch.randn(4, 1, 12, 12), torch.randint(10, (4,))),
        ),
    ]:
        method = DecoupledNeuralInterfaces(model, sgd, auto, conditioned=conditioned)
        for _ in range(3):
            out = method.step(x, y)
        assert torch.isfinite(out["loss"])
        assert all(s["loss"].isfinite() for s in (i.stats for i in method.interfaces))


def test_an_interface_names_itself_when_its_cdni_synthesizer_gets_no_labels():
    block = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
    interface = DNI(block, LinearSynthesizer((32,), context_dim=10), sgd, sgd, name="block2")
    with pytest.raises(ConfigError, match="the synthesizer of block2 was built for a context of 10 features"):
        interface(torch.randn(4, 8))  # cDNI's labels forgotten


@pytest.mark.parametrize(
    "build, at",
    [
        (
            lambda: torchvision.models.VisionTransformer(
                image_size=32,
                patch_size=8,
                num_layers=4,
                num_heads=2,
                hidden_dim=16,
                mlp_dim=32,
                num_classes=10,
            ),
            ["encoder.layers.encoder_layer_1", "encoder.layers.encoder_layer_2"],
        ),
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), ["features.3", "features.8"]),
        (lambda: torchvision.models.efficientnet_b0(num_classes=10), ["features.2", "features.5"]),
    ],
    ids=["vit", "mobilenet_v3_small", "efficientnet_b0"],
)
def test_split_other_torchvision_models_compute_their_output_exactly(build, at):
    original = build().eval()  # stochastic depth and dropout off, so the two passes can agree
    model = split(original, at, (3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert len(model.blocks) == len(at) + 1 and torch.equal(model(x), original(x))


@pytest.mark.parametrize("method", [dni.DecoupledNeuralInterfaces, dni.Backprop, dni.DecoupledGreedy])
def test_a_model_that_is_not_a_blocknet_is_refused_naming_the_wrapper(method):
    sequential = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    extra = {"synthesizer": dni.LinearSynthesizer} if method is dni.DecoupledNeuralInterfaces else {}
    with pytest.raises(
        dni.ConfigError,
        match=r"trains a BlockNet, not a Sequential; wrap your model with "
        r"dni.BlockNet.from_sequential",
    ):
        method(sequential, torch.optim.Adam, **extra)
