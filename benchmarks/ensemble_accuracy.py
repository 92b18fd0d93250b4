"""Top-1 and per-class recall of a weighted teacher ensemble on one split, as distill.py's `distillation.teachers`
combines it: the members' logits averaged with the normalized weights (kd/distill/teachers.py), then argmax.

python benchmarks/ensemble_accuracy.py --config configs/field/teacher.yaml data.manifest=data/field/k40.csv \
    --split val --teachers checkpoints/field/teacher/best.safetensors:1 \
    checkpoints/field/teacher_lite1/best.safetensors:1

evaluate.py takes one model per row; a `teachers:` ensemble is not one checkpoint, so this prints its row (and each
member's, for comparison). Each member sees the split at its own image size and normalization, as in evaluate.py.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.cli import resolve_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="config whose data section names the dataset")
    parser.add_argument("--split", default="val")
    parser.add_argument("--teachers", nargs="+", required=True, help="checkpoint[:weight] ...")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--markdown", help="also append them as a Markdown table to this file")
    parser.add_argument("overrides", nargs="*", help="data.key=value overrides")
    args = parser.parse_intermixed_args()
    cfg = resolve_config("evaluate.py", args.config, args.overrides, False)

    import torch

    from kd.deploy.inference import checkpoint_loader, load_model
    from kd.distill.teachers import weighted_logits
    from kd.eval.metrics import confusion_matrix, per_class_accuracy

    members, labels, classes, samples = [], None, None, None
    for item in args.teachers:
        path, _, weight = item.rpartition(":")
        try:
            float(weight)
        except ValueError:
            path, weight = item, "1"
        model = load_model(path)
        loader = checkpoint_loader(cfg.data, model.meta, args.split, 128)
        these = [str(p) for p, _ in loader.dataset.samples]
        if samples is not None and (these != samples or model.meta.classes != classes):
            raise SystemExit(f"{path}: another image list or class order than the first member")
        samples, classes = these, model.meta.classes
        logits, labs = [], []
        for batch in loader:
            logits.append(model.run(*[batch[k] for k in model.meta.inputs]).float().cpu())
            labs.append(batch["label"])
        labels = torch.cat(labs)
        members.append((path, float(weight), torch.cat(logits)))

    def row(name: str, logits: torch.Tensor) -> dict:
        recall = per_class_accuracy(confusion_matrix(logits, labels))
        top1 = (logits.argmax(1) == labels).double().mean().item()
        print(f"{name}: top-1 {100 * top1:.1f}%  " + "  ".join(f"{c} {100 * r:.1f}%" for c, r in zip(classes, recall)))
        return {"name": name, "top1": top1, "recall": dict(zip(classes, recall))}

    rows = [row(f"{path} (weight {w:g})", logits) for path, w, logits in members]
    ensemble = weighted_logits([logits for *_, logits in members], [w for _, w, _ in members])
    rows.append(row("ensemble", ensemble))
    print(f"{args.split} split, {len(labels)} images")
    if args.markdown:
        lines = [
            "",
            f"The teacher ensemble on the {args.split} split ({len(labels)} images; benchmarks/ensemble_accuracy.py: "
            "the members' logits averaged with the normalized weights, as distill.py combines them)",
            "",
            "| Teacher | Top-1 Acc. | " + " | ".join(classes) + " |",
            "|---|---|" + "---|" * len(classes),
        ]
        for r in rows:
            recall = " | ".join(f"{100 * r['recall'][c]:.1f}%" for c in classes)
            lines.append(f"| {r['name']} | {100 * r['top1']:.1f}% | {recall} |")
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"split": args.split, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
