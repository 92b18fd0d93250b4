import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import distill
import kd.distill.hooks
from kd.config import ConfigError, load_config
from kd.data.dataset import InputSpec
from kd.data.loaders import open_split
from kd.distill.distiller import Distiller
from kd.distill.feature_losses import FEATURE_LOSSES
from kd.distill.hooks import FeatureAdapter, FeatureHooks, FeaturePairs, layer_pairs
from kd.distill.losses import SOFT_LOSSES, KnowledgeDistillationLoss, check_loss_config
from kd.distill.teachers import (
    TeacherEnsemble,
    adapt_view,
    class_balanced_batch,
    teacher_sanity_check,
    teacher_sanity_report,
)
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, save_checkpoint
from kd.models.hybrid import HybridFusion


def tiny(name="test_efficientnet", classes=5):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=classes)


def tiny_hybrid(classes=5):
    torch.manual_seed(0)
    return HybridFusion(classes, backbone="test_efficientnet", ms_channels=4)


def batch(n=2, size=32):
    g = torch.Generator().manual_seed(0)
    return {
        "rgb": torch.randn(n, 3, size, size, generator=g),
        "ms": torch.randn(n, 4, size, size, generator=g),
        "label": torch.tensor([0, 3][:n]),
    }


def test_hooks_capture_the_named_layer_outputs():
    model = tiny().eval()
    x = batch()["rgb"]
    hooks = FeatureHooks(model, ["blocks.1", "blocks.3"])
    model(x)
    with torch.no_grad():  # recompute by calling the submodules one by one
        h = model.bn1(model.conv_stem(x))
        outs = []
        for block in model.blocks:
            h = block(h)
            outs.append(h)
    assert torch.allclose(hooks.outputs["blocks.1"], outs[1]) and torch.allclose(hooks.outputs["blocks.3"], outs[3])
    hooks.remove()
    hooks.outputs.clear()
    model(x)
    assert hooks.outputs == {}


def test_unknown_layer_lists_the_real_names():
    with pytest.raises(UserError, match=r"no layer named 'blocks.9'.*blocks\.0, blocks\.0\.0"):
        layer_pairs(["blocks.9"], tiny(), tiny())


def test_hybrid_teacher_accepts_rgb_backbone_names_and_explicit_pairs():
    pairs = layer_pairs(["blocks.2", ["blocks.1", "ms.blocks.1"]], tiny(), tiny_hybrid())
    assert pairs == [("blocks.2", "rgb.blocks.2"), ("blocks.1", "ms.blocks.1")]


def test_a_layer_in_two_pairs_is_refused_after_names_are_resolved():
    # 'blocks.2' and 'rgb.blocks.2' are one layer of a hybrid teacher: its hook keeps one output, not two
    with pytest.raises(UserError, match=r"teacher layer\(s\) \['rgb.blocks.2'\] in more than one pair"):
        layer_pairs([["blocks.1", "blocks.2"], ["blocks.2", "rgb.blocks.2"]], tiny(), tiny_hybrid())
    with pytest.raises(UserError, match=r"student layer\(s\) \['blocks.2'\] in more than one pair"):
        layer_pairs([["blocks.2", "ms.blocks.1"], ["blocks.2", "rgb.blocks.2"]], tiny(), tiny_hybrid())


def test_losses_without_adapters_get_the_students_own_features_and_no_adapter_is_built():
    student, teacher = tiny(), tiny_hybrid()
    pairs = FeaturePairs(
        [["blocks.1", "blocks.3"], ["blocks.3", "blocks.1"]], student, teacher, batch(), batch(), adapt=False
    )
    assert len(pairs.adapters) == 0
    b = batch()
    student.eval()(b["rgb"])
    teacher.eval()(b["rgb"], b["ms"])
    with torch.no_grad():  # recompute both models' features by calling their blocks one by one
        h, s_outs = student.bn1(student.conv_stem(b["rgb"])), []
        for block in student.blocks:
            h = block(h)
            s_outs.append(h)
    got = pairs.pop()
    assert torch.equal(got[0][0], s_outs[1]) and torch.equal(got[1][0], s_outs[3])
    assert got[0][0].shape[1] != got[0][1].shape[1]  # widths differ: nothing adapted the student's


def test_adapter_maps_channels_and_spatial_size():
    adapter = FeatureAdapter(16, 40)
    out = adapter(torch.randn(2, 16, 8, 8), (4, 4))
    assert out.shape == (2, 40, 4, 4)
    assert adapter(torch.randn(2, 16, 4, 4), (4, 4)).shape == (2, 40, 4, 4)


