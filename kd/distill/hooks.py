"""Feature matching: forward hooks on named layers, adapters that bring student features to the teacher's shape, and
the layer listing of `distill.py --list-layers`."""

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
    """`feature_layers` entries ('blocks.2' for both, or ['blocks.2', 'rgb.blocks.3']; kd.config checks their form)
    -> name pairs resolved against the two models."""
    pairs = []
    for entry in layers:
        student_name, teacher_name = (entry, entry) if isinstance(entry, str) else entry
        pairs.append(
            (resolve_layer(student, student_name, "the student"), resolve_layer(teacher, teacher_name, "the teacher"))
        )
    for side, names in (("student", [s for s, _ in pairs]), ("teacher", [t for _, t in pairs])):
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
        self.handles = [modules[n].register_forward_hook(self._keeper(n)) for n in names]

    def _keeper(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output

        return hook

    def pop(self, name: str) -> torch.Tensor:
        return self.outputs.pop(name)

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
    """Feature matching between a student and a teacher: hooks keep the latest output of each paired layer. With
    `adapt` (a feature loss that compares the tensors elementwise, kd.distill.feature_losses.uses_adapter), one
    adapter per pair, sized by a forward pass of each model on an example batch, maps the student's to the
    teacher's shape; without, the loss gets the student's own features and no adapter is built.

    `layers` are distillation.feature_layers entries. The adapters train with the student, so whoever trains it
    registers them (the Distiller does); this object holds the hooks.
    """

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
        """(student features, teacher features) of each pair, from both models' latest forward passes; the
        student's adapted to the teacher's shape when there are adapters."""
        features = []
        for i, (student_name, teacher_name) in enumerate(self.pairs):
            teacher_features, student_features = (
                self.teacher_hooks.pop(teacher_name),
                self.student_hooks.pop(student_name),
            )
            if self.adapters:
                student_features = self.adapters[i](student_features, teacher_features.shape[-2:])
            features.append((student_features, teacher_features))
        return features

    def remove(self) -> None:
        """Stop matching: the hooks go, the adapters keep their weights."""
        self.student_hooks.remove()
        self.teacher_hooks.remove()


@torch.no_grad()
def output_shapes(
    model: nn.Module, inputs: Sequence[torch.Tensor], names: Sequence[str] | None = None, max_depth: int = 3
) -> dict[str, tuple]:
    """Output shape of each named module (default: all up to `max_depth` dots deep, in module order; tensor outputs
    only) for one eval-mode forward pass on `inputs`; the model is left in its mode."""
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
    """Output shape of each layer to match; feature matching needs B×C×H×W maps."""
    shapes = output_shapes(model, inputs, names)
    for name in names:
        if len(shapes.get(name, ())) != 4:
            raise UserError(
                f"layer '{name}' outputs shape {shapes.get(name)}; feature matching needs B×C×H×W feature maps"
            )
    return shapes


def _stage_outputs(shapes: dict[str, tuple], prefix: str = "") -> dict[tuple, str]:
    """The last block at each spatial size: {(H, W): name}, over the numbered blocks of a backbone's stages."""
    last = {}
    for name, shape in shapes.items():
        rest = name[len(prefix) :] if name.startswith(prefix) else None
        # stage blocks are numbered children of a container: blocks.3, layer2.1 (not bn2.act or global_pool)
        if rest is not None and rest.count(".") == 1 and rest.split(".")[1].isdigit() and len(shape) == 4:
            last[shape[-2:]] = name
    return last


def suggest_pairs(student_shapes: dict[str, tuple], teacher_shapes: dict[str, tuple]) -> list[tuple[str, str]]:
    """[student, teacher] layer pairs whose feature maps have the same spatial size (the last block of each size)."""
    prefix = "rgb." if any(n.startswith("rgb.") for n in teacher_shapes) else ""
    student_stages, teacher_stages = _stage_outputs(student_shapes), _stage_outputs(teacher_shapes, prefix)
    return [(s, teacher_stages[size]) for size, s in student_stages.items() if size in teacher_stages]


def print_layers(student: nn.Module, student_size: int, teacher: nn.Module, teacher_meta: CheckpointMeta) -> None:
    """Every hookable layer of both models with its output shape, and pairs whose spatial sizes match."""
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
    pairs = suggest_pairs(*shapes.values())
    console.print("suggested feature_layers (same spatial size; adapters fix the channel counts):")
    print("  [" + ", ".join(f"[{s}, {t}]" for s, t in pairs) + "]")  # plain print: rich would wrap or eat [..]
