"""Any PyTorch model as a `BlockNet`: cut it after the submodules you name.

    model = split(torchvision.models.resnet18(num_classes=10), at=["layer1", "layer2", "layer3"],
                  input_shape=(3, 32, 32))

gives four blocks (stem and layer1; layer2; layer3; layer4, pooling and the classifier) whose
composition computes exactly what the model computes, with the model's own modules (training
the blocks trains the model). The learning rules then decouple the blocks as they do the
paper's networks.

How: torch.fx traces the model's forward, treating as opaque ("leaf") every submodule that
does not contain a cut, so only the spine from the root down to the cuts is traced; a
submodule that branches on its inputs or on `self.training` still runs as itself. The traced
graph is cut after each named submodule's call, and each piece becomes a `GraphModule`
sharing the model's parameters. A cut is only allowed where the named submodule's output is
the one value flowing on (a chain): a residual connection or a mask computed once and used by
every layer that crosses the cut is refused in one sentence naming it. An `nn.Sequential` is
cut along its children without tracing (`BlockNet.from_sequential`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, fx, nn

from dni.errors import ConfigError
from dni.models import BlockNet


class _ClassesFirst(nn.Module):
    """Logits `(B, T, classes)` of a language model as `(B, classes, T)`, the layout of the losses."""

    def forward(self, logits: Tensor) -> Tensor:
        return logits.transpose(1, 2)


class _SpineTracer(fx.Tracer):
    """Traces only the modules on the way to a cut; every other submodule stays one call."""

    def __init__(self, spine: set[str]):
        super().__init__()
        self.spine = spine

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name not in self.spine


def split(
    module: nn.Module | Callable[..., nn.Module],
    at: Sequence[str],
    input_shape: Sequence[int],
    num_classes: int | None = None,
    name: str | None = None,
    input_dtype: torch.dtype | str = torch.float32,
    classes_last: bool = False,
) -> BlockNet:
    """`module` as a `BlockNet` cut after each submodule named in `at` (dotted names, e.g.
    `"layer2"` or `"transformer.h.3"`).

    Args:
        module: the model, or a function that builds it (a torchvision constructor, a
            config's partial), called with `num_classes` when it takes that argument.
        at: the submodules after which to cut, one block boundary each.
        input_shape: the shape of one input without the batch dimension.
        num_classes: passed to a builder that takes it.
        name: for logs and metrics; the model's class name by default.
        input_dtype: the input's dtype (`torch.long` or "long" for token ids).
        classes_last: the model gives logits `(B, T, classes)` (a language model); the last
            block then moves the classes to dim 1, where the losses expect them.
    """
    if isinstance(input_dtype, str):
        input_dtype = _dtype(input_dtype)
    if not isinstance(module, nn.Module):
        module = _build(module, num_classes)
    name = name or type(module).__name__.lower()
    at = [str(a) for a in ([at] if isinstance(at, str) else at)]
    if not at:
        raise ConfigError(f"no cut given for {name}; name the submodules to cut after, e.g. at=['layer2']")
    if isinstance(module, nn.Sequential) and all("." not in a for a in at):
        model = BlockNet.from_sequential(module, input_shape, at=at, name=name, input_dtype=input_dtype)
    else:
        model = BlockNet(_traced_blocks(module, at, name), input_shape, name, input_dtype)
    if classes_last:
        model.blocks[-1] = nn.Sequential(model.blocks[-1], _ClassesFirst())
    _check_runs(model, module)
    return model


def _build(factory: Callable[..., nn.Module], num_classes: int | None) -> nn.Module:
    try:
        takes = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes = {}
    wants_classes = "num_classes" in takes or any(p.kind is p.VAR_KEYWORD for p in takes.values())
    module = factory(num_classes=num_classes) if num_classes is not None and wants_classes else factory()
    if not isinstance(module, nn.Module):
        raise ConfigError(
            f"{_named(factory)} built a {type(module).__name__}, not a torch.nn.Module; give a model"
        )
    return module


def _traced_blocks(module: nn.Module, at: list[str], name: str) -> list[nn.Module]:
    submodules = dict(module.named_modules())
    for cut in at:
        if cut not in submodules or cut == "":
            children = ", ".join(n for n, _ in module.named_children())
            raise ConfigError(
                f"cannot cut {name} at {cut!r}: it has no submodule of that name; its children are "
                f"{children} (name deeper ones with dots, e.g. layer1.0)"
            )
    if len(set(at)) != len(at):
        raise ConfigError(f"the cuts {at} of {name} name a submodule twice; give each cut once")
    nested = [(a, b) for a in at for b in at if a != b and b.startswith(a + ".")]
    if nested:
        raise ConfigError(
            f"cannot cut {name} at both {nested[0][0]!r} and {nested[0][1]!r}, one inside the other"
        )
    spine = {""} | {".".join(cut.split(".")[:i]) for cut in at for i in range(1, cut.count(".") + 1)}
    concrete = _defaults(module)
    try:
        graph = _SpineTracer(spine).trace(module, concrete_args=concrete)
    except Exception as error:  # torch.fx says why in its own words; we say what to do
        raise ConfigError(
            f"cannot trace {name} with torch.fx to cut it ({_first_line(error)}); cut where the forward "
            "has no data-dependent branch, or build the blocks yourself with BlockNet.from_sequential"
        ) from None

    # Arguments traced at their defaults leave a placeholder and an assertion on it behind.
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    fixed = set(placeholders[1:]) if len(placeholders) == len(concrete) + 1 else set()
    fixed |= {user for n in list(fixed) for user in n.users if set(user.all_input_nodes) <= fixed}
    inputs = [n for n in graph.nodes if n.op == "placeholder" and n not in fixed and n.users]
    if len(inputs) != 1:
        raise ConfigError(
            f"{name} takes {len(inputs)} tensor inputs in its forward; a BlockNet passes one tensor "
            "from block to block, so wrap the model in a module of one input"
        )
    calls = {cut: [n for n in graph.nodes if n.op == "call_module" and n.target == cut] for cut in at}
    for cut, found in calls.items():
        if len(found) != 1:
            raise ConfigError(
                f"cannot cut {name} at {cut!r}: its forward calls that submodule {len(found)} times, so "
                "there is no single point after it; cut at a submodule called once"
            )
    cut_nodes = sorted((found[0] for found in calls.values()), key=list(graph.nodes).index)

    # Assign every node to a segment: segment k ends with the k-th cut's call.
    segment_of: dict[fx.Node, int] = {}
    k = 0
    for node in graph.nodes:
        segment_of[node] = k
        if k < len(cut_nodes) and node is cut_nodes[k]:
            k += 1
    (output,) = [n for n in graph.nodes if n.op == "output"]
    if isinstance(output.args[0], (tuple, list, dict)):
        raise ConfigError(
            f"{name} returns a {type(output.args[0]).__name__} from its forward; a BlockNet's last block "
            "gives one tensor of logits, so wrap the model to return them alone"
        )

    if not any(segment_of[n] == len(cut_nodes) and n.op == "call_module" for n in graph.nodes):
        raise ConfigError(
            f"cannot cut {name} after {cut_nodes[-1].target!r}: no module runs after it, and "
            "the last block must be the classifier; cut before it"
        )
    blocks = []
    for k in range(len(cut_nodes) + 1):
        entry = inputs[0] if k == 0 else cut_nodes[k - 1]
        members = [
            n
            for n in graph.nodes
            if segment_of[n] == k and n.op not in ("placeholder", "output", "get_attr") and n not in fixed
        ]
        crossing = {
            arg
            for n in [*members, *([output] if k == len(cut_nodes) else [])]
            for arg in n.all_input_nodes
            if segment_of[arg] != k and arg is not entry and arg.op != "get_attr"
        }
        if crossing:
            where = at[0] if k == 0 else cut_nodes[k - 1].target
            shown = ", ".join(sorted(str(n.name) for n in crossing))
            raise ConfigError(
                f"cannot cut {name} at {where!r}: besides its output, {shown} flows across the cut "
                "(a skip connection or a value computed once and used later); cut where one tensor "
                "flows on, or compute that value inside each block"
            )
        block = fx.Graph()
        env: dict[fx.Node, fx.Node] = {entry: block.placeholder("x")}

        def lookup(node: fx.Node, env=env, block=block) -> fx.Node:
            if node not in env:  # a parameter or buffer read directly: copied where it is read
                env[node] = block.node_copy(node, lookup)
            return env[node]

        for node in members:
            env[node] = block.node_copy(node, lookup)
        last = output.args[0] if k == len(cut_nodes) else cut_nodes[k]
        block.output(lookup(last))
        blocks.append(fx.GraphModule(module, block, class_name=f"{type(module).__name__}Block{k + 1}"))
    return blocks


def _defaults(module: nn.Module) -> dict:
    """Arguments of `forward` after the first that have defaults, traced at their defaults
    (`mask=None`), so that a branch on them is not data-dependent."""
    parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


@torch.no_grad()
def _check_runs(model: BlockNet, module: nn.Module) -> None:
    """One forward of a zero input through the blocks, so a wrong input shape or dtype stops
    here in one sentence instead of inside the first training step."""
    try:
        model.activation_shapes()
    except Exception as error:
        dtype = str(model.input_dtype).removeprefix("torch.")
        raise ConfigError(
            f"{model.name} cannot take inputs of shape {model.input_shape} and dtype {dtype} "
            f"({_first_line(error)}); check the data set fits the model (its input channels, image "
            "size, or input_dtype=long for token ids)"
        ) from None


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"input_dtype={name!r} is not a torch dtype; give e.g. float32 or long")
    return dtype


def _named(factory: Callable) -> str:
    inner = getattr(factory, "func", factory)
    return f"{getattr(inner, '__module__', '')}.{getattr(inner, '__qualname__', repr(inner))}".lstrip(".")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(error).__name__
