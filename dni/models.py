"""Networks as an ordered list of blocks: the unit that learning rules decouple.

The last block is the classifier and outputs logits; every block before it is a hidden
block `f_k` whose output `h_k` can be given a synthetic-gradient interface. Logits are
`(B, classes)`, or `(B, classes, T)` for a prediction at every position of a sequence
(the layout `F.cross_entropy` takes with targets `(B, T)`).

Besides the paper's networks (FCN, CNN) this holds two of today's: a CIFAR-style ResNet
cut between its stages and a GPT-style character Transformer cut between its layers. Any
other model becomes a `BlockNet` through `BlockNet.from_sequential` or `dni.splitting.split`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dni.errors import ConfigError


class BlockNet(nn.Module):
    """A feed-forward network `f_K ∘ ... ∘ f_1` kept as its blocks."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        input_shape: Sequence[int],
        name: str,
        input_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if len(blocks) < 1:
            raise ConfigError(f"a BlockNet needs at least one block, but {name} has none")
        self.blocks = nn.ModuleList(blocks)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.name = name
        # token ids (torch.long) for a language model; what `activation_shapes` feeds in
        self.input_dtype = input_dtype

    @classmethod
    def from_sequential(
        cls,
        sequential: nn.Sequential,
        input_shape: Sequence[int],
        at: Sequence[str] | None = None,
        name: str = "sequential",
        input_dtype: torch.dtype = torch.float32,
    ) -> BlockNet:
        """The children of `sequential` as blocks, sharing their modules (training the blocks
        trains `sequential`): one block per child, or, with `at`, cuts after the children of
        those names (`"2"` for an unnamed `nn.Sequential`), consecutive children grouped."""
        if not isinstance(sequential, nn.Sequential):
            raise ConfigError(
                f"BlockNet.from_sequential takes an nn.Sequential, not {type(sequential).__name__}; "
                "cut other modules with dni.splitting.split(module, at=[...], input_shape=...)"
            )
        children = list(sequential.named_children())
        if at is None:
            return cls([m for _, m in children], input_shape, name, input_dtype)
        names = [n for n, _ in children]
        cuts = _cut_positions([str(a) for a in at], names, type(sequential).__name__)
        groups = [children[i:j] for i, j in zip([0, *cuts], [*cuts, len(children)])]
        blocks = [g[0][1] if len(g) == 1 else nn.Sequential(OrderedDict(g)) for g in groups]
        return cls(blocks, input_shape, name, input_dtype)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    @torch.no_grad()
    def activation_shapes(self) -> list[tuple[int, ...]]:
        """Shape (without batch) of every block's output, found by a forward pass in eval mode."""
        was_training = self.training
        self.eval()
        x = torch.zeros(1, *self.input_shape, dtype=self.input_dtype, device=next(self.parameters()).device)
        shapes = []
        for block in self.blocks:
            x = block(x)
            shapes.append(tuple(x.shape[1:]))
        self.train(was_training)
        return shapes


def _cut_positions(at: list[str], names: list[str], owner: str) -> list[int]:
    """Indices into `names` just after each cut in `at`, in order; one sentence if a cut is
    unknown, repeated, or leaves nothing after it (the last block must be the classifier)."""
    unknown = [a for a in at if a not in names]
    if unknown:
        raise ConfigError(
            f"cannot cut {owner} at {unknown[0]!r}: it has no child of that name; choose among "
            f"{', '.join(names)}"
        )
    if len(set(at)) != len(at):
        raise ConfigError(f"the cuts {at} of {owner} name a child twice; give each cut once")
    cuts = sorted(names.index(a) + 1 for a in at)
    if cuts[-1] == len(names):
        raise ConfigError(
            f"cannot cut {owner} after its last child {names[-1]!r}: the last block must end in the "
            "classifier; cut before it"
        )
    return cuts


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is not allowed; it must be an integer >= 1")
    return value


class FCN(BlockNet):
    """The paper's fully connected network: hidden blocks Linear -> BatchNorm -> ReLU, then a
    linear classifier.

    `widths` overrides `depth` x `width` with explicit hidden sizes (e.g. [1024, 40]);
    `batch_norm=False` and `activation="none"` give the plain linear networks that the
    backward-network experiments use.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 3,
        width: int = 256,
        widths: Sequence[int] | None = None,
        bias: bool = True,
        batch_norm: bool = True,
        activation: str = "relu",
    ):
        if activation not in ("relu", "none"):
            raise ConfigError(f"activation={activation!r} is not allowed; choose relu or none")
        if widths is None:
            widths = [_positive("width", width)] * _positive("depth", depth)
        else:
            widths = [_positive("widths", int(w)) for w in widths]
            if not widths:
                raise ConfigError("model.widths is empty; give at least one hidden width")
        sizes = [int(torch.Size(input_shape).numel()), *widths]
        blocks: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers: list[nn.Module] = [nn.Flatten()] if i == 0 else []
            layers.append(nn.Linear(fan_in, fan_out, bias=bias))
            if batch_norm:
                layers.append(nn.BatchNorm1d(fan_out))
            if activation == "relu":
                layers.append(nn.ReLU())
            blocks.append(nn.Sequential(*layers))
        blocks.append(nn.Linear(sizes[-1], num_classes, bias=bias))
        super().__init__(blocks, input_shape, name="fcn")


class CNN(BlockNet):
    """The paper's convolutional network: blocks of a 5x5 convolution with `channels` filters
    and same padding, BatchNorm, ReLU and 3x3 max pooling of stride 2; then a linear
    classifier on the flattened feature map."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 3,
        channels: int = 128,
        kernel_size: int = 5,
        pool: bool = True,
    ):
        if len(input_shape) != 3:
            raise ConfigError(
                f"model=cnn needs image inputs of shape (channels, height, width), but the data "
                f"set gives {tuple(input_shape)}; use model=fcn for this data set"
            )
        _positive("depth", depth)
        _positive("channels", channels)
        in_channels, height, width = input_shape
        blocks: list[nn.Module] = []
        for _ in range(depth):
            layers = [
                nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
            if pool:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                height, width = (height + 1) // 2, (width + 1) // 2
            blocks.append(nn.Sequential(*layers))
            in_channels = channels
        blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, num_classes)))
        super().__init__(blocks, input_shape, name="cnn")


