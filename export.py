"""Export a student checkpoint to a single self-contained ONNX file, and prove onnxruntime agrees with PyTorch.

    python export.py --checkpoint checkpoints/student/best.safetensors --out exports/student.onnx \
        [--config configs/b0.yaml] [--atol 1e-3]

The parity check runs on real validation images when --config names a dataset (random inputs otherwise) and fails
loudly past --atol. Classes, input size and normalization go into the ONNX metadata and a sidecar <out>.json, so
the model can be used without this repository.
"""

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from kd.config import load_config
from kd.data import checkpoint_loader, prepare_data
from kd.errors import UserError, exit_on_user_error
from kd.models import input_keys, load_checkpoint


def export_onnx(model: torch.nn.Module, meta: dict, path: Path, opset: int = 18) -> Path:
    """Dynamo-export with a dynamic batch dimension; weights embedded (no .onnx.data); metadata attached."""
    size = meta["image_size"]
    example = torch.randn(2, 3, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=opset,
            input_names=["rgb"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    proto = onnx.load(str(path))
    for key in ("classes", "image_size", "mean", "std"):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(meta[key])
    onnx.save(proto, str(path))
    return path


def parity(model: torch.nn.Module, session: ort.InferenceSession, batches) -> dict:
    """Max |logit difference|, top-1 agreement and (with labels) accuracy of ONNX Runtime vs PyTorch."""
    max_diff, agree, correct, total = 0.0, 0, 0, 0
    with torch.inference_mode():
        for batch in batches:
            rgb = batch["rgb"]
            expected = model(rgb).numpy()
            got = session.run(None, {"rgb": rgb.numpy()})[0]
            max_diff = max(max_diff, float(np.abs(got - expected).max()))
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
            if "label" in batch:
                correct += int((got.argmax(1) == batch["label"].numpy()).sum())
            total += rgb.shape[0]
    report = {"max_abs_diff": max_diff, "top1_agreement": agree / total, "samples": total}
    if all("label" in b for b in batches):
        report["onnx_accuracy"] = correct / total
    return report


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="student checkpoint (.safetensors + .json)")
    parser.add_argument("--out", default="exports/student.onnx")
    parser.add_argument("--config", help="config whose data section gives validation images for the check")
    parser.add_argument("--split", default="val")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest allowed |logit difference|")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--max-batches", type=int, default=4, help="validation batches used for the check")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_intermixed_args(argv)

    model, meta = load_checkpoint(args.checkpoint)
    if input_keys(model) != ("rgb",):
        raise UserError(
            f"{args.checkpoint} is a {meta['arch']['name']} model with inputs {meta['inputs']}; "
            "export.py exports RGB students (distill.py or train_teacher.py with a timm model)"
        )
    model.eval()
    out = export_onnx(model, meta, Path(args.out), args.opset)

    if args.config:
        cfg = load_config(args.config, args.overrides)
        prepare_data(cfg.data)
        loader = checkpoint_loader(cfg.data, meta, args.split, batch_size=32)
        batches = [b for b, _ in zip(loader, range(args.max_batches))]
    else:
        size = meta["image_size"]
        batches = [{"rgb": torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(i))} for i in range(2)]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    report = {
        "onnx": str(out),
        "opset": args.opset,
        "size_mb": out.stat().st_size / 2**20,
        **parity(model, session, batches),
        "atol": args.atol,
    }
    sidecar = {k: meta[k] for k in ("classes", "image_size", "mean", "std", "arch")}
    out.with_suffix(".json").write_text(
        json.dumps(
            {
                **sidecar,
                "input": "rgb: float32 N×3×H×W, normalized",
                "output": "logits: float32 N×classes",
                "parity": report,
            },
            indent=2,
        )
    )
    print(json.dumps(report, indent=2))
    if report["max_abs_diff"] > args.atol:
        out.rename(out.with_suffix(".onnx.rejected"))
        raise UserError(
            f"ONNX output differs from PyTorch by {report['max_abs_diff']:.2e} > atol {args.atol}; "
            f"the file was moved to {out.with_suffix('.onnx.rejected')} and must not be shipped"
        )
    print(
        f"wrote {out} ({report['size_mb']:.1f} MB, opset {args.opset}); onnxruntime matches PyTorch "
        f"(max |diff| {report['max_abs_diff']:.1e}, top-1 agreement {report['top1_agreement']:.3f})"
    )
    return report


if __name__ == "__main__":
    main()
