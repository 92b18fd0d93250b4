"""kd/distill/feature_losses.py against the papers' formulas, recomputed here with plain loops over numpy arrays."""

import itertools
import math

import numpy as np
import pytest
import torch

from kd.distill.feature_losses import FEATURE_LOSSES, attention_transfer, feature_mse, rkd, uses_adapter


def features(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def huber(a: float, b: float) -> float:  # smooth L1 with beta 1, as in the RKD paper's code
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def attention_by_hand(x: np.ndarray, p: float) -> np.ndarray:
    b, c, h, w = x.shape
    out = np.zeros((b, h * w))
    for i in range(b):
        q = [sum(abs(x[i, k, y, z]) ** p for k in range(c)) / c for y in range(h) for z in range(w)]
        out[i] = np.array(q) / math.sqrt(sum(v * v for v in q))
    return out


def test_attention_transfer_matches_the_paper_formula():
    s, t = features(3, 5, 4, 4, seed=0), features(3, 7, 4, 4, seed=1)  # channels differ: AT does not care
    for p, beta in [(2.0, 1000.0), (1.0, 2.0)]:
        qs, qt = attention_by_hand(s.double().numpy(), p), attention_by_hand(t.double().numpy(), p)
        expected = beta / 2 * ((qs - qt) ** 2).mean()
        assert attention_transfer([(s, t)], p=p, beta=beta).item() == pytest.approx(expected, rel=1e-5)
    assert attention_transfer([(t, t)]).item() == pytest.approx(0.0, abs=1e-9)


def test_attention_transfer_resizes_the_student_and_averages_layers():
    s, t = features(2, 3, 8, 8, seed=2), features(2, 4, 4, 4, seed=3)
    resized = torch.nn.functional.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False)
    one = attention_transfer([(resized, t)]).item()
    same = attention_transfer([(t, t)]).item()
    assert attention_transfer([(s, t)]).item() == pytest.approx(one, rel=1e-6)
    assert attention_transfer([(s, t), (t, t)]).item() == pytest.approx((one + same) / 2, rel=1e-6)


def rkd_by_hand(s: np.ndarray, t: np.ndarray, wd: float, wa: float) -> float:
    n = len(s)

    def distances(e):
        d = {(i, j): float(np.linalg.norm(e[i] - e[j])) for i in range(n) for j in range(n)}
        mu = sum(v for (i, j), v in d.items() if i != j) / (n * (n - 1))
        return {k: v / mu for k, v in d.items()}

    ds, dt = distances(s), distances(t)
    distance = sum(huber(ds[k], dt[k]) for k in ds) / len(ds)

    def cos(e, i, j, k):
        a, b = e[i] - e[j], e[k] - e[j]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    triplets = list(itertools.product(range(n), repeat=3))
    angle = sum(huber(cos(s, i, j, k), cos(t, i, j, k)) for i, j, k in triplets) / len(triplets)
    return wd * distance + wa * angle


def test_rkd_matches_the_paper_formula_on_pooled_features():
    s, t = features(5, 6, 2, 2, seed=4), features(5, 9, 3, 3, seed=5)  # widths and sizes differ: relations only
    es, et = s.double().mean((2, 3)).numpy(), t.double().mean((2, 3)).numpy()
    for wd, wa in [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)]:
        expected = rkd_by_hand(es, et, wd, wa)
        assert rkd([(s, t)], distance_weight=wd, angle_weight=wa).item() == pytest.approx(expected, rel=1e-4)
    assert rkd([(t, 3.0 * t)]).item() == pytest.approx(0.0, abs=1e-6)  # scale-free: distances are normalised


def test_mse_is_the_mean_over_layers():
    a, b = features(2, 3, 4, 4, seed=6), features(2, 3, 4, 4, seed=7)
    c, d = features(2, 5, 2, 2, seed=8), features(2, 5, 2, 2, seed=9)
    expected = (((a - b) ** 2).mean() + ((c - d) ** 2).mean()) / 2
    assert feature_mse([(a, b), (c, d)]).item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_registry_and_which_losses_take_adapted_features():
    assert set(FEATURE_LOSSES) == {"mse", "attention", "rkd"}
    assert uses_adapter("mse") and not uses_adapter("attention") and not uses_adapter("rkd")


@pytest.mark.parametrize("name", ["mse", "attention", "rkd"])
def test_every_feature_loss_gives_the_student_a_gradient(name):
    student = features(4, 3, 4, 4, seed=10).requires_grad_()
    teacher = features(4, 3, 4, 4, seed=11)
    loss = FEATURE_LOSSES[name]([(student, teacher)])
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0 and student.grad.abs().sum() > 0