class _BasicBlock(nn.Module):
    """He et al.'s residual block: two 3x3 convolutions with BatchNorm; a 1x1 projection on
    the shortcut when the width or resolution changes."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(BlockNet):
    """The CIFAR-style ResNet of He et al. (2016), cut between its stages.

    A 3x3 stem convolution, then one stage of `blocks_per_stage` residual blocks per entry of
    `widths` (each stage after the first halves the resolution), global average pooling and
    a linear classifier. Blocks `f_k` are the stages (the stem rides with the first) and the
    classifier: `widths=[16, 32, 64]`, `blocks_per_stage=3` is ResNet-20 with three decoupled
    stages; `widths=[8, 16, 32]`, `blocks_per_stage=1` a ResNet-8 that trains on a CPU.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 3,
    ):
        if len(input_shape) != 3:
            raise ConfigError(
                f"model=resnet needs image inputs of shape (channels, height, width), but the data set "
                f"gives {tuple(input_shape)}; use model=fcn or model=transformer for this data set"
            )
        widths = [_positive("widths", int(w)) for w in widths]
        if not widths:
            raise ConfigError("model.widths is empty; give one width per stage, e.g. [16,32,64]")
        _positive("blocks_per_stage", blocks_per_stage)
        in_channels = input_shape[0]
        blocks: list[nn.Module] = []
        for i, width in enumerate(widths):
            layers: list[nn.Module] = []
            if i == 0:
                layers += [
                    nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                ]
                in_channels = width
            for j in range(blocks_per_stage):
                layers.append(_BasicBlock(in_channels, width, stride=2 if i > 0 and j == 0 else 1))
                in_channels = width
            blocks.append(nn.Sequential(*layers))
        blocks.append(
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))
        )
        super().__init__(blocks, input_shape, name="resnet")


class _CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class TransformerLayer(nn.Module):
    """A GPT-2 layer (pre-LayerNorm): causal self-attention and a 4x MLP, each residual."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attention = _CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _Embedding(nn.Module):
    """Token and learned position embeddings of ids `(B, T)`, giving `(B, T, width)`."""

    def __init__(self, vocabulary: int, length: int, width: int, dropout: float):
        super().__init__()
        self.token = nn.Embedding(vocabulary, width)
        self.position = nn.Embedding(length, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.dropout(self.token(ids) + self.position(positions))


class _Readout(nn.Module):
    """Final LayerNorm and linear readout, logits laid out `(B, classes, T)`."""

    def __init__(self, width: int, vocabulary: int):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.linear = nn.Linear(width, vocabulary)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.ln(x)).transpose(1, 2)


class CharTransformer(BlockNet):
    """A small GPT-style character model, cut between its layers.

    Input: token ids `(B, T)` with `T = input_shape[0]` the context length; output: logits
    `(B, vocabulary, T)` for the next character at every position. Blocks `f_k` are the
    `depth` Transformer layers (the embedding rides with the first) and the readout, so every
    activation `h_k` is a token sequence `(T, width)` (a position-wise synthesizer's input;
    cDNI's context is the one-hot next character at each position).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 4,
        width: int = 128,
        heads: int = 4,
        dropout: float = 0.0,
    ):
        if len(input_shape) != 1:
            raise ConfigError(
                f"model=transformer reads token ids of shape (length,), but the data set gives "
                f"{tuple(input_shape)}; use it with dataset=char_windows"
            )
        _positive("depth", depth)
        _positive("heads", heads)
        if _positive("width", width) % heads:
            raise ConfigError(f"width={width} is not a multiple of heads={heads}; make it one")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout={dropout!r} is not allowed; it must lie in [0, 1)")
        length = input_shape[0]
        layers = [TransformerLayer(width, heads, dropout) for _ in range(depth)]
        blocks: list[nn.Module] = [nn.Sequential(_Embedding(num_classes, length, width, dropout), layers[0])]
        blocks += layers[1:]
        blocks.append(_Readout(width, num_classes))
        super().__init__(blocks, input_shape, name="transformer", input_dtype=torch.long)
        self.apply(_gpt_init)


def _gpt_init(module: nn.Module) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
