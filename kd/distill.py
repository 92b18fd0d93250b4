"""Distiller: a trainable student (+ feature adapters) and frozen teachers; one call on a batch gives the loss terms."""

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from kd.ensemble import normalize_weights, weighted_logits
from kd.features import FeatureAdapter, FeatureHooks, feature_shapes
from kd.losses import KnowledgeDistillationLoss
from kd.models import forward_batch, input_keys


def adapt_view(batch: dict, source: dict | None, target: dict | None) -> dict:
    """The same augmented view for a model that expects another resolution or normalization.

    `source` and `target` are {"image_size", "mean", "std"}. Resizing is linear and normalization affine per
    channel, so resizing the normalized view and re-normalizing equals preparing it for the target directly.
    """
    if source is None or target is None or source == target:
        return batch
    out, size = dict(batch), [target["image_size"]] * 2
    rgb = batch["rgb"]
    if list(rgb.shape[-2:]) != size:
        rgb = F.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False)
    if (source["mean"], source["std"]) != (target["mean"], target["std"]):

        def column(values):
            return rgb.new_tensor(values).view(1, -1, 1, 1)

        rgb = (rgb * column(source["std"]) + column(source["mean"]) - column(target["mean"])) / column(target["std"])
    out["rgb"] = rgb
    if "ms" in batch and list(batch["ms"].shape[-2:]) != size:
        out["ms"] = F.interpolate(batch["ms"], size=size, mode="bilinear", antialias=True, align_corners=False)
    return out


class Distiller(nn.Module):
    """Student + adapters are registered submodules (trained, checkpointed, wrapped by DDP); teachers are not.

    Teachers are kept in a plain tuple on purpose: DDP would otherwise broadcast their buffers every step, the
    optimizer would see their parameters, and the state dict would carry them. They stay in eval mode and run
    under no_grad whatever `.train()` is called with. Training batches are one augmented view (`view`: its size
    and normalization); each model gets it resized / re-normalized to its own input (`student_input`,
    `teacher_inputs`), so teacher and student see the same content.
    """

    def __init__(
        self,
        student: nn.Module,
        teachers: Sequence[nn.Module],
        loss: KnowledgeDistillationLoss,
        teacher_weights: Sequence[float] | None = None,
        layer_pairs: Sequence[tuple[str, str]] = (),
        feature_teacher: int = 0,
        example_batch: dict | None = None,
        final_temperature: float | None = None,
        total_epochs: int = 1,
        ema_teacher_weight: float = 0.0,
        ema_teacher_start_epoch: float = 1.0,
        view: dict | None = None,
        student_input: dict | None = None,
        teacher_inputs: Sequence[dict] | None = None,
    ):
        super().__init__()
        self.view, self.student_input = view, student_input
        self.teacher_inputs = list(teacher_inputs) if teacher_inputs is not None else [None] * len(teachers)
        self.student, self.loss = student, loss
        self.teachers = tuple(t.eval().requires_grad_(False) for t in teachers)
        self.teacher_weights = list(teacher_weights) if teacher_weights is not None else [1.0] * len(self.teachers)
        normalize_weights(self.teacher_weights, len(self.teachers))  # validates
        self.initial_temperature, self.final_temperature = loss.temperature, final_temperature
        self.total_epochs = total_epochs
        self.ema_teacher: tuple[nn.Module, ...] = ()  # set by the loop (set_ema); a tuple keeps it unregistered
        self.ema_teacher_weight, self.ema_teacher_start_epoch = ema_teacher_weight, ema_teacher_start_epoch
        self.epoch = 0.0
        self.layer_pairs, self.feature_teacher = list(layer_pairs), feature_teacher
        self.adapters = nn.ModuleList()
        if self.layer_pairs:
            if example_batch is None:
                raise ValueError("feature matching needs an example batch to size the adapters")
            teacher = self.teachers[feature_teacher]
            student_example = adapt_view(example_batch, view, student_input)
            teacher_example = adapt_view(example_batch, view, self.teacher_inputs[feature_teacher])
            s_shapes = feature_shapes(student, [s for s, _ in self.layer_pairs], [student_example["rgb"]])
            t_shapes = feature_shapes(
                teacher, [t for _, t in self.layer_pairs], [teacher_example[k] for k in input_keys(teacher)]
            )
            self.adapters.extend(FeatureAdapter(s_shapes[s][1], t_shapes[t][1]) for s, t in self.layer_pairs)
            self.student_hooks = FeatureHooks(student, [s for s, _ in self.layer_pairs])
            self.teacher_hooks = FeatureHooks(teacher, [t for _, t in self.layer_pairs])

    @property
    def model(self) -> nn.Module:
        """What gets checkpointed and exported: the student alone."""
        return self.student

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        for t in self.teachers:
            t.eval()
        return self

    def teachers_to(self, device: torch.device, channels_last: bool = False, compile: bool = False) -> None:
        """Move the teachers; optionally channels_last and compiled (in place: nn.Module.compile keeps the module)."""
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.teachers = tuple(t.to(device, memory_format=memory_format) for t in self.teachers)
        for teacher in self.teachers:
            if compile and any(True for _ in teacher.parameters()):  # a teacher cache's lookup has nothing to compile
                teacher.compile()

    def set_model(self, student: nn.Module) -> None:
        """Swap in a graph that shares the student's parameters (quantization-aware training). Its blocks are
        traced away, so feature matching stops; the logit terms carry on."""
        self.student = student
        if self.layer_pairs:
            self.student_hooks.remove()
            self.teacher_hooks.remove()
            self.layer_pairs = []
            self.loss.feature_weight = 0.0

    def set_ema(self, ema_model: nn.Module) -> None:
        """Self-distillation: the student's EMA joins the teachers (when ema_teacher_weight > 0)."""
        if self.ema_teacher_weight > 0:
            self.ema_teacher = (ema_model,)

    def set_progress(self, epoch: float) -> None:
        """Called by the loop before each step: temperature schedule, loss warmups, EMA teacher start."""
        self.epoch = self.loss.epoch = epoch
        if self.final_temperature is not None:  # linear decay from the initial to the final temperature
            fraction = min(epoch / self.total_epochs, 1.0)
            t0, t1 = self.initial_temperature, self.final_temperature
            self.loss.temperature = t0 + (t1 - t0) * fraction

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> torch.Tensor:
        """The teachers' logits, averaged with their normalized weights (the EMA teacher included once active)."""
        logits = [
            forward_batch(t, adapt_view(batch, self.view, target))
            for t, target in zip(self.teachers, self.teacher_inputs)
        ]
        weights = list(self.teacher_weights)
        if self.ema_teacher and self.epoch >= self.ema_teacher_start_epoch:
            logits.append(self.ema_teacher[0](self.student_rgb(batch)))
            weights.append(self.ema_teacher_weight)
        return logits[0].float() if len(logits) == 1 else weighted_logits(logits, weights)

    def forward(self, batch: dict) -> dict:
        teacher_logits = self.teacher_logits(batch)
        student_logits = self.student(self.student_rgb(batch))
        feature_pairs = []
        for adapter, (s_name, t_name) in zip(self.adapters, self.layer_pairs):
            teacher_features = self.teacher_hooks.pop(t_name)
            feature_pairs.append(
                (adapter(self.student_hooks.pop(s_name), teacher_features.shape[-2:]), teacher_features)
            )
        terms = self.loss(student_logits, teacher_logits, batch["label"], feature_pairs)
        terms["temperature"] = torch.tensor(float(self.loss.temperature))
        terms["logits"] = student_logits
        return terms

    def student_rgb(self, batch: dict) -> torch.Tensor:
        return adapt_view(batch, self.view, self.student_input)["rgb"]

    def predict(self, batch: dict) -> torch.Tensor:
        """Student logits on a batch prepared for the student itself (validation loaders are)."""
        return self.student(batch["rgb"])


