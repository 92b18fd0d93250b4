"""The teacher cache: the logits it stores are the online teacher's on the same views, stale caches are refused,
and distillation from it never touches the teacher and resumes bitwise."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import reset_accelerate

import distill
import kd.distill.teachers
from kd.config import load_config
from kd.data.dataset import InputSpec, ms_statistics
from kd.data.loaders import build_loader, open_split
from kd.distill.cache import TeacherCache, bytes_per_row, reconstruct_logits, top_k_rows
from kd.distill.distiller import Distiller
from kd.distill.losses import KnowledgeDistillationLoss, soft_kl
from kd.distill.teachers import CachedTeacher, TeacherEnsemble
from kd.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from kd.models.hybrid import HybridFusion
from kd.models.zoo import build_model

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def save_teacher(path: Path, data: Path, seed: int) -> Path:
    """A random tiny hybrid teacher saved as train_teacher.py would (its accuracy does not matter here)."""
    torch.manual_seed(seed)
    arch = {"name": "hybrid", "num_classes": 5, "backbone": "test_efficientnet", "ms_backbone": "test_resnet"}
    teacher = build_model(arch)
    ms_mean, ms_std = ms_statistics(open_split(load_config(None, [f"data.root={data}"]).data, "train", with_ms=True))
    classes = open_split(load_config(None, [f"data.root={data}"]).data, "train").classes
    save_checkpoint(path, teacher.eval(), CheckpointMeta(arch, classes, InputSpec(32, MEAN, STD, ms_mean, ms_std)))
    return path.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def setup(tiny_demo, tmp_path_factory):
    """A teacher, a built cache (2 epochs, k=10 >= 5 classes: every logit kept) and the args that built it."""
    work = tmp_path_factory.mktemp("cache")
    teacher = save_teacher(work / "teacher/best", tiny_demo, seed=0)
    args = [
        "--config",
        str(ROOT / "configs/b0.yaml"),
        f"data.root={tiny_demo}",
        "data.demo=false",
        "data.image_size=32",
        "data.num_workers=0",
        f"data.mean={MEAN}",  # the teacher's: the view is its input as it is
        f"data.std={STD}",
        f"distillation.teacher_checkpoint={teacher}",
        "distillation.student_backbone=test_efficientnet",
        "distillation.student_pretrained=null",
        "distillation.feature_matching=false",
        "distillation.max_epochs=2",
        "distillation.warmup_epochs=0",
        "distillation.batch_size=8",
        "distillation.precision=null",
        "distillation.save_every_n_steps=2",
        f"distillation.teacher_cache={work / 'cache'}",
        f"distillation.checkpoint_dir={work / 'run'}",
    ]
    reset_accelerate()
    distill.main([*args, "--cache-teacher"])
    return work, teacher, args


def training_views(data: Path, teacher_meta: CheckpointMeta, with_ms: bool = True):
    """The training loader as distill.py builds it for these args (32 px, the teacher's normalization), seed 0."""
    overrides = [
        f"data.root={data}",
        "data.image_size=32",
        "data.num_workers=0",
        f"data.mean={MEAN}",
        f"data.std={STD}",
    ]
    cfg = load_config(None, overrides).data
    spec = teacher_meta.input_spec if with_ms else InputSpec(32, MEAN, STD)
    return build_loader(cfg, spec, "train", 8, train=True, classes=teacher_meta.classes)


# ------------------------------------------------------------------------------------------- top-k reconstruction


def test_top_k_rows_keep_the_largest_logits_and_the_log_mass_of_the_rest():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0], [0.5, 4.0, -2.0, 1.5, 1.0]])
    values, indices, log_rest = top_k_rows(logits, 2)
    assert indices.tolist() == [[0, 4], [1, 3]] and values.tolist() == [[3.0, 2.0], [4.0, 1.5]]
    expected = [math.log(math.exp(1) + 1 + math.exp(-1)), math.log(math.exp(0.5) + math.exp(-2) + math.exp(1))]
    assert log_rest.float().tolist() == pytest.approx(expected, abs=2e-3)  # stored in fp16
    assert bytes_per_row(2, 5) == 2 * 2 + 2 * 2 + 2 and bytes_per_row(10, 40_000) == 10 * 6 + 2


