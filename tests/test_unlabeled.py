"""Distillation on unlabelled images: the hard loss never sees them, the soft loss does, every batch holds the set
share (also per process), the teacher cache is keyed by them, and a run with them trains and resumes bitwise."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
from accelerate.data_loader import prepare_data_loader
from conftest import reset_accelerate
from PIL import Image
from torch import nn

import distill
import kd.data.transforms
import kd.distill.losses
import train_teacher
from kd.config import ConfigError, DataConfig, load_config
from kd.data.dataset import InputSpec, ms_statistics
from kd.data.demo import _render
from kd.data.loaders import build_loader, open_split
from kd.data.unlabeled import ShareSampler, unlabeled_sources
from kd.distill.cache import TeacherCache, cache_key
from kd.distill.distiller import Distiller
from kd.distill.losses import KnowledgeDistillationLoss, dkd_loss
from kd.distill.teachers import TeacherEnsemble
from kd.errors import UserError
from kd.models.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from kd.models.zoo import build_model

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def write_unlabeled(folder: Path, count: int, seed: int = 7, ms: bool = True) -> Path:
    """`count` demo-like leaves (32 px PNG + 5-band .npy beside), spread over nested folders, with no class."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        rgb, stack = _render(rng, ["healthy", "leaf_rust", "early_blight"][i % 3], 32)
        path = folder / f"field{i % 2}" / f"day{i % 3}" / f"u{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path)
        if ms:
            np.save(path.with_suffix(".npy"), stack)
    return folder


# ---------------------------------------------------------------------------------------------- the losses