@torch.no_grad()
def teacher_sanity_check(teacher: nn.Module, batch: dict, num_classes: int) -> dict:
    """Logit statistics and accuracy of a teacher on one batch, and whether that is clearly better than chance.

    The verdict uses balanced accuracy (the mean recall of the classes in the batch), whose chance level is
    1 / (classes present) whatever the mix: a validation set sorted by class gives a first batch of mostly one class,
    on which a teacher that always names that class has a high plain accuracy and learnt nothing.
    "Clearly better" means at least the larger of
    - chance + 2 standard deviations of a blind guesser's balanced accuracy on these class counts: on a small batch a
      teacher guessing at random passes about 2% of the time;
    - 1.5 x chance: on a large batch the 2 deviations shrink towards chance, yet a teacher barely above chance still
      teaches mostly noise.
    A batch of one class cannot tell (chance is 1): `better_than_chance` is then None.
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
    """One line on the teacher's logits and accuracy on `batch`, with a loud warning when it is near chance."""
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
    """Up to `size` samples of the loader's dataset, taken in turn from each class, as one batch (for the sanity
    check: the loader's own first batch is mostly one class, as validation sets are sorted by class)."""
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(loader.dataset.samples):
        by_class.setdefault(label, []).append(index)
    in_turn = (i for row in itertools.zip_longest(*by_class.values()) for i in row if i is not None)
    picks = list(itertools.islice(in_turn, size))
    return next(iter(DataLoader(Subset(loader.dataset, picks), batch_size=len(picks), collate_fn=loader.collate_fn)))
