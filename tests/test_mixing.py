"""Function matching (Beyer et al., CVPR 2022): Mixup / CutMix of the one shared view, RandAugment that keeps the
MS bands on the RGB, label smoothing; each checked against a computation written out here."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.config import ConfigError, DataConfig, load_config
from kd.data.augment import COLOUR, GEOMETRIC, RandAugment, parse_randaugment
from kd.data.dataset import InputSpec
from kd.data.loaders import build_loader
from kd.data.mixing import Mixing, MixingCollate
from kd.data.transforms import PairedTransform
from kd.distill.cache import check_applies
from kd.distill.distiller import Distiller
from kd.distill.losses import KnowledgeDistillationLoss, hard_loss
from kd.distill.teachers import TeacherEnsemble
from kd.errors import UserError
from kd.train.task import Classifier


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def view_batch(labels=(0, 1, 2, 3, 1, 0), size=8, seed=0) -> dict:
    """Collated views whose MS band 0 is the red channel and band 1 the green one, so any mix that treats MS
    differently from RGB shows."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    rgb = torch.rand(n, 3, size, size, generator=g)
    return {
        "rgb": rgb,
        "ms": rgb[:, :2].clone(),
        "label": torch.tensor(labels),
        "key": torch.arange(100, 100 + n),
    }


def find_partner(mixed: torch.Tensor, images: torch.Tensor, lam: float) -> list[int]:
    """For each mixed image, the j with mixed = lam * x_i + (1 - lam) * x_j: found by search, not read from the code."""
    out = []
    for i in range(len(images)):
        errors = [(mixed[i] - (lam * images[i] + (1 - lam) * images[j])).abs().max().item() for j in range(len(images))]
        out.append(int(np.argmin(errors)))
        assert min(errors) < 1e-5
    return out


# ------------------------------------------------------------------------------------------------ the mixing


def test_mixup_hard_loss_is_lambda_ce_of_each_label():
    batch = view_batch()
    mixed = Mixing(mixup_alpha=0.4, seed=3)(batch)
    lam = mixed["mix_lambda"][0].item()
    assert 0 < lam < 1 and (mixed["mix_lambda"] == lam).all()  # one draw for the batch
    partner = find_partner(mixed["rgb"], batch["rgb"], lam)
    assert partner != list(range(6))  # the batch really was shuffled
    assert mixed["mix_label"].tolist() == [batch["label"][j].item() for j in partner]

    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    log_p = log_softmax(logits.double().numpy())
    labels = batch["label"].numpy()
    expected = np.mean([-(lam * log_p[i, labels[i]] + (1 - lam) * log_p[i, labels[partner[i]]]) for i in range(6)])
    assert hard_loss(logits, batch["label"], 0.0, mixed["mix_label"], mixed["mix_lambda"]).item() == pytest.approx(
        expected, rel=1e-6
    )
    classifier = Classifier(nn.Identity())  # the logits are the "images": flattened, the model is the identity
    out = classifier({**mixed, "rgb": logits})
    assert out["hard"].item() == pytest.approx(expected, rel=1e-6)


def test_ms_bands_get_the_same_partner_box_and_lambda_as_the_rgb():
    for seed in range(6):  # Mixup and CutMix both drawn (switch_prob 0.5)
        batch = view_batch(seed=seed)
        mixed = Mixing(mixup_alpha=1.0, cutmix_alpha=1.0, seed=seed)(batch)
        assert torch.equal(mixed["ms"], mixed["rgb"][:, :2])
        assert not torch.equal(mixed["rgb"], batch["rgb"])


def test_cutmix_pastes_one_box_whose_area_sets_lambda():
    batch = view_batch(size=16)
    mixed = Mixing(cutmix_alpha=1.0, seed=5)(batch)
    changed = (mixed["rgb"] != batch["rgb"]).any(1)  # B×H×W: where a pasted pixel differs
    rows, cols = changed.any(0).nonzero(as_tuple=True)
    box_area = (rows.max() - rows.min() + 1).item() * (cols.max() - cols.min() + 1).item()
    assert mixed["mix_lambda"][0].item() == pytest.approx(1 - box_area / 256)
    for i, j in enumerate(mixed["mix_label"].tolist()):  # inside the box, the partner's pixels
        sources = [k for k in range(6) if batch["label"][k] == j]
        inside = mixed["rgb"][i][:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert any(
            torch.equal(inside, batch["rgb"][k][:, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])
            for k in sources
        )


def test_labelled_images_mix_only_with_labelled_ones():
    labels = (0, -1, 2, -1, 1, -1, 3, -1)
    for seed in range(5):
        mixed = Mixing(mixup_alpha=1.0, seed=seed)(view_batch(labels))
        assert ((mixed["label"] >= 0) == (mixed["mix_label"] >= 0)).all()


def test_no_mix_leaves_the_images_and_says_lambda_one():
    batch = view_batch()
    mixed = Mixing(mixup_alpha=1.0, prob=0.0)(batch)
    assert torch.equal(mixed["rgb"], batch["rgb"]) and (mixed["mix_lambda"] == 1).all()


class Recorder(nn.Module):
    """A model that records what it is fed and returns fixed random logits from the mean of each input."""

    def __init__(self, keys=("rgb",), classes=4):
        super().__init__()
        self.input_keys, self.seen = keys, []
        self.head = nn.Linear(len(keys), classes)

    def forward(self, *inputs):
        self.seen.append([x.clone() for x in inputs])
        return self.head(torch.stack([x.mean((1, 2, 3)) for x in inputs], 1))


def test_teacher_and_student_see_the_identical_mixed_view():
    torch.manual_seed(0)
    teacher, student = Recorder(("rgb", "ms")), Recorder()
    mixed = MixingCollate(Mixing(mixup_alpha=0.5, cutmix_alpha=0.5, seed=1))(
        [{k: v[i] for k, v in view_batch().items()} for i in range(6)]
    )
    distiller = Distiller(student, TeacherEnsemble([teacher]), KnowledgeDistillationLoss(2.0, 0.5, 0.0))
    distiller(mixed)
    (teacher_rgb, teacher_ms), (student_rgb,) = teacher.seen[0], student.seen[0]
    assert torch.equal(teacher_rgb, mixed["rgb"]) and torch.equal(student_rgb, mixed["rgb"])
    assert torch.equal(teacher_ms, mixed["ms"]) and torch.equal(teacher_ms, teacher_rgb[:, :2])


# ----------------------------------------------------------------------------------------- label smoothing


def test_label_smoothing_matches_its_definition():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, -1, 1, 2])  # the unlabelled one is left out
    eps = 0.1
    log_p = log_softmax(logits.double().numpy())
    rows = [0, 1, 3, 4]
    expected = np.mean([-(1 - eps) * log_p[i, labels[i]] - eps * log_p[i].mean() for i in rows])
    assert hard_loss(logits, labels, eps).item() == pytest.approx(expected, rel=1e-6)
    torch_value = F.cross_entropy(logits[rows], labels[rows], label_smoothing=eps)
    assert hard_loss(logits, labels, eps).item() == pytest.approx(torch_value.item(), rel=1e-6)
    loss = KnowledgeDistillationLoss(2.0, 1.0, 0.0, label_smoothing=eps)
    assert loss(logits, logits, labels)["hard"].item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------- RandAugment