def test_the_top_k_soft_loss_matches_a_hand_computation():
    """FKD's reconstruction: top-k probabilities kept, the rest of the mass spread evenly, then KL at T."""
    teacher = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.0]])
    student = torch.tensor([[0.2, -0.3, 1.0, 0.4, 0.0]])
    logits = reconstruct_logits(*top_k_rows(teacher, 2), num_classes=5)
    z, s = teacher[0].double().numpy(), student[0].double().numpy()
    for t in (1.0, 2.0, 4.0):
        # by hand: at T=1 the mass of classes 1, 2, 3 is shared evenly; at T their common logit m is divided by T too
        m = np.log(np.exp(z[[1, 2, 3]]).sum() / 3)
        p = np.exp(np.array([z[0], m, m, m, z[4]]) / t)
        p /= p.sum()
        q = np.exp(s / t) / np.exp(s / t).sum()
        expected = (p * np.log(p / q)).sum() * t * t
        assert soft_kl(student, logits, t).item() == pytest.approx(expected, rel=2e-3)
    p1 = torch.softmax(logits, 1)[0]  # at T=1 the top-k probabilities are the teacher's own
    assert p1[[0, 4]].tolist() == pytest.approx(torch.softmax(teacher, 1)[0, [0, 4]].tolist(), rel=2e-3)
    assert p1[1] == p1[2] == p1[3]


def test_with_k_at_least_the_class_count_the_logits_come_back_whole():
    teacher = torch.randn(6, 5) * 3
    assert torch.allclose(reconstruct_logits(*top_k_rows(teacher, 8), num_classes=5), teacher, rtol=1e-3, atol=2e-3)


# -------------------------------------------------------------------------------------- the cache and the views


