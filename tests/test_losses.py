import math

import pytest
import torch
import torch.nn.functional as F

from kd.ensemble import normalize_weights, weighted_logits
from kd.losses import KnowledgeDistillationLoss, soft_kl


def kl_by_hand(student, teacher, t):
    """sum_c p_t log(p_t / p_s) per sample, averaged over samples, times T^2, in plain Python floats."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s_exp = [math.exp(v / t) for v in s_row]
        t_exp = [math.exp(v / t) for v in t_row]
        p_s = [v / sum(s_exp) for v in s_exp]
        p_t = [v / sum(t_exp) for v in t_exp]
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    return total / len(student) * t * t


@pytest.mark.parametrize("temperature", [1.0, 4.0, 10.0])
def test_soft_kl_matches_hand_computation(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 5, generator=g) * 3, torch.randn(4, 5, generator=g) * 3
    assert soft_kl(student, teacher, temperature).item() == pytest.approx(
        kl_by_hand(student, teacher, temperature), rel=1e-5
    )


def test_soft_kl_is_zero_for_identical_logits_and_positive_otherwise():
    x = torch.randn(3, 7)
    assert soft_kl(x, x.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_kl(x, x.flip(1), 4.0).item() > 0


def test_alpha_extremes_and_weighted_sum():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    ce = F.cross_entropy(student, labels).item()
    kl = kl_by_hand(student, teacher, 2.0)
    pairs = [
        (torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)),
        (torch.full((2, 1, 2, 2), 2.0), torch.zeros(2, 1, 2, 2)),
    ]
    feature = (1.0 + 4.0) / 2  # mean over layers of each layer's MSE
    only_labels = KnowledgeDistillationLoss(temperature=2.0, alpha=1.0, feature_weight=0.0)(student, teacher, labels)
    assert only_labels["loss"].item() == pytest.approx(ce, rel=1e-5)
    only_teacher = KnowledgeDistillationLoss(temperature=2.0, alpha=0.0, feature_weight=0.0)(student, teacher, labels)
    assert only_teacher["loss"].item() == pytest.approx(kl, rel=1e-5)
    mixed = KnowledgeDistillationLoss(temperature=2.0, alpha=0.3, feature_weight=0.5)(student, teacher, labels, pairs)
    assert mixed["hard"].item() == pytest.approx(ce, rel=1e-5)
    assert mixed["soft"].item() == pytest.approx(kl, rel=1e-5)
    assert mixed["feature"].item() == pytest.approx(feature)
    assert mixed["loss"].item() == pytest.approx(0.3 * ce + 0.7 * kl + 0.5 * feature, rel=1e-5)


def test_teacher_ensemble_is_a_normalized_weighted_average():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    assert normalize_weights([1, 3], 2) == [0.25, 0.75]
    assert torch.allclose(weighted_logits([a, b], [1, 3]), torch.tensor([[0.25, 3.0]]))
    assert torch.allclose(weighted_logits([a, b]), torch.tensor([[0.5, 2.0]]))
    with pytest.raises(ValueError):
        normalize_weights([1.0], 2)
