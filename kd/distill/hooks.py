"""Feature matching: forward hooks on named layers, adapters to the teacher's shape, and `--list-layers`."""

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta
from kd.models.zoo import input_keys


def layer_names(model: nn.Module, max_depth: int = 3) -> list[str]:
    """Hookable module names up to `max_depth` dots deep (e.g. 'blocks', 'blocks.2', 'rgb.blocks.2')."""
    return [n for n, _ in model.named_modules() if n and n.count(".") < max_depth]


def resolve_layer(model: nn.Module, name: str, role: str) -> str:
    """The module name to hook. A hybrid teacher also accepts RGB-backbone names: 'blocks.2' -> 'rgb.blocks.2'."""
    modules = dict(model.named_modules())
    if name in modules:
        return name
    if f"rgb.{name}" in modules:
        return f"rgb.{name}"
    names = layer_names(model)
    shown = ", ".join(names[:80]) + (" ..." if len(names) > 80 else "")
    raise UserError(f"{role} has no layer named '{name}'. Layers it has: {shown}")


def layer_pairs(layers: Sequence, student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """`feature_layers` entries ('blocks.2' for both, or ['blocks.2', 'rgb.blocks.3']) resolved to name pairs."""
    pairs = [
        (resolve_layer(student, s, "the student"), resolve_layer(teacher, t, "the teacher"))
        for s, t in ((entry, entry) if isinstance(entry, str) else entry for entry in layers)
    ]
    for side, names in zip(("student", "teacher"), zip(*pairs)):
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # e.g. a hybrid teacher's 'blocks.2' and 'rgb.blocks.2' are one layer: its hook keeps one output
            raise UserError(
                f"feature_layers names the {side} layer(s) {twice} in more than one pair (after resolving names): "
                "each layer may appear in one pair"
            )
    return pairs


class FeatureHooks:
    """Keeps the latest output of each named module (a reference, not a copy) in `self.outputs`."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(functools.partial(self._keep, n)) for n in names]

    def _keep(self, name: str, module: nn.Module, inputs, output) -> None:
        self.outputs[name] = output

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class FeatureAdapter(nn.Module):
    """1×1 conv from student to teacher channels, then resize to the teacher's spatial size when it differs."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)

    def forward(self, student_features: torch.Tensor, teacher_size: Sequence[int]) -> torch.Tensor:
        x = self.proj(student_features)
        if tuple(x.shape[-2:]) != tuple(teacher_size):
            x = F.interpolate(x, size=tuple(teacher_size), mode="bilinear", align_corners=False)
        return x


class FeaturePairs:
    """Hooks on each pair's layers; with `adapt` (kd.distill.feature_losses.uses_adapter), one adapter per pair,
    sized by a forward pass on example batches. Whoever trains the student registers the adapters (the Distiller)."""

    def __init__(
        self,
        layers: Sequence,
        student: nn.Module,
        teacher: nn.Module,
        student_batch: dict,
        teacher_batch: dict,
        adapt: bool = True,
    ):
        self.pairs = layer_pairs(layers, student, teacher)
        student_names, teacher_names = [s for s, _ in self.pairs], [t for _, t in self.pairs]
        s_shapes = feature_shapes(student, student_names, [student_batch[k] for k in input_keys(student)])
        t_shapes = feature_shapes(teacher, teacher_names, [teacher_batch[k] for k in input_keys(teacher)])
        self.adapters = nn.ModuleList(FeatureAdapter(s_shapes[s][1], t_shapes[t][1]) for s, t in self.pairs if adapt)
        self.student_hooks = FeatureHooks(student, student_names)
        self.teacher_hooks = FeatureHooks(teacher, teacher_names)

    def pop(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student, teacher) features of each pair from the latest forward passes, adapted when there are adapters."""
        features = []
        for i, (student_name, teacher_name) in enumerate(self.pairs):
            teacher_features = self.teacher_hooks.outputs.pop(teacher_name)
            student_features = self.student_hooks.outputs.pop(student_name)
            if self.adapters:
                student_features = self.adapters[i](student_features, teacher_features.shape[-2:])
            features.append((student_features, teacher_features))
        return features

    def remove(self) -> None:
        self.student_hooks.remove()
        self.teacher_hooks.remove()


@torch.no_grad()
def output_shapes(
    model: nn.Module, inputs: Sequence[torch.Tensor], names: Sequence[str] | None = None, max_depth: int = 3
) -> dict[str, tuple]:
    """Tensor output shape of each named module (default: all up to `max_depth` deep) in one eval-mode pass."""
    names = layer_names(model, max_depth) if names is None else list(names)
    hooks = FeatureHooks(model, names)
    was_training = model.training
    try:
        model.eval()(*inputs)
    finally:
        model.train(was_training)
        hooks.remove()
    return {n: tuple(hooks.outputs[n].shape) for n in names if isinstance(hooks.outputs.get(n), torch.Tensor)}


def feature_shapes(model: nn.Module, names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict[str, tuple]:
    shapes = output_shapes(model, inputs, names)
    for name in names:
        if len(shapes.get(name, ())) != 4:
            raise UserError(
                f"layer '{name}' outputs shape {shapes.get(name)}; feature matching needs B×C×H×W feature maps"
            )
    return shapes


def _stage_outputs(shapes: dict[str, tuple], prefix: str = "") -> dict[tuple, str]:
    """{(H, W): name of the last numbered stage block at that size}."""
    last = {}
    for name, shape in shapes.items():
        rest = name[len(prefix) :] if name.startswith(prefix) else None
        # stage blocks are numbered children of a container: blocks.3, layer2.1 (not bn2.act or global_pool)
        if rest is not None and rest.count(".") == 1 and rest.split(".")[1].isdigit() and len(shape) == 4:
            last[shape[-2:]] = name
    return last


def print_layers(student: nn.Module, student_size: int, teacher: nn.Module, teacher_meta: CheckpointMeta) -> None:
    size = teacher_meta.input_spec.image_size
    inputs = {
        "rgb": torch.zeros(1, 3, size, size),
        "ms": torch.zeros(1, teacher_meta.arch.get("ms_channels", 0), size, size),
    }
    shapes = {
        f"student layers at {student_size} px": output_shapes(student, [torch.zeros(1, 3, student_size, student_size)]),
        f"teacher layers at {size} px": output_shapes(teacher, [inputs[k] for k in input_keys(teacher)]),
    }
    console = Console(width=max(100, Console().width))
    for title, layer_shapes in shapes.items():
        table = Table("layer", "output shape", title=title)
        for name, shape in layer_shapes.items():
            table.add_row(name, "×".join(map(str, shape[1:])))
        console.print(table)
    student_shapes, teacher_shapes = shapes.values()
    prefix = "rgb." if any(n.startswith("rgb.") for n in teacher_shapes) else ""
    student_stages, teacher_stages = _stage_outputs(student_shapes), _stage_outputs(teacher_shapes, prefix)
    pairs = [(s, teacher_stages[size]) for size, s in student_stages.items() if size in teacher_stages]
    console.print("suggested feature_layers (same spatial size; adapters fix the channel counts):")
    print("  [" + ", ".join(f"[{s}, {t}]" for s, t in pairs) + "]")  # plain print: rich would wrap or eat [..]
