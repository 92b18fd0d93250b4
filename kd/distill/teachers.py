"""The teachers: TeacherEnsemble runs frozen checkpoints (and the student's EMA in self-distillation), CachedTeacher
reads their logits from a teacher cache: the two kinds of Teacher. Loading them, and the checks at start."""

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from kd.config import DistillationConfig
from kd.data.dataset import InputSpec
from kd.distill.cache import TeacherCache
from kd.errors import UserError, quote
from kd.models.checkpoint import CheckpointMeta, load_checkpoint, read_meta
from kd.models.hybrid import check_ms_bands
from kd.models.zoo import count_parameters, forward_batch


def normalize_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"need {count} non-negative teacher weights with a positive sum, got {weights}")
    total = sum(weights)
    normalized = [w / total for w in weights]
    # 1e308 + 1e308 overflows to inf and every weight to 0 (kd.config refuses such weights; this guards the rest)
    if not all(math.isfinite(w) for w in normalized) or abs(sum(normalized) - 1) > 1e-6:
        raise ValueError(f"teacher weights {weights} do not normalize to finite weights that sum to one")
    return normalized


def weighted_logits(logits: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    weights = normalize_weights(weights, len(logits))
    return sum(w * x.float() for w, x in zip(weights, logits))


def adapt_view(batch: dict, source: dict | None, target: dict | None) -> dict:
    """The batch as input `target` ({"image_size", "mean", "std"}) expects it, from images normalized as `source`
    says. Resizing is linear and normalization affine, so this equals preparing the images for `target` directly."""
    if source is None or target is None:
        return batch
    out, size = dict(batch), [target["image_size"]] * 2
    rgb = batch["rgb"]
    if list(rgb.shape[-2:]) != size:
        rgb = F.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False)
    if (source["mean"], source["std"]) != (target["mean"], target["std"]):
        stats = (source["std"], source["mean"], target["mean"], target["std"])
        s_std, s_mean, t_mean, t_std = (rgb.new_tensor(values).view(1, -1, 1, 1) for values in stats)
        rgb = (rgb * s_std + s_mean - t_mean) / t_std
    if rgb is batch["rgb"]:  # nothing to do costs nothing
        return batch
    out["rgb"] = rgb
    if "ms" in batch and list(batch["ms"].shape[-2:]) != size:
        out["ms"] = F.interpolate(batch["ms"], size=size, mode="bilinear", antialias=True, align_corners=False)
    return out


def loader_input(loader: DataLoader) -> dict:
    transform = loader.dataset.transform
    return {"image_size": transform.image_size, "mean": list(transform.mean), "std": list(transform.std)}


class TeacherEnsemble:
    """Frozen teachers as one: the `weights`-averaged logits, each fed the batch as its `inputs` entry says. With
    `ema_weight` > 0 the student's EMA joins them once `ema_start_epoch` has passed. Not an nn.Module on purpose:
    held by the Distiller, it would be broadcast by DDP every step, seen by the optimizer and checkpointed."""

    def __init__(
        self,
        modules: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        inputs: Sequence[dict | None] | None = None,
        ema_weight: float = 0.0,
        ema_start_epoch: float = 1.0,
    ):
        self.modules = tuple(m.eval().requires_grad_(False) for m in modules)
        self.weights = list(weights) if weights is not None else [1.0] * len(self.modules)
        normalize_weights(self.weights, len(self.modules))  # validates
        self.inputs = list(inputs) if inputs is not None else [None] * len(self.modules)
        self.ema: nn.Module | None = None
        self.ema_weight, self.ema_start_epoch, self.epoch = ema_weight, ema_start_epoch, 0.0

    def set_ema(self, ema: nn.Module) -> None:
        if self.ema_weight > 0:
            self.ema = ema

    def set_progress(self, epoch: float) -> None:
        self.epoch = epoch

    def to(self, device: torch.device, channels_last: bool = False, compile: bool = False) -> None:
        """nn.Module.compile compiles in place, keeping the module."""
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.modules = tuple(t.to(device, memory_format=memory_format) for t in self.modules)
        for teacher in self.modules:
            if compile:
                teacher.compile()

    @torch.no_grad()
    def logits(self, batch: dict, source: dict | None = None) -> torch.Tensor:
        """Float32 logits on `batch`, whose images are normalized as `source` says (the EMA teacher's input)."""
        modules, weights, inputs = list(self.modules), list(self.weights), list(self.inputs)
        if self.ema is not None and self.epoch >= self.ema_start_epoch:
            modules, weights, inputs = [*modules, self.ema], [*weights, self.ema_weight], [*inputs, source]
        logits = [forward_batch(m, adapt_view(batch, source, target)) for m, target in zip(modules, inputs)]
        return logits[0].float() if len(logits) == 1 else weighted_logits(logits, weights)