def test_the_hard_loss_sees_only_the_labelled_images_and_the_soft_loss_all(monkeypatch):
    seen = []
    cross_entropy = kd.distill.losses.F.cross_entropy

    def recording(logits, target, *args, **kwargs):
        seen.append((logits.detach().clone(), target.clone()))
        return cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(kd.distill.losses.F, "cross_entropy", recording)
    torch.manual_seed(0)
    student, teacher = (nn.Sequential(nn.Flatten(), nn.Linear(48, 5)) for _ in range(2))
    for model in (student, teacher):  # logits of order 1, so the soft term is far from zero
        nn.init.normal_(model[1].weight)
    labels = torch.tensor([3, -1, 0, -1, -1, 4])
    batch = {"rgb": torch.randn(6, 3, 4, 4), "label": labels}
    distiller = Distiller(student, TeacherEnsemble([teacher]), KnowledgeDistillationLoss(2.0, 0.5, 0.0)).eval()
    terms = distiller(batch)
    z = terms["logits"].detach().double().numpy()
    with torch.no_grad():
        t = teacher.eval()(batch["rgb"]).double().numpy()

    labelled = [0, 2, 5]
    assert len(seen) == 1 and torch.equal(seen[0][1], labels[labelled])
    assert torch.allclose(seen[0][0], terms["logits"].detach()[labelled].float())
    hard = -np.mean([log_softmax(z)[i, labels[i]] for i in labelled])
    assert terms["hard"].item() == pytest.approx(hard, rel=1e-5)
    p_s, p_t = log_softmax(z / 2), log_softmax(t / 2)  # KL at T = 2 over all six, times T^2
    soft = (np.exp(p_t) * (p_t - p_s)).sum(1).mean() * 4
    assert terms["soft"].item() == pytest.approx(soft, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(0.5 * hard + 0.5 * soft, rel=1e-4)


def test_a_batch_without_labels_has_a_zero_hard_loss_that_still_backpropagates():
    logits = torch.randn(3, 4, requires_grad=True)
    terms = KnowledgeDistillationLoss(1.0, 0.5, 0.0)(logits, torch.randn(3, 4), torch.full((3,), -1))
    terms["loss"].backward()
    assert terms["hard"].item() == 0 and logits.grad.abs().sum() > 0


def test_dkd_takes_the_teachers_top_class_for_an_unlabelled_image():
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([1, -1, 3, -1])
    loss = KnowledgeDistillationLoss(2.0, 0.0, 0.0, soft_loss="dkd")
    expected = dkd_loss(student, teacher, torch.tensor([1, teacher[1].argmax(), 3, teacher[3].argmax()]), 2.0, 1.0, 8.0)
    assert loss(student, teacher, labels)["soft"].item() == pytest.approx(expected.item(), rel=1e-6)


# ------------------------------------------------------------------------------------ listing and sampling


def test_images_come_from_the_folder_recursively_and_from_manifest_rows_without_a_label(tmp_path):
    folder = write_unlabeled(tmp_path / "unlabeled", 4)
    stack = np.zeros((32, 32, 5), np.float32)
    Image.fromarray(stack[..., 0].astype(np.uint8)).save(folder / "field0/day0/u000.tif")  # an MS stack, not an image
    (folder / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(folder / ".thumbs/x.png")
    rows = [["path", "label"], ["a/1.png", "a"], ["b/1.png", "b"], ["extra/9.png", ""]]
    manifest = tmp_path / "data.csv"
    with open(manifest, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    cfg = DataConfig(root=str(tmp_path), manifest=str(manifest), unlabeled_root=str(folder), demo=False)
    found = [(base.name, rel) for base, rel in unlabeled_sources(cfg)]
    assert found == [
        ("unlabeled", "field0/day0/u000.png"),
        ("unlabeled", "field0/day2/u002.png"),
        ("unlabeled", "field1/day0/u003.png"),
        ("unlabeled", "field1/day1/u001.png"),
        (tmp_path.name, "extra/9.png"),
    ]
    with pytest.raises(UserError, match="is not a folder"):
        unlabeled_sources(DataConfig(root=str(tmp_path), unlabeled_root=str(tmp_path / "nowhere"), demo=False))


def test_every_batch_holds_the_share_and_every_image_comes_once_an_epoch():
    sampler = ShareSampler.for_dataset([0] * 20 + [-1] * 50, batch_size=8, fraction=0.75, seed=3)
    assert sampler.per_batch == (2, 6) and sampler.batches == 8 and len(sampler) == 64
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert keys == list(sampler)  # seeded: a resumed run sees the same batches
        assert all(k // 70 == epoch for k in keys) and len(set(keys)) == len(keys)
        for start in range(0, 64, 8):
            indices = [k % 70 for k in keys[start : start + 8]]
            assert sum(i < 20 for i in indices) == 2
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert [k % 70 for k in first] != [k % 70 for k in sampler]
    natural = ShareSampler.for_dataset([0] * 30 + [-1] * 10, batch_size=8, fraction=None, seed=0)
    assert natural.per_batch == (6, 2) and natural.batches == 5  # the sets' own 3:1, both used up together


def test_a_batch_too_small_for_the_share_is_refused():
    with pytest.raises(UserError, match="a batch of 4 cannot hold a share of 0.10"):
        ShareSampler.for_dataset([0] * 20 + [-1] * 20, batch_size=4, fraction=0.1, seed=0)
    with pytest.raises(ConfigError, match=r"data.unlabeled_fraction must be in \(0, 1\)"):
        load_config(None, ["data.unlabeled_fraction=1.0"])


def test_two_processes_each_get_whole_batches_with_the_share(tiny_demo, tmp_path):
    folder = write_unlabeled(tmp_path / "u", 20, ms=False)
    cfg = DataConfig(root=str(tiny_demo), unlabeled_root=str(folder), unlabeled_fraction=0.5, demo=False)
    cfg.num_workers, cfg.image_size = 0, 8
    loader = build_loader(cfg, InputSpec(8), "train", 4, train=True, unlabeled=True)
    everything = [b["key"].tolist() for b in loader]
    shards = [
        [b["key"].tolist() for b in prepare_data_loader(loader, num_processes=2, process_index=rank)] for rank in (0, 1)
    ]
    assert shards[0] == everything[0::2] and shards[1] == everything[1::2][: len(shards[0])]
    labels = {k: label for k, (_, label) in enumerate(loader.dataset.samples)}
    n = len(loader.dataset)
    for batch in shards[0] + shards[1]:
        assert sorted(labels[k % n] < 0 for k in batch) == [False, False, True, True]


def test_an_unlabelled_image_that_is_a_labelled_one_is_refused(tiny_demo):
    cfg = DataConfig(root=str(tiny_demo), unlabeled_root=str(tiny_demo / "val"), demo=False, num_workers=0)
    with pytest.raises(UserError, match="also labelled images of the dataset"):
        build_loader(cfg, InputSpec(8), "train", 4, train=True, unlabeled=True)


def test_missing_ms_files_of_unlabelled_images_are_an_error_or_zero_filled(tiny_demo, tmp_path):
    folder = write_unlabeled(tmp_path / "u", 4, ms=False)
    spec = InputSpec(8, ms_mean=[0.0] * 5, ms_std=[1.0] * 5)
    cfg = DataConfig(root=str(tiny_demo), unlabeled_root=str(folder), demo=False, num_workers=0)
    with pytest.raises(UserError, match="4 of 4 unlabelled images have no multispectral file"):
        build_loader(cfg, spec, "train", 8, train=True, unlabeled=True)
    cfg.ms_missing = "zeros"
    with pytest.warns(UserWarning, match="zero-filled"):
        loader = build_loader(cfg, spec, "train", 8, train=True, unlabeled=True)
    sample = loader.dataset[len(loader.dataset) - 1]
    assert sample["label"] == -1 and sample["ms"].shape == (5, 8, 8) and not sample["ms"].any()


# ------------------------------------------------------------------------------------------ the teacher cache


def test_the_cache_key_follows_the_unlabelled_set_and_the_pixel_pipeline(tiny_demo, tmp_path, monkeypatch):
    torch.manual_seed(0)
    teacher = timm.create_model("test_efficientnet", num_classes=5)
    classes = open_split(load_config(None, [f"data.root={tiny_demo}"]).data, "train").classes
    meta = CheckpointMeta({"name": "test_efficientnet", "num_classes": 5}, classes, InputSpec(8, MEAN, STD))
    save_checkpoint(tmp_path / "teacher/best", teacher, meta)
    folder = write_unlabeled(tmp_path / "u", 6, ms=False)

    def key(unlabeled_root=str(folder)):
        cfg = DataConfig(root=str(tiny_demo), unlabeled_root=unlabeled_root, demo=False, num_workers=0, image_size=8)
        loader = build_loader(cfg, InputSpec(8, MEAN, STD), "train", 4, train=True, unlabeled=True)
        teachers = [{"checkpoint": str(tmp_path / "teacher/best"), "weight": 1.0}]
        return cache_key(teachers, [meta], loader.dataset, str(tiny_demo), [meta.input_spec.rgb()], 5)

    before = key()
    assert key() == before and before["samples"]["unlabeled"] == 6
    assert "unlabeled" not in key("")["samples"]  # a cache built without unlabelled images keeps its key
    assert before["augmentation"]["pixels"] == kd.data.transforms.PIXELS_VERSION
    views_made_another_way = kd.data.transforms.PIXELS_VERSION + 1  # the old logits are stale
    monkeypatch.setattr(kd.data.transforms.PairedTransform, "pixels", views_made_another_way)
    assert key()["augmentation"]["pixels"] == views_made_another_way
    monkeypatch.undo()
    write_unlabeled(folder / "more", 1, seed=9, ms=False)
    added = key()
    assert added["samples"]["unlabeled"] == 7 and added["samples"]["sha256"] != before["samples"]["sha256"]
    (folder / "more/field0/day0/u000.png").unlink()
    Image.new("RGB", (32, 32), "green").save(folder / "field0/day0/u000.png")  # replaced by another image
    assert key()["samples"]["sha256"] not in (before["samples"]["sha256"], added["samples"]["sha256"])


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def setup(tiny_demo, tmp_path_factory):
    """A random hybrid teacher, an unlabelled folder (with MS beside) and the distill.py arguments."""
    work = tmp_path_factory.mktemp("unlabeled")
    torch.manual_seed(0)
    arch = {"name": "hybrid", "num_classes": 5, "backbone": "test_efficientnet", "ms_backbone": "test_resnet"}
    data = load_config(None, [f"data.root={tiny_demo}"]).data
    train = open_split(data, "train", with_ms=True)
    spec = InputSpec(32, MEAN, STD, *ms_statistics(train))
    save_checkpoint(work / "teacher/best", build_model(arch).eval(), CheckpointMeta(arch, train.classes, spec))
    folder = write_unlabeled(work / "unlabeled", 14)
    args = [
        "--config",
        str(ROOT / "configs/b0.yaml"),
        f"data.root={tiny_demo}",
        "data.demo=false",
        "data.image_size=32",
        "data.num_workers=0",
        f"data.mean={MEAN}",
        f"data.std={STD}",
        f"data.unlabeled_root={folder}",
        "data.unlabeled_fraction=0.25",
        f"distillation.teacher_checkpoint={work / 'teacher/best.safetensors'}",
        "distillation.student_backbone=test_efficientnet",
        "distillation.student_pretrained=null",
        "distillation.max_epochs=2",
        "distillation.warmup_epochs=0",
        "distillation.batch_size=8",
        "distillation.precision=null",
        "distillation.save_every_n_steps=2",
    ]
    return work, folder, args


class Interrupted(Exception):
    pass


def test_distilling_with_unlabelled_images_mixed_augmented_and_quantized_trains_and_resumes_bitwise(
    setup, monkeypatch, tmp_path, capsys
):
    _, _, args = setup
    args = [
        *args,
        "distillation.feature_layers=[blocks.1]",  # the feature loss on unlabelled images too
        "distillation.mixup_alpha=0.4",
        "distillation.cutmix_alpha=1.0",
        "distillation.label_smoothing=0.1",
        "data.randaugment=rand-m9-n2-mstd0.5",
        "distillation.qat_start_fraction=0.5",  # epoch 1 through the fake-quantized graph
    ]
    forward, batches = Distiller.forward, []

    def recording(self, batch):
        if self.training:
            batches.append((batch["key"].clone(), batch["label"].clone()))
        return forward(self, batch)

    monkeypatch.setattr(Distiller, "forward", recording)
    reset_accelerate()
    whole = distill.main([*args, f"distillation.checkpoint_dir={tmp_path / 'whole'}"])
    out = capsys.readouterr().out
    assert "40 labelled + 14 unlabelled training images: each batch holds 6 labelled and 2 unlabelled" in out
    assert whole["best"] is not None and np.isfinite(whole["val_loss"])
    assert len(batches) == 12 and all((label == -1).sum() == 2 for _, label in batches)
    assert [int(key[0]) // 54 for key, _ in batches] == [0] * 6 + [1] * 6  # each epoch its own views

    calls = {"n": 0}

    def dies_at_step_9(self, batch):  # epoch 1, step 3 (6 steps an epoch), after the state saved at step 8
        calls["n"] += 1
        if calls["n"] == 9:
            raise Interrupted
        return forward(self, batch)

    monkeypatch.setattr(Distiller, "forward", dies_at_step_9)
    run = [*args, f"distillation.checkpoint_dir={tmp_path / 'killed'}"]
    reset_accelerate()
    with pytest.raises(Interrupted):
        distill.main(run)
    progress = json.loads((tmp_path / "killed/last/progress.json").read_text())
    assert (progress["epoch"], progress["batches_done"]) == (1, 2)
    monkeypatch.setattr(Distiller, "forward", forward)
    reset_accelerate()
    distill.main([*run, "--resume"])
    for name in ("best.safetensors", "latest.safetensors"):
        ours = safetensors.torch.load_file(tmp_path / "killed" / name)
        theirs = safetensors.torch.load_file(tmp_path / "whole" / name)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), f"{name} differs from the uninterrupted run"
    ours, theirs = (torch.load(tmp_path / run / "last/pytorch_model.bin") for run in ("killed", "whole"))  # QAT's
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_the_teacher_cache_holds_the_unlabelled_views(setup, tiny_demo, tmp_path):
    work, folder, args = setup
    cache_args = [
        *args,
        "distillation.feature_matching=false",
        f"distillation.teacher_cache={tmp_path / 'cache'}",
        f"distillation.checkpoint_dir={tmp_path / 'run'}",
    ]
    reset_accelerate()
    distill.main([*cache_args, "--cache-teacher"])
    teacher, meta = load_checkpoint(work / "teacher/best")
    cfg = load_config(None, args[2:10]).data
    loader = build_loader(cfg, meta.input_spec, "train", 8, train=True, classes=meta.classes, unlabeled=True)
    loader.sampler.set_epoch(1)
    batch = next(iter(loader))
    assert (batch["label"] == -1).sum() == 2
    with torch.no_grad():
        online = teacher.eval()(batch["rgb"], batch["ms"])
    assert torch.allclose(TeacherCache(tmp_path / "cache").logits(batch["key"]), online, rtol=1e-3, atol=2e-3)
    reset_accelerate()
    assert distill.main([*cache_args, "distillation.ema_decay=0.9"])["best"] is not None  # the EMA is validated


def test_train_teacher_says_it_ignores_the_unlabelled_images_and_mixes_its_own(setup, tiny_demo, tmp_path, capsys):
    _, folder, _ = setup
    reset_accelerate()
    result = train_teacher.main(
        [
            "--config",
            str(ROOT / "configs/baseline_b0.yaml"),
            f"data.root={tiny_demo}",
            "data.demo=false",
            "data.image_size=32",
            "data.num_workers=0",
            f"data.unlabeled_root={folder}",
            "data.randaugment=rand-m9-n2",
            "model.name=test_efficientnet",
            "train.max_epochs=1",
            "train.warmup_epochs=0",
            "train.batch_size=8",
            "train.mixup_alpha=0.2",
            "train.cutmix_alpha=1.0",
            "train.label_smoothing=0.1",
            f"train.checkpoint_dir={tmp_path / 'run'}",
        ]
    )
    out = capsys.readouterr().out
    assert f"data.unlabeled_root {folder} names unlabelled images: train_teacher.py trains on labelled ones" in out
    assert "40 train" in out and result["best"] is not None


# ---------------------------------------------------------------------- the table in docs/reliability.md, run

DISTILL = [
    "distill.py",
    "--config",
    "configs/b0.yaml",
    "data.root={data}",
    "data.demo=false",
    "data.image_size=32",
    "data.num_workers=0",
    "distillation.teacher_checkpoint={teacher}",
    "distillation.student_backbone=test_efficientnet",
    "distillation.student_pretrained=null",
    "distillation.feature_layers=[]",
    "distillation.max_epochs=1",
    "distillation.warmup_epochs=0",
    "distillation.precision=null",
    "distillation.checkpoint_dir={run}",
]
TRAIN = ["train_teacher.py", "--config", "configs/baseline_b0.yaml", "data.root={data}", "model.name=test_efficientnet"]
# (what is wrong, the command line with {placeholders}, what the user reads on stderr)
BAD_INPUT = [
    (
        "unlabelled folder that does not exist",
        [*DISTILL, "data.unlabeled_root={run}/nowhere"],
        "nowhere is not a folder: point it at a folder of unlabelled images",
    ),
    (
        "unlabelled images that are labelled ones",
        [*DISTILL, "data.unlabeled_root={data}/val"],
        "20 unlabelled images are also labelled images of the dataset, e.g. ",
    ),
    (
        "unlabelled images without MS files for a hybrid teacher",
        [*DISTILL, "data.unlabeled_root={no_ms}"],
        "4 of 4 unlabelled images have no multispectral file, e.g. ",
    ),
    ("unlabelled share of 1", [*DISTILL, "data.unlabeled_fraction=1"], "data.unlabeled_fraction must be in (0, 1)"),
    (
        "batch too small for the unlabelled share",
        [*DISTILL, "data.unlabeled_root={unlabeled}", "data.unlabeled_fraction=0.1", "distillation.batch_size=4"],
        "a batch of 4 cannot hold a share of 0.10 unlabelled images and at least one of each kind",
    ),
    (
        "Mixup with the teacher cache",
        [*DISTILL, "distillation.mixup_alpha=0.2", "distillation.teacher_cache={run}/cache"],
        "Mixup / CutMix mix a new pair of views at every step: set distillation.mixup_alpha=0",
    ),
    ("negative mixup_alpha", [*DISTILL, "distillation.mixup_alpha=-1"], "distillation.mixup_alpha must be >= 0"),
    ("label smoothing of 1", [*TRAIN, "train.label_smoothing=1"], "train.label_smoothing must be in [0, 1)"),
    (
        "RandAugment string kd does not read",
        [*TRAIN, "data.randaugment=rand-m9-x2"],
        "data.randaugment 'rand-m9-x2' has a section 'x2' kd does not read",
    ),
]
SCRIPTS = {"train_teacher.py": train_teacher.main, "distill.py": distill.main}


@pytest.mark.parametrize("mistake, template, message", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_gets_one_clear_message(mistake, template, message, setup, tiny_demo, capsys, tmp_path):
    work, folder, _ = setup
    no_ms = tmp_path / "no_ms"
    if "{no_ms}" in " ".join(template):
        write_unlabeled(no_ms, 4, ms=False)
    paths = {"data": tiny_demo, "teacher": work / "teacher/best", "run": tmp_path / "run", "unlabeled": folder}
    script, *args = template
    args = [str(ROOT / a) if a.startswith("configs/") else a.format(**paths, no_ms=no_ms) for a in args]
    reset_accelerate()
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_every_case_is_in_the_reliability_page():
    page = (ROOT / "docs/reliability.md").read_text()
    assert [case for case, _, _ in BAD_INPUT if f"| {case} |" not in page] == []
