import math

import pytest
import torch
import torch.nn.functional as F

from kd.config import ConfigError, load_config
from kd.distill.feature_losses import FEATURE_LOSSES
from kd.distill.losses import KnowledgeDistillationLoss, check_loss_config, dist_loss, dkd_loss, soft_kl
from kd.distill.teachers import normalize_weights, weighted_logits


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


def softmax_by_hand(row, t):
    exps = [math.exp(v / t) for v in row]
    return [v / sum(exps) for v in exps]


def kl_of_lists(p, q):
    """KL(p || q) of two plain-Python distributions."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def dkd_by_hand(student, teacher, labels, t, alpha, beta):
    """(alpha * TCKD + beta * NCKD) * T^2 from the DKD paper's definitions, averaged over samples, in plain Python."""
    tckd = nckd = 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        p_s, p_t = softmax_by_hand(s_row, t), softmax_by_hand(t_row, t)
        tckd += kl_of_lists([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        others = [c for c in range(len(s_row)) if c != y]
        q_s = [p_s[c] / sum(p_s[k] for k in others) for c in others]
        q_t = [p_t[c] / sum(p_t[k] for k in others) for c in others]
        nckd += kl_of_lists(q_t, q_s)
    n = len(student)
    return (alpha * tckd / n + beta * nckd / n) * t * t


def pearson_by_hand(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def dist_by_hand(student, teacher, t, beta, gamma):
    """T^2 * (beta * (1 - mean row correlation) + gamma * (1 - mean column correlation)) of softmax(z / T)."""
    p_s = [softmax_by_hand(row, t) for row in student.tolist()]
    p_t = [softmax_by_hand(row, t) for row in teacher.tolist()]
    inter = 1 - sum(pearson_by_hand(a, b) for a, b in zip(p_s, p_t)) / len(p_s)
    columns_s, columns_t = list(zip(*p_s)), list(zip(*p_t))
    intra = 1 - sum(pearson_by_hand(a, b) for a, b in zip(columns_s, columns_t)) / len(columns_s)
    return (beta * inter + gamma * intra) * t * t


def random_batch(seed, n=6, classes=5):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(n, classes, generator=g) * 3, torch.randn(n, classes, generator=g) * 3
    return student, teacher, torch.randint(0, classes, (n,), generator=g)


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
    assert set(only_labels) == {"loss", "hard", "soft", "temperature"}  # no feature pairs: no feature term (issue 23)
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


@pytest.mark.parametrize("temperature", [1.0, 4.0, 10.0])
@pytest.mark.parametrize("alpha, beta", [(1.0, 8.0), (0.5, 2.0)])
def test_dkd_matches_hand_computation(temperature, alpha, beta):
    student, teacher, labels = random_batch(2)
    expected = dkd_by_hand(student, teacher, labels, temperature, alpha, beta)
    assert dkd_loss(student, teacher, labels, temperature, alpha, beta).item() == pytest.approx(expected, rel=1e-4)


def test_dkd_with_beta_zero_is_alpha_times_target_class_kl():
    student, teacher, labels = random_batch(3)
    tckd = 0.0
    for s_row, t_row, y in zip(student.tolist(), teacher.tolist(), labels.tolist()):
        b_s, b_t = softmax_by_hand(s_row, 2.0)[y], softmax_by_hand(t_row, 2.0)[y]
        tckd += b_t * math.log(b_t / b_s) + (1 - b_t) * math.log((1 - b_t) / (1 - b_s))
    expected = 0.7 * tckd / len(labels) * 2.0 * 2.0
    assert dkd_loss(student, teacher, labels, 2.0, alpha=0.7, beta=0.0).item() == pytest.approx(expected, rel=1e-4)


def test_dkd_is_finite_with_extreme_logits():
    student, teacher, labels = random_batch(4)
    student = (student * 100).requires_grad_()
    loss = dkd_loss(student, teacher * 100, labels, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("epoch, factor", [(0.0, 0.0), (10.0, 0.5), (20.0, 1.0), (35.5, 1.0)])
def test_dkd_warmup_scales_the_soft_term(epoch, factor):
    student, teacher, labels = random_batch(5)
    full = dkd_by_hand(student, teacher, labels, 4.0, 1.0, 8.0)
    loss = KnowledgeDistillationLoss(4.0, alpha=0.0, feature_weight=0.0, soft_loss="dkd", soft_warmup_epochs=20)
    loss.set_progress(epoch)
    assert loss(student, teacher, labels)["soft"].item() == pytest.approx(factor * full, rel=1e-4, abs=1e-7)


def test_dkd_without_warmup_is_full_from_the_start():
    student, teacher, labels = random_batch(6)
    loss = KnowledgeDistillationLoss(4.0, alpha=0.0, feature_weight=0.0, soft_loss="dkd", soft_warmup_epochs=0)
    expected = dkd_by_hand(student, teacher, labels, 4.0, 1.0, 8.0)
    assert loss(student, teacher, labels)["soft"].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 10.0])
@pytest.mark.parametrize("beta, gamma", [(1.0, 1.0), (2.0, 0.5)])
def test_dist_matches_hand_computation(temperature, beta, gamma):
    student, teacher, _ = random_batch(7)
    expected = dist_by_hand(student, teacher, temperature, beta, gamma)
    assert dist_loss(student, teacher, temperature, beta, gamma).item() == pytest.approx(expected, rel=1e-4)


def test_dist_is_zero_for_identical_logits_invariant_to_row_shifts_and_positive_otherwise():
    student, teacher, _ = random_batch(8)
    assert dist_loss(student, student.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-5)
    shifts = torch.arange(6.0)[:, None] * 10  # softmax ignores a per-row constant
    assert dist_loss(student, student + shifts, 1.0).item() == pytest.approx(0.0, abs=1e-5)
    assert dist_loss(student + shifts, teacher - shifts, 4.0).item() == pytest.approx(
        dist_loss(student, teacher, 4.0).item(), rel=1e-4
    )
    assert dist_loss(student, teacher, 4.0).item() > 0


@pytest.mark.parametrize("soft_loss", ["kl", "dkd", "dist"])
def test_soft_loss_switch_routes_to_each_term(soft_loss):
    student, teacher, labels = random_batch(9)
    expected = {
        "kl": kl_by_hand(student, teacher, 3.0),
        "dkd": dkd_by_hand(student, teacher, labels, 3.0, 0.5, 4.0),
        "dist": dist_by_hand(student, teacher, 3.0, 2.0, 0.5),
    }[soft_loss]
    arguments = {"kl": {}, "dkd": {"alpha": 0.5, "beta": 4.0}, "dist": {"beta": 2.0, "gamma": 0.5}}[soft_loss]
    loss = KnowledgeDistillationLoss(3.0, 0.3, 0.0, soft_loss, arguments)
    terms = loss(student, teacher, labels)
    assert terms["soft"].item() == pytest.approx(expected, rel=1e-4)
    ce = F.cross_entropy(student, labels).item()
    assert terms["loss"].item() == pytest.approx(0.3 * ce + 0.7 * expected, rel=1e-4)


@pytest.mark.parametrize("soft_loss", ["kl", "dkd", "dist"])
def test_soft_terms_are_float32_for_half_precision_logits(soft_loss):
    student, teacher, labels = random_batch(10)
    student, teacher = student.bfloat16(), teacher.bfloat16()
    loss = KnowledgeDistillationLoss(soft_loss=soft_loss)
    half = loss(student, teacher, labels)["soft"]
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(loss(student.float(), teacher.float(), labels)["soft"].item(), rel=1e-5)


def test_the_temperature_decays_linearly_to_the_final_one_and_is_logged():
    loss = KnowledgeDistillationLoss(
        temperature=4.0, alpha=0.0, feature_weight=0.0, final_temperature=1.0, total_epochs=10
    )
    loss.set_progress(5.0)
    assert loss.temperature == pytest.approx(2.5)
    student, teacher, labels = random_batch(11)
    assert loss(student, teacher, labels)["temperature"].item() == pytest.approx(2.5)
    assert loss(student, teacher, labels)["soft"].item() == pytest.approx(kl_by_hand(student, teacher, 2.5), rel=1e-4)
    loss.set_progress(12.0)
    assert loss.temperature == pytest.approx(1.0)
    constant = KnowledgeDistillationLoss(temperature=4.0)
    constant.set_progress(5.0)
    assert constant.temperature == 4.0


def distillation(*overrides: str):
    """The distillation section of a config with these overrides, its losses checked as distill.py checks them."""
    d = load_config(None, [f"distillation.{o}" for o in overrides]).distillation
    check_loss_config(d)
    return d


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["soft_loss=crd"], "distillation.soft_loss must be kl | dkd | dist, got 'crd'"),
        (["soft_loss=dkdd"], "distillation.soft_loss must be kl | dkd | dist, got 'dkdd'. Did you mean 'dkd'?"),
        (
            ["feature_loss=rdk"],
            "distillation.feature_loss must be mse | attention | rkd, got 'rdk'. Did you mean 'rkd'?",
        ),
        (["soft_loss_args={beta: 2}"], "distillation.soft_loss_args: soft loss kl has no argument 'beta'; its "),
        (
            ["soft_loss=dkd", "soft_loss_args={gamma: 2}"],
            "distillation.soft_loss_args: soft loss dkd has no argument 'gamma'; its arguments: alpha, beta",
        ),
        (
            ["feature_loss=rkd", "feature_loss_args={beta: 2}"],
            "distillation.feature_loss_args: feature loss rkd has no argument 'beta'; its arguments: distance_weight, "
            "angle_weight",
        ),
        (["feature_loss_args={p: 1}"], "distillation.feature_loss_args: feature loss mse has no argument 'p'; its "),
        (["soft_loss=dist", "soft_loss_args={beta: heavy}"], "distillation.soft_loss_args.beta must be float, got"),
        (["soft_loss=dist", "soft_loss_args={beta: .nan}"], "distillation.soft_loss_args.beta must be a finite"),
        (["feature_loss=attention", "feature_loss_args={p: x}"], "distillation.feature_loss_args.p must be float"),
    ],
)
def test_loss_names_and_arguments_are_checked_against_the_loss_functions(overrides, message):
    """Moved from tests/test_config.py: distill.py checks them right after parsing (kd.config knows no losses)."""
    with pytest.raises(ConfigError) as info:
        distillation(*overrides)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("soft_loss_args=[2]", "distillation.soft_loss_args must be a mapping of argument names to values, e.g."),
        ("feature_loss_args=3", "distillation.feature_loss_args must be a mapping of argument names to values"),
    ],
)
def test_loss_arguments_that_are_not_a_mapping_are_refused_when_the_config_loads(override, message):
    """The rule lives in kd.config (check_loss_config does not repeat it)."""
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"distillation.{override}"])
    assert str(info.value).startswith(message), str(info.value)