class CachedTeacher:
    """The teachers' logits read from a teacher cache by the batch's loader keys."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def logits(self, batch: dict, source: dict | None = None) -> torch.Tensor:
        return self.cache.logits(batch["key"])

    def set_ema(self, ema: nn.Module) -> None:
        """kd.distill.cache.check_applies refuses an EMA teacher with a cache."""

    def set_progress(self, epoch: float) -> None:
        """Cached logits do not change."""


Teacher = TeacherEnsemble | CachedTeacher  # what the Distiller calls: logits(batch, source), set_ema, set_progress


@dataclasses.dataclass
class TeacherCheckpoints:
    """The teacher checkpoints a run names, read (no modules when only the metadata was, for a cached run)."""

    paths: list[str]
    metas: list[CheckpointMeta]
    weights: list[float]
    modules: list[nn.Module]

    @property
    def classes(self) -> list[str]:
        return self.metas[0].classes

    @property
    def inputs(self) -> list[dict]:
        return [m.input_spec.rgb() for m in self.metas]

    @property
    def ms_meta(self) -> CheckpointMeta | None:
        return next((m for m in self.metas if m.input_spec.with_ms), None) if self.modules else None

    def describe(self, cache: TeacherCache | None = None) -> str:
        names = ", ".join(self.paths)
        if cache is not None:
            return f"teacher logits from cache {cache.path} (top-{cache.meta['key']['top_k']} of {names})"
        return f"{len(self.modules)} teacher(s): {names} ({sum(count_parameters(t) for t in self.modules) / 1e6:.2f}M)"


def load_teachers(d: DistillationConfig, online: bool = True) -> TeacherCheckpoints:
    """distillation.teachers (or teacher_checkpoint), sharing one class list; `online=False`: metadata only."""
    entries = d.teachers or [{"checkpoint": d.teacher_checkpoint, "weight": 1.0}]
    paths = [e["checkpoint"] for e in entries]
    if online:
        loaded = [load_checkpoint(c) for c in paths]
        modules, metas = [m for m, _ in loaded], [meta for _, meta in loaded]
    else:  # the teachers are never loaded, let alone run
        modules, metas = [], [read_meta(c) for c in paths]
    for path, meta in zip(paths, metas):
        if meta.classes != metas[0].classes:
            raise UserError(f"teacher {path} has classes {meta.classes}, but {paths[0]} has {metas[0].classes}")
    if not 0 <= d.feature_teacher < len(entries):
        raise UserError(f"distillation.feature_teacher={d.feature_teacher}, but there are {len(entries)} teachers")
    return TeacherCheckpoints(paths, metas, [e.get("weight", 1.0) for e in entries], modules)


def input_specs(
    student: InputSpec, teachers: TeacherCheckpoints, ms_bands: list, say: Callable[[str], None]
) -> tuple[InputSpec, InputSpec]:
    """(training view at the largest input size of all models, validation input), both with the MS bands and
    statistics of the teacher that reads them: it must see inputs as it was trained on."""
    val = student
    if ms_meta := teachers.ms_meta:
        ms = ms_meta.input_spec
        if ms_bands and ms_bands != ms.ms_bands:
            raise UserError(
                f"data.ms_bands is {quote(ms_bands)}, but the teacher was trained on bands "
                f"{quote(ms.ms_bands or 'all')}: the teacher must see its own bands. Set data.ms_bands to "
                "the teacher's, or leave it empty ([]) to use them."
            )
        if ms.ms_bands:
            say(f"multispectral bands {ms.ms_bands}: the teacher's (from its checkpoint)")
        val = dataclasses.replace(student, ms_mean=ms.ms_mean, ms_std=ms.ms_std, ms_bands=ms.ms_bands)
    view_size = max(x["image_size"] for x in [student.rgb(), *teachers.inputs])
    return dataclasses.replace(val, image_size=view_size), val


def check_teachers(
    teachers: TeacherCheckpoints, val_loader: DataLoader, sanity_batch_size: int, say: Callable[[str], None]
) -> None:
    """The MS teacher's band count, and each loaded teacher's sanity report on a class-balanced val batch."""
    check_ms_bands(teachers.ms_meta and teachers.ms_meta.arch, val_loader.dataset)
    if teachers.modules and sanity_batch_size:
        batch = class_balanced_batch(val_loader, sanity_batch_size)  # sorted val sets start with one class
        for name, teacher, target in zip(teachers.paths, teachers.modules, teachers.inputs):
            teacher_batch = adapt_view(batch, loader_input(val_loader), target)
            say(teacher_sanity_report(name, teacher, teacher_batch, len(teachers.classes)))


@torch.no_grad()
def teacher_sanity_check(teacher: nn.Module, batch: dict, num_classes: int) -> dict:
    """Logit statistics and accuracy of a teacher on one batch, and whether it is clearly better than chance.

    Balanced accuracy's chance is 1 / (classes present) whatever the mix, so a teacher always naming the class of a
    one-sided batch does not pass. "Clearly" is the larger of chance + 2 deviations of a blind guesser (a random
    teacher passes ~2% of the time on a small batch) and 1.5 x chance (on a large batch, barely above chance still
    teaches noise). A batch of one class cannot tell: `better_than_chance` is None.
    """
    logits = forward_batch(teacher.eval(), batch).float()
    labels = batch["label"].cpu()
    hits = (logits.argmax(1).cpu() == labels).float()
    counts = torch.bincount(labels, minlength=num_classes).float()
    present = counts > 0
    recall = torch.zeros(num_classes).index_add_(0, labels, hits)[present] / counts[present]
    k = int(present.sum())
    chance = 1.0 / k
    deviation = (chance * (1 - chance) * (1 / counts[present]).sum().item()) ** 0.5 / k
    threshold = max(chance + 2 * deviation, 1.5 * chance)
    balanced = recall.mean().item()
    return {
        "logit_mean": logits.mean().item(),
        "logit_std": logits.std().item(),
        "accuracy": hits.mean().item(),
        "balanced_accuracy": balanced,
        "classes_present": k,
        "samples": labels.numel(),
        "chance": chance,
        "threshold": threshold,
        "better_than_chance": balanced >= threshold if k > 1 else None,
    }


def teacher_sanity_report(name: str, teacher: nn.Module, batch: dict, num_classes: int) -> str:
    check = teacher_sanity_check(teacher, batch, num_classes)
    line = (
        f"teacher {name}: logits mean {check['logit_mean']:.3f} std {check['logit_std']:.3f}, "
        f"accuracy {check['accuracy']:.3f} on {check['samples']} val images, balanced accuracy "
        f"{check['balanced_accuracy']:.3f} over their {check['classes_present']} classes (chance {check['chance']:.3f})"
    )
    if check["better_than_chance"] is None:
        line += " - one class only: the check cannot tell a teacher from a constant guess"
    elif not check["better_than_chance"]:
        line += (
            f"\nWARNING: teacher {name} is not clearly better than chance on a validation batch (balanced accuracy "
            f"{check['balanced_accuracy']:.3f}, needs {check['threshold']:.3f}): distilling it teaches noise. Train "
            "the teacher longer, or check that the checkpoint is the one you meant and was trained on these classes "
            "in this order with this normalization."
        )
    return line


def class_balanced_batch(loader: DataLoader, size: int) -> dict:
    """Up to `size` samples taken in turn from each class (a sorted val set's first batch is mostly one class)."""
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(loader.dataset.samples):
        by_class.setdefault(label, []).append(index)
    in_turn = (i for row in itertools.zip_longest(*by_class.values()) for i in row if i is not None)
    picks = list(itertools.islice(in_turn, size))
    return next(iter(DataLoader(Subset(loader.dataset, picks), batch_size=len(picks), collate_fn=loader.collate_fn)))