def make_distiller(feature_layers=("blocks.1",)):
    student, teacher = tiny(), tiny_hybrid()
    pairs = FeaturePairs(list(feature_layers), student, teacher, batch(), batch())
    # a teacher whose blocks.1 has another width than the student's would need the adapter: make it explicit
    loss = KnowledgeDistillationLoss(temperature=2.0, alpha=0.5, feature_weight=1.0)
    return Distiller(student, TeacherEnsemble([teacher]), loss, pairs), teacher


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradient():
    distiller, teacher = make_distiller()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    out = distiller(batch())
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.student.parameters())
    assert all(p.grad is not None for p in distiller.adapters.parameters())
    assert out["feature"].item() > 0 and out["soft"].item() >= 0
    # BatchNorm running stats of the teacher must not move during the student's training steps
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_the_feature_term_exists_only_while_features_are_matched():
    """Issue 23: no train/feature = 0 logged by a run without feature matching, nor after QAT stops matching."""
    student, teacher = tiny(), tiny_hybrid()
    loss = KnowledgeDistillationLoss(temperature=2.0, alpha=0.5, feature_weight=1.0)
    without = Distiller(student, TeacherEnsemble([teacher]), loss).eval()
    with torch.no_grad():
        assert set(without(batch())) == {"loss", "hard", "soft", "temperature", "logits"}
    distiller, _ = make_distiller()
    with torch.no_grad():
        assert "feature" in distiller(batch())
        distiller.set_model(distiller.student)  # what QAT does: the hooks go
        terms = distiller(batch())
    assert "feature" not in terms
    assert terms["loss"].item() == pytest.approx(0.5 * terms["hard"].item() + 0.5 * terms["soft"].item(), rel=1e-6)


def test_teacher_stays_out_of_state_dict_and_parameters():
    distiller, teacher = make_distiller()
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in distiller.parameters()}
    assert all(k.startswith(("student.", "adapters.")) for k in distiller.state_dict())


def test_soft_term_uses_the_weighted_teacher_ensemble():
    student = tiny()
    t1, t2 = tiny(), tiny()
    torch.manual_seed(1)
    t2 = timm.create_model("test_efficientnet", num_classes=5)
    loss = KnowledgeDistillationLoss(temperature=1.0, alpha=0.0, feature_weight=0.0)
    distiller = Distiller(student, TeacherEnsemble([t1, t2], [3, 1]), loss)
    b = batch()
    with torch.no_grad():
        expected_teacher = 0.75 * t1.eval()(b["rgb"]) + 0.25 * t2.eval()(b["rgb"])
        s = distiller.student.eval()(b["rgb"])
    expected = torch.nn.functional.kl_div(
        s.log_softmax(1), expected_teacher.log_softmax(1), reduction="batchmean", log_target=True
    )
    distiller.eval()
    assert distiller(b)["soft"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_one_view_is_resized_and_renormalized_for_each_model():
    import torchvision.transforms.v2.functional as TF

    raw = torch.rand(2, 3, 32, 32)
    a = {"image_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    b = {"image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    small = {**a, "image_size": 16}
    view = {"rgb": TF.normalize(raw, a["mean"], a["std"]), "ms": torch.rand(2, 4, 32, 32), "label": torch.zeros(2)}
    assert adapt_view(view, a, a) is view  # nothing to do costs nothing
    assert torch.allclose(adapt_view(view, a, b)["rgb"], TF.normalize(raw, b["mean"], b["std"]), atol=1e-5)
    resized = torch.nn.functional.interpolate(raw, size=[16, 16], mode="bilinear", antialias=True)
    out = adapt_view(view, a, small)
    assert torch.allclose(out["rgb"], TF.normalize(resized, a["mean"], a["std"]), atol=1e-5)
    assert out["ms"].shape[-2:] == (16, 16) and out["label"] is view["label"]


def test_compiled_channels_last_teachers_give_the_same_losses_and_features():
    """distillation.channels_last / compile: teachers in NHWC and compiled in place, hooks still capturing."""
    torch.manual_seed(0)
    distiller, teacher = make_distiller()
    x = batch()
    with torch.no_grad():
        reference = {k: v for k, v in distiller(x).items() if k != "logits"}
    distiller.teachers.to(torch.device("cpu"), channels_last=True, compile=True)
    conv = teacher.rgb.conv_stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert teacher._compiled_call_impl is not None  # compiled in place: same module, same state dict keys
    with torch.no_grad():
        got = {k: v for k, v in distiller(x).items() if k != "logits"}
    assert reference.keys() == got.keys() and "feature" in got
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-5)


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))