def test_the_config_reaches_the_loss_with_values_of_the_annotated_types():
    def loss_of(*overrides):
        return KnowledgeDistillationLoss.from_config(distillation(*overrides))

    dkd = loss_of("soft_loss=dkd", "soft_loss_args={beta: 4}", "dkd_warmup_epochs=5")
    assert dkd.soft_loss_args == {"beta": 4.0} and type(dkd.soft_loss_args["beta"]) is float
    assert dkd.soft_function is dkd_loss and dkd.soft_warmup_epochs == 5.0
    dist = loss_of("soft_loss=dist", "soft_loss_args={gamma: 0.5}", "max_epochs=7")
    assert dist.soft_loss_args == {"gamma": 0.5} and dist.soft_warmup_epochs == 0.0
    assert loss_of("final_temperature=1", "max_epochs=7").total_epochs == 7
    assert loss_of().soft_loss_args == {} and loss_of().soft_warmup_epochs == 0.0  # the DKD warmup is DKD's
    rkd = loss_of("feature_loss=rkd", "feature_loss_args={angle_weight: 0}")
    assert rkd.feature_function is FEATURE_LOSSES["rkd"] and rkd.feature_loss_args == {"angle_weight": 0.0}
    assert loss_of().feature_function is FEATURE_LOSSES["mse"] and loss_of().feature_loss_args == {}