def test_cached_logits_are_the_online_teachers_on_the_same_views(setup, tiny_demo):
    work, teacher_path, _ = setup
    teacher, meta = load_checkpoint(teacher_path)
    teacher.eval()
    cache = TeacherCache(work / "cache")
    n = len(open_split(load_config(None, [f"data.root={tiny_demo}"]).data, "train"))
    assert cache.epochs == 2 and cache.values.shape == (2 * n, 5) and cache.meta["key"]["top_k"] == 5
    assert sum(a.nbytes for a in (cache.values, cache.indices, cache.log_rest)) == 2 * n * bytes_per_row(5, 5)
    loader = training_views(tiny_demo, meta)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batch = next(iter(loader))  # what training sees at this epoch: keys epoch * n + sample
        assert (batch["key"] // n == epoch).all()
        with torch.no_grad():
            online = teacher(batch["rgb"], batch["ms"])
        assert torch.allclose(cache.logits(batch["key"]), online, rtol=1e-3, atol=2e-3)
    sample = int(batch["key"][0]) % n  # the same sample is another view, with other logits, at another epoch
    assert not torch.allclose(cache.logits(torch.tensor([sample])), cache.logits(torch.tensor([n + sample])))
    # distillation from the cache reads no MS bands: the RGB view must be the same without them
    no_ms = training_views(tiny_demo, meta, with_ms=False)
    no_ms.sampler.set_epoch(1)
    assert torch.equal(next(iter(no_ms))["rgb"], batch["rgb"])


def test_the_cached_soft_loss_equals_the_online_one(setup, tiny_demo):
    work, teacher_path, _ = setup
    teacher, meta = load_checkpoint(teacher_path)
    batch = next(iter(training_views(tiny_demo, meta)))
    student = build_model({"name": "test_efficientnet", "num_classes": 5}).eval()
    terms = {}
    for name, teachers in (
        ("online", TeacherEnsemble([teacher])),
        ("cached", CachedTeacher(TeacherCache(work / "cache"))),
    ):
        distiller = Distiller(student, teachers, KnowledgeDistillationLoss(4.0, 0.3, 0.0)).eval()
        terms[name] = distiller(batch)
    assert terms["cached"]["soft"].item() == pytest.approx(terms["online"]["soft"].item(), rel=1e-3, abs=1e-5)
    assert terms["cached"]["loss"].item() == pytest.approx(terms["online"]["loss"].item(), rel=1e-3, abs=1e-5)


def test_an_up_to_date_cache_is_not_rebuilt(setup, capsys):
    work, _, args = setup
    before = (work / "cache/values.npy").stat().st_mtime_ns
    distill.main([*args, "--cache-teacher"])
    assert "is up to date" in capsys.readouterr().out
    assert (work / "cache/values.npy").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------------- refusals


def refused(args: list[str], capsys) -> str:
    reset_accelerate()
    with pytest.raises(SystemExit) as exit_info:
        distill.main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_cache_for_other_teacher_weights_is_refused(setup, tiny_demo, capsys, tmp_path):
    work, _, args = setup
    other = save_teacher(tmp_path / "other/best", tiny_demo, seed=1)
    err = refused(
        [*args, f"distillation.teacher_checkpoint={other}", f"distillation.checkpoint_dir={tmp_path}"], capsys
    )
    assert "teachers[0].weights_sha256" in err and "--cache-teacher" in err and "Rebuild it with" in err


@pytest.mark.parametrize(
    "change, entry",
    [
        ("data.hflip=0.0", "augmentation.hflip"),
        ("data.scale_min=0.9", "augmentation.scale"),
        ("seed=1", "augmentation.seed"),
        ("data.image_size=40", "augmentation.image_size"),
        ("distillation.teacher_cache_top_k=3", "top_k"),
    ],
)
def test_a_cache_for_another_augmentation_seed_or_k_is_refused(setup, capsys, tmp_path, change, entry):
    _, _, args = setup
    err = refused([*args, f"distillation.checkpoint_dir={tmp_path}", change], capsys)
    assert f"{entry}: cache" in err and f"python distill.py {' '.join(args[:2])}" in err
    assert f"{change} --cache-teacher" in err  # the command that rebuilds it for this run


def test_a_cache_with_too_few_epochs_or_none_is_refused(setup, capsys, tmp_path):
    _, _, args = setup
    err = refused([*args, "distillation.max_epochs=3", f"distillation.checkpoint_dir={tmp_path}"], capsys)
    assert "holds 2 epochs" in err and "max_epochs=3" in err
    err = refused([*args, f"distillation.teacher_cache={tmp_path / 'none'}"], capsys)
    assert "not found" in err and "--cache-teacher" in err


def test_feature_matching_or_the_ema_teacher_with_a_cache_is_refused(setup, capsys):
    _, _, args = setup
    err = refused([*args, "distillation.feature_matching=true", "distillation.feature_layers=[blocks.1]"], capsys)
    assert "feature matching needs the teacher's features" in err and "feature_matching=false" in err
    err = refused([*args, "distillation.ema_decay=0.9", "distillation.ema_teacher_weight=0.5"], capsys)
    assert "EMA teacher" in err and "ema_teacher_weight=0" in err


# ------------------------------------------------------------------------------------------- end to end + resume


class Interrupted(Exception):
    pass


def test_distilling_from_the_cache_never_loads_the_teacher_and_resumes_bitwise(setup, monkeypatch, tmp_path):
    _, _, args = setup

    def no_teacher(*_, **__):
        raise AssertionError("the teacher was loaded or run although its logits are cached")

    monkeypatch.setattr(kd.distill.teachers, "load_checkpoint", no_teacher)
    monkeypatch.setattr(HybridFusion, "__init__", no_teacher)
    monkeypatch.setattr(HybridFusion, "forward", no_teacher)
    whole = distill.main([*args, f"distillation.checkpoint_dir={tmp_path / 'whole'}"])
    assert whole["best"] is not None

    calls = {"n": 0}
    cached_logits = CachedTeacher.logits

    def dies_at_step_7(self, batch, source=None):  # mid-epoch 1 (5 steps per epoch), after the state saved at step 6
        calls["n"] += 1
        if calls["n"] == 7:
            raise Interrupted
        return cached_logits(self, batch, source)

    monkeypatch.setattr(CachedTeacher, "logits", dies_at_step_7)
    run = [*args, f"distillation.checkpoint_dir={tmp_path / 'killed'}"]
    reset_accelerate()
    with pytest.raises(Interrupted):
        distill.main(run)
    assert json.loads((tmp_path / "killed/last/progress.json").read_text())["batches_done"] == 1  # 6 steps done
    monkeypatch.setattr(CachedTeacher, "logits", cached_logits)
    reset_accelerate()
    distill.main([*run, "--resume"])
    for name in ("best.safetensors", "latest.safetensors", "last/model.safetensors"):
        ours = safetensors.torch.load_file(tmp_path / "killed" / name)
        theirs = safetensors.torch.load_file(tmp_path / "whole" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), f"{name} differs from the uninterrupted run"


def test_the_cached_loss_is_finite_with_k_below_the_class_count():
    """No 0 * log 0 = nan from the classes outside the top-k: their reconstructed probability is never zero."""
    teacher, student = torch.randn(4, 7) * 10, torch.randn(4, 7, requires_grad=True)
    loss = soft_kl(student, reconstruct_logits(*top_k_rows(teacher, 2), num_classes=7), 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert F.softmax(reconstruct_logits(*top_k_rows(teacher, 2), 7), 1).min() > 0