def test_the_ema_teacher_joins_at_its_start_epoch_and_stays_out_of_the_state_dict():
    student, teacher, ema = linear(0), linear(1), linear(2)
    loss = KnowledgeDistillationLoss(temperature=4.0, alpha=0.0, feature_weight=0.0, final_temperature=1.0)
    distiller = Distiller(student, TeacherEnsemble([teacher], ema_weight=1.0, ema_start_epoch=2.0), loss)
    distiller.set_ema(ema)
    rgb = torch.randn(4, 3, 2, 2)
    distiller.set_progress(1.0)
    assert loss.temperature == pytest.approx(1.0)  # set_progress reaches the loss's schedule
    with torch.no_grad():
        assert torch.allclose(distiller.teachers.logits({"rgb": rgb}), teacher(rgb))
        distiller.set_progress(2.0)
        assert torch.allclose(distiller.teachers.logits({"rgb": rgb}), 0.5 * teacher(rgb) + 0.5 * ema(rgb))
    assert not any(k.startswith("ema") for k in distiller.state_dict())
    without = TeacherEnsemble([teacher])  # ema_weight 0: the EMA is not a teacher
    without.set_ema(ema)
    without.set_progress(5.0)
    with torch.no_grad():
        assert torch.allclose(without.logits({"rgb": rgb}), teacher(rgb))


def test_a_soft_loss_added_to_the_dict_trains_a_step(monkeypatch):
    """docs/distillation.md, "Add a loss": one function, one entry in SOFT_LOSSES, its arguments from the config."""

    def squared_error(student_logits, teacher_logits, temperature, scale: float = 1.0):
        return scale * ((student_logits.float() - teacher_logits.float()) / temperature).pow(2).mean()

    monkeypatch.setitem(SOFT_LOSSES, "squared_error", squared_error)
    d = load_config(
        None, ["distillation.soft_loss=squared_error", "distillation.soft_loss_args={scale: 3}"]
    ).distillation
    check_loss_config(d)
    with pytest.raises(ConfigError, match=r"soft loss squared_error has no argument 'scael'; its arguments: scale"):
        check_loss_config(
            load_config(
                None, ["distillation.soft_loss=squared_error", "distillation.soft_loss_args={scael: 3}"]
            ).distillation
        )
    student, teacher = linear(0), linear(1)
    distiller = Distiller(student, TeacherEnsemble([teacher]), KnowledgeDistillationLoss.from_config(d))
    rgb, labels = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        expected = 3.0 * ((student(rgb) - teacher(rgb)) / 4.0).pow(2).mean()  # distillation.temperature: 4
    before = [p.clone() for p in student.parameters()]
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    terms = distiller({"rgb": rgb, "label": labels})
    assert terms["soft"].item() == pytest.approx(expected.item(), rel=1e-6)
    terms["loss"].backward()
    optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


# ------------------------------------------------------------------------------------------- teacher sanity check


class Predicts(nn.Module):
    """A teacher whose predictions are given: its logits put 5 on the given class of each sample."""

    def __init__(self, predictions: list[int], num_classes: int):
        super().__init__()
        self.register_buffer("logits", F.one_hot(torch.tensor(predictions), num_classes).float() * 5)

    def forward(self, rgb):
        return self.logits


def sanity(labels: list[int], predictions: list[int], num_classes: int) -> tuple[dict, str]:
    batch = {"rgb": torch.zeros(len(labels), 3, 4, 4), "label": torch.tensor(labels)}
    teacher = Predicts(predictions, num_classes)
    return teacher_sanity_check(teacher, batch, num_classes), teacher_sanity_report("t", teacher, batch, num_classes)


def test_a_teacher_that_always_names_the_first_class_is_flagged_on_a_sorted_validation_batch():
    """The first batch of a class-sorted validation set (demo: 60 images per class, batch 64) and a collapsed
    2-epoch teacher: 94% plain accuracy, yet it learnt nothing."""
    check, report = sanity([0] * 60 + [1] * 4, [0] * 64, num_classes=5)
    assert check["accuracy"] == pytest.approx(60 / 64)
    assert check["balanced_accuracy"] == pytest.approx((60 / 60 + 0 / 4) / 2) and check["chance"] == 0.5
    deviation = math.sqrt(0.5 * 0.5 * (1 / 60 + 1 / 4)) / 2  # a blind guesser's balanced accuracy, by hand
    assert check["threshold"] == pytest.approx(max(0.5 + 2 * deviation, 0.75))
    assert check["better_than_chance"] is False
    assert "WARNING: teacher t is not clearly better than chance" in report and "Train the teacher longer" in report


