"""evaluate.py's report: the table (mean ± std for runs of a recipe) for the console and markdown, per-class recall,
and the user guide's comparison lines computed from the table."""

import math

from rich.table import Table

from kd.deploy.formats import FORMATS
from kd.eval.corruptions import CORRUPTIONS
from kd.eval.metrics import mean_std

COLUMNS = ("Model", "Parameters", "Top-1 Acc.", "Latency (ms)", "Memory (MB)")
SPREAD = 1.5  # a p90 latency above this multiple of the median: the machine was busy, the speed-up is not a figure
EXTRA = ("Top-5", "Macro-F1", "ECE", "Agreement", "KL", "p90 (ms)", "Images/s", "Weights (MB)", "File (MB)")


def fmt(row: dict, key: str, scale: float = 1.0, digits: int = 1, unit: str = "", spread: bool = True) -> str:
    """A cell: the value (mean for several runs) and, for several runs, ± their standard deviation."""
    if row.get(key) is None:
        return "-"
    std = row.get("std", {}).get(key) if spread else None
    return f"{scale * row[key]:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "") + unit


def cells(name: str, r: dict, corruptions: bool) -> list[str]:
    runs = f", {r['n']} runs" if r["n"] > 1 else ""
    runtime = {f.kind: f" {f.runtime}" for f in FORMATS.values()}.get(r["kind"], "")  # a checkpoint: ""
    label = f"{name} ({r['arch']}{runtime}, {'+'.join(r['inputs']).upper()}{runs})"
    out = [label, fmt(r, "params", 1e-6, 2, "M", spread=False), fmt(r, "top1", 100, 1, "%"), fmt(r, "latency_ms", 1, 2)]
    out += [fmt(r, "memory_mb"), fmt(r, "top5", 100, 1, "%"), fmt(r, "macro_f1", 1, 3), fmt(r, "ece", 1, 3)]
    out += [fmt(r, "teacher_agreement", 100, 1, "%"), fmt(r, "teacher_kl", 1, 3), fmt(r, "latency_p90_ms", 1, 2)]
    out += [fmt(r, "throughput", 1, 0), fmt(r, "weights_mb"), fmt(r, "file_mb")]
    return out + ([fmt(r, "top1_corrupted", 100, 1, "%")] if corruptions else [])


def render(title: str, columns: tuple[str, ...], body: list[list[str]]) -> tuple[Table, list[str]]:
    """The same table for the console (rich) and for results.md (markdown)."""
    table = Table(*columns, title=title)
    for row in body:
        table.add_row(*row)
    md = [f"{title}\n", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return table, md + ["| " + " | ".join(row) + " |" for row in body]


def derived_lines(rows: dict[str, dict], teacher: str, speed: str, peak: bool, latency_runs: int) -> list[str]:
    """The user guide's comparison sentences (means for several runs). A speed-up is withheld when it rests on one
    timed call, and flagged when a model's latency spread is wide."""
    lines = []
    if teacher in rows and "distilled" in rows:
        t, s = rows[teacher], rows["distilled"]
        drop = 100 * (t["top1"] - s["top1"])  # a student that beats its teacher is said to
        if t["params"] and s["params"]:
            lines.append(f"{100 * (1 - s['params'] / t['params']):.0f}% fewer parameters than the teacher")
        lines += [
            speed_line(t, s, speed, latency_runs),
            f"{t['weights_mb'] / s['weights_mb']:.1f}x smaller weights"
            + (f", {t['memory_mb'] / s['memory_mb']:.1f}x smaller peak inference memory" if peak else ""),
            f"{-drop:.1f} points above the teacher"
            if round(drop, 1) < 0
            else f"{drop:.1f} points accuracy drop from the teacher",
        ]
    for better, worse, template in (
        ("distilled", "baseline", "{gain} points over the baseline student (same architecture, no teacher)"),
        ("baseline", "scratch", "baseline {gain} points over the student from scratch (what ImageNet weights bring)"),
    ):
        if better in rows and worse in rows:
            lines.append(gain_line(rows[better], rows[worse], template))
    return lines


def speed_line(teacher: dict, student: dict, speed: str, latency_runs: int) -> str:
    if latency_runs < 2:
        return f"speed-up not reported: each latency is one timed call (--latency-runs {latency_runs}); use 50"
    line = f"{teacher['latency_ms'] / student['latency_ms']:.1f}x faster inference ({speed})"
    spread = {who: r["latency_p90_ms"] / r["latency_ms"] for who, r in (("teacher", teacher), ("student", student))}
    noisy = {who: ratio for who, ratio in spread.items() if ratio > SPREAD}
    if noisy:
        worst = max(noisy, key=noisy.get)
        line += (
            f"; unreliable: the {worst}'s p90 latency is {noisy[worst]:.1f}x its median over {latency_runs} runs "
            "(a busy machine): measure again on an idle one, with more --latency-runs"
        )
    return line


def gain_line(a: dict, b: dict, template: str) -> str:
    """`a`'s top-1 gain over `b`'s; with several runs, their std and whether the gain is within run-to-run noise."""
    gain, stds = 100 * (a["top1"] - b["top1"]), [100 * (r["std"].get("top1") or 0) for r in (a, b)]
    line = template.format(gain=f"{gain:+.1f}")
    if a["n"] > 1 or b["n"] > 1:
        line += f"; mean of {a['n']} vs {b['n']} runs, run-to-run std {stds[0]:.1f} / {stds[1]:.1f} points"
        line += " (within run-to-run noise)" if abs(gain) <= math.hypot(*stds) else ""
    return line


def tables(summary: dict[str, dict], corruptions: bool, title: str, note: str) -> tuple[list[Table], list[str]]:
    """Console: the five quoted columns, then the details (and robustness); markdown: all columns in one table."""
    body, n = [cells(name, r, corruptions) for name, r in summary.items()], len(COLUMNS)
    columns = COLUMNS + EXTRA + (("Corrupted Top-1",) if corruptions else ())
    console = [render(title, COLUMNS, [c[:n] for c in body])[0]]
    console.append(render("details", ("Model", *columns[n:]), [[m, *c[n:]] for m, c in zip(summary, body)])[0])
    md = render(title, columns, body)[1] + ["", note]
    if corruptions:
        keys = [f"top1_{c}" for c in CORRUPTIONS] + ["top1_corrupted"]
        robust = [[m] + [fmt(r, k, 100, 1, "%") for k in keys] for m, r in summary.items()]
        what = "Top-1 under corruption, mean over severities 1-3 (RGB corrupted before normalization; MS unchanged)"
        table, lines = render(what, ("Model", *CORRUPTIONS, "mean"), robust)
        console.append(table)
        md += [""] + lines
    return console, md


def recall_table(rows: dict[str, dict], groups: dict[str, list[str]]) -> tuple[Table, list[str]] | None:
    """Recall of each class, mean ± std over a group's runs; None when the models do not share one class list."""
    classes = [list(rows[names[0]]["per_class_accuracy"]) for names in groups.values()]
    if any(c != classes[0] for c in classes):
        return None
    body = []
    for group, names in groups.items():
        per_run = [rows[n]["per_class_accuracy"] for n in names]
        merged = mean_std([{c: r[c] for c in classes[0] if r[c] is not None} for r in per_run])
        body.append([group, *[fmt(merged, c, 100, 1, "%") for c in classes[0]]])
    return render("Recall per class (share of each true class predicted as itself)", ("Model", *classes[0]), body)
