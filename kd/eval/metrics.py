"""What evaluate.py computes from logits (N×K) and labels (N), each function stating its formula; mean ± std of runs."""

import statistics

import torch
import torch.nn.functional as F

ECE_BINS = 15


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy = (1/N) Σ_i [y_i ∈ the k largest logits of sample i]."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).double().mean().item()


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """C[i, j] = number of samples of true class i predicted as class j (K×K, int64)."""
    k = logits.shape[1]
    return torch.bincount(labels * k + logits.argmax(1), minlength=k * k).reshape(k, k)


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Accuracy (recall) of class c = C[c, c] / Σ_j C[c, j]; None for a class without samples."""
    support = confusion.sum(1)
    return [(confusion[c, c] / support[c]).item() if support[c] else None for c in range(len(support))]


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean over classes of F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c), leaving out classes that neither occur nor are
    predicted (0/0); a class that occurs but is never predicted counts with F1 = 0."""
    tp = confusion.diag().double()
    denominator = confusion.sum(0) + confusion.sum(1)  # (TP + FP) + (TP + FN) = 2·TP + FP + FN
    seen = denominator > 0
    return (2 * tp[seen] / denominator[seen]).mean().item()


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[dict]:
    """Confidence (max softmax) split into `bins` equal-width bins ((b-1)/B, b/B]: count, mean confidence, accuracy."""
    confidence, predicted = logits.double().softmax(1).max(1)
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    correct = (predicted == labels).double()
    out = []
    for b in range(bins):
        chosen = index == b
        n = int(chosen.sum())
        means = [values[chosen].mean().item() if n else None for values in (confidence, correct)]
        out.append(
            {"lower": b / bins, "upper": (b + 1) / bins, "count": n, "confidence": means[0], "accuracy": means[1]}
        )
    return out


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE = Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over `bins` equal-width confidence bins (default 15)."""
    table = calibration_bins(logits, labels, bins)
    n = sum(b["count"] for b in table)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"])


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Top-1 agreement = (1/N) Σ_i [argmax logits_i = argmax reference_i] (the same samples in the same order)."""
    return (logits.argmax(1) == reference.argmax(1)).double().mean().item()


def kl_divergence(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> float:
    """KL(teacher || model) = (1/N) Σ_i Σ_c p_ic (log p_ic − log q_ic), p = softmax(teacher/T), q = softmax(logits/T):
    "batchmean", as the distillation loss (without its T² factor)."""
    log_q = F.log_softmax(logits.double() / temperature, dim=1)
    log_p = F.log_softmax(teacher_logits.double() / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True).item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None) -> dict:
    """Everything the table reports about predictions. Top-5 is None with 5 classes or fewer (it would be 100%)."""
    confusion = confusion_matrix(logits, labels)
    return {
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5) if logits.shape[1] > 5 else None,
        "macro_f1": macro_f1(confusion),
        "ece": expected_calibration_error(logits, labels),
        "teacher_agreement": agreement(logits, teacher) if teacher is not None else None,
        "teacher_kl": kl_divergence(logits, teacher) if teacher is not None else None,
        "confusion": confusion.tolist(),
        "calibration": calibration_bins(logits, labels),
    }


def mean_std(rows: list[dict]) -> dict:
    """One row for several runs: each number (not bool) of the first becomes its mean, its sample std (n − 1) under
    row["std"][key]; other fields come from the first."""
    out = {**rows[0], "std": {}, "n": len(rows)}
    if len(rows) == 1:
        return out
    for key, value in rows[0].items():
        values = [r.get(key) for r in rows]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and None not in values:
            out[key] = statistics.fmean(values)
            out["std"][key] = statistics.stdev(values)
    return out