def test_the_feature_term_is_the_chosen_feature_loss_with_its_arguments():
    """KnowledgeDistillationLoss calls FEATURE_LOSSES[feature_loss](pairs, **feature_loss_args), weighted."""
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.randn(4, 6, 4, 4, generator=g), torch.randn(4, 8, 2, 2, generator=g))]
    student, teacher, labels = random_batch(12, n=4)
    loss = KnowledgeDistillationLoss(
        alpha=0.0, feature_weight=2.0, feature_loss="attention", feature_loss_args={"p": 1.0}
    )
    terms = loss(student, teacher, labels, pairs)
    by_hand = 0.0  # attention of one layer, p = 1, beta 1000: mean_c |A|, student resized to 2x2, L2-normalised
    s = F.interpolate(pairs[0][0], size=(2, 2), mode="bilinear", align_corners=False)
    for a, b in zip(s.abs().mean(1).flatten(1).tolist(), pairs[0][1].abs().mean(1).flatten(1).tolist()):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        by_hand += sum((x / na - y / nb) ** 2 for x, y in zip(a, b)) / len(a)
    by_hand = 1000.0 / 2 * by_hand / len(pairs[0][0])
    assert terms["feature"].item() == pytest.approx(by_hand, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(terms["soft"].item() + 2.0 * by_hand, rel=1e-4)