def test_geometric_ops_move_the_ms_bands_with_the_rgb():
    spec = parse_randaugment("rand-m9-n3-p1")
    geometric = RandAugment(spec, GEOMETRIC)
    moved = 0
    for seed in range(20):
        x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(seed))
        stack = torch.cat([x, x[:1]])  # MS band = red channel
        out = geometric(stack, [0.3] * 4, torch.Generator().manual_seed(seed))
        assert torch.equal(out[0], out[3])
        moved += not torch.equal(out, stack)
    assert moved == 20


def test_colour_ops_leave_the_ms_bands_alone():
    colour = RandAugment(parse_randaugment("rand-m9-n2-p1"), COLOUR)
    x = torch.rand(5, 16, 16, generator=torch.Generator().manual_seed(0))
    out = colour(x, [0.0] * 5, torch.Generator().manual_seed(0))
    assert torch.equal(out[3:], x[3:]) and not torch.equal(out[:3], x[:3])


def test_the_paired_transform_keeps_an_ms_band_equal_to_red_under_geometric_randaugment():
    transform = PairedTransform(
        12, train=True, mean=[0.4] * 3, std=[0.2] * 3, ms_mean=[0.4], ms_std=[0.2], randaugment="rand-m9-n2-p1"
    )
    transform.rand_augment = RandAugment(parse_randaugment("rand-m9-n2-p1"), GEOMETRIC)  # colour ops change red
    for seed in range(10):
        rgb = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(seed))
        out = transform(rgb, rgb[:1].clone(), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out["rgb"][0], out["ms"][0])


def test_randaugment_strings_are_read_as_timm_writes_them():
    spec = parse_randaugment("rand-m9-n2-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.prob, spec.magnitude_std) == (9, 2, 0.5, 0.5)
    assert parse_randaugment("") is None
    for bad, message in [
        ("auto-m9", "must start with 'rand'"),
        ("rand-m9-w0", "section 'w0' kd does not read"),
        ("rand-m12", r"needs m in \[0, 10\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"data.randaugment={bad}"])


# ----------------------------------------------------------------------------------------- loaders, configs


def tiny_folder(root):
    from PIL import Image

    for label, cls in enumerate("ab"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            pixels = np.random.default_rng(label * 10 + i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_the_same_seed_gives_bitwise_equal_augmented_mixed_batches(tmp_path):
    root = tiny_folder(tmp_path / "data")
    cfg = DataConfig(root=str(root), demo=False, image_size=8, num_workers=0, randaugment="rand-m9-n2-mstd0.5")
    mixing = Mixing(mixup_alpha=0.8, cutmix_alpha=1.0, seed=0)

    def batches(seed):
        loader = build_loader(
            cfg, InputSpec(8), "train", 3, train=True, seed=seed, mixing=Mixing(**{**vars(mixing), "seed": seed})
        )
        out = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            out += list(loader)
        return out

    first, again, other = batches(0), batches(0), batches(1)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
    assert not all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(first, other))
    assert any((b["mix_lambda"] < 1).all() for b in first)


def test_bad_mixing_keys_are_refused_with_the_fix():
    cases = [
        ("distillation.mixup_alpha=-1", "distillation.mixup_alpha must be >= 0"),
        ("train.cutmix_alpha=-0.5", "train.cutmix_alpha must be >= 0"),
        ("train.mixup_prob=2", "train.mixup_prob must be a probability in [0, 1]"),
        ("train.label_smoothing=1", "train.label_smoothing must be in [0, 1)"),
    ]
    for override, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])


def test_mixing_with_a_teacher_cache_is_refused():
    d = load_config(None, ["distillation.mixup_alpha=0.2", "distillation.feature_matching=false"]).distillation
    with pytest.raises(UserError, match="mixup_alpha=0 and distillation.cutmix_alpha=0"):
        check_applies(d)