def test_a_teacher_barely_above_chance_on_a_large_batch_is_flagged():
    """10 classes x 40 images, 56 right (14%): more than 2 binomial deviations above chance (13%), below 1.5x."""
    labels = [c for c in range(10) for _ in range(40)]
    right = [i % 40 < (6 if c < 6 else 5) for i, c in enumerate(labels)]
    predictions = [c if r else (c + 1) % 10 for c, r in zip(labels, right)]
    check, report = sanity(labels, predictions, num_classes=10)
    assert sum(right) == 56 and check["accuracy"] == pytest.approx(0.14)
    assert 0.14 > 0.1 + 2 * math.sqrt(0.1 * 0.9 / 400)  # the old rule let it pass
    assert check["threshold"] == pytest.approx(0.15) and check["better_than_chance"] is False
    assert "WARNING" in report


def test_a_good_teacher_passes_without_a_warning():
    labels = [c for c in range(5) for _ in range(13)]
    predictions = [c if i % 10 else (c + 1) % 5 for i, c in enumerate(labels)]  # every 10th wrong
    check, report = sanity(labels, predictions, num_classes=5)
    assert check["accuracy"] == pytest.approx(58 / 65)
    assert check["better_than_chance"] is True and "WARNING" not in report


def test_a_batch_of_one_class_says_the_check_cannot_tell():
    check, report = sanity([2] * 8, [2] * 8, num_classes=5)
    assert check["better_than_chance"] is None and "one class only" in report and "WARNING" not in report


class Sorted(Dataset):
    """Samples sorted by class, as LeafDataset's: 10 of class 0, 5 of class 1, 2 of class 2."""

    samples = [(f"{c}_{i}.png", c) for c, n in enumerate([10, 5, 2]) for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return {"rgb": torch.full((3, 2, 2), float(index)), "label": self.samples[index][1]}


def test_the_sanity_batch_takes_each_class_in_turn():
    batch = class_balanced_batch(DataLoader(Sorted(), batch_size=4), 8)
    assert batch["label"].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert batch["rgb"][:, 0, 0, 0].tolist() == [0, 10, 15, 1, 11, 16, 2, 12]  # first samples of each class


# ------------------------------------------------------------------------------- feature losses, end to end


def cosine_distance(pairs, scale: float = 1.0):
    """A feature loss as a user adds one: a function and a FEATURE_LOSSES entry (docs: "Extend kd")."""
    return scale * torch.stack([1 - F.cosine_similarity(s.flatten(1), t.flatten(1)).mean() for s, t in pairs]).mean()


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(
    "feature_loss, args, adapters",
    [("attention", "{p: 2}", 0), ("rkd", "{angle_weight: 10}", 0), ("cosine", "{scale: 2}", 2)],
)
def test_each_feature_loss_distils_end_to_end(feature_loss, args, adapters, tiny_demo, tmp_path, monkeypatch, capsys):
    """distill.py with distillation.feature_loss: attention and RKD match the student's own features (no adapter
    built), a loss added to FEATURE_LOSSES alone trains through adapters; the feature term is logged and finite."""
    monkeypatch.setitem(FEATURE_LOSSES, "cosine", cosine_distance)
    built = []
    monkeypatch.setattr(kd.distill.hooks, "FeatureAdapter", lambda *a: built.append(a) or FeatureAdapter(*a))
    terms = []
    loss_forward = KnowledgeDistillationLoss.forward
    monkeypatch.setattr(
        KnowledgeDistillationLoss,
        "forward",
        lambda self, *a, **k: terms.append(loss_forward(self, *a, **k)) or terms[-1],
    )
    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet", num_classes=5).eval()
    classes = open_split(load_config(None, [f"data.root={tiny_demo}"]).data, "train").classes
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    meta = CheckpointMeta({"name": "test_efficientnet", "num_classes": 5}, classes, InputSpec(32, mean, std))
    save_checkpoint(tmp_path / "teacher/best", teacher, meta)
    result = distill.main(
        [
            f"data.root={tiny_demo}",
            "data.demo=false",
            "data.image_size=32",
            "data.num_workers=0",
            f"distillation.teacher_checkpoint={tmp_path / 'teacher/best.safetensors'}",
            "distillation.student_backbone=test_efficientnet",
            "distillation.student_pretrained=null",
            "distillation.feature_layers=[blocks.1, [blocks.3, blocks.2]]",
            f"distillation.feature_loss={feature_loss}",
            f"distillation.feature_loss_args={args}",
            "distillation.max_epochs=1",
            "distillation.warmup_epochs=0",
            "distillation.batch_size=8",
            "distillation.precision=null",
            f"distillation.checkpoint_dir={tmp_path / 'run'}",
        ]
    )
    assert len(built) == adapters and (tmp_path / "run/best.safetensors").is_file() and result["best"] is not None
    assert "feature pairs [('blocks.1', 'blocks.1'), ('blocks.3', 'blocks.2')]" in capsys.readouterr().out
    assert terms and all(torch.isfinite(t["feature"]) and t["feature"] > 0 for t in terms if t["loss"].requires_grad)
