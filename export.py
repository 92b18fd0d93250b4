"""Export a student checkpoint for deployment, and prove every exported file agrees with PyTorch.

    python export.py --checkpoint checkpoints/student/best.safetensors --out exports/student.onnx \
        [--config configs/b0.yaml] [--int8] [--tflite] [--formats onnx torchscript ...] [--atol 1e-3]

Always writes <stem>.onnx (self-contained, dynamic batch) and <stem>.pt (fp32 TorchScript); --tflite adds
<stem>.tflite (litert-torch, `make export-deps`); --int8 adds every INT8 path: ONNX Runtime static QDQ and dynamic
(<stem>_int8_static.onnx, _int8_dynamic.onnx), PyTorch PT2E static (<stem>_int8_static.pt2, a torch.export program)
and dynamic (_int8_dynamic.pt), for a QAT checkpoint PyTorch INT8 with the ranges QAT learned (<stem>_int8_qat.pt2)
and, with --tflite, TFLite INT8 (<stem>_int8.tflite). Each file is run on validation images
(random inputs without --config) against the PyTorch model: max |logit difference|, top-1 agreement, accuracy,
size and batch-1 latency (all formats timed in turn, so machine load hits them alike), printed and written to
export_report.json. An fp32 file past --atol, or an INT8 file below --reject-agreement, is renamed *.rejected and
the command fails; an INT8 file between --reject-agreement and --min-agreement is kept but marked not recommended.
Classes, input size and normalization travel in the ONNX metadata and the sidecar <stem>.json. `--formats timm`
writes the folder <stem>_timm/ (config.json + model.safetensors, timm's save_for_hf layout) that
timm.create_model("local-dir:<stem>_timm", pretrained=True) loads with its classes, input size and normalization;
its config.json keeps none of the fields timm inherits from the architecture's default pretrained weights (tag,
licence...), states --license if given, and records under "kd" the teachers and the run's recipe; README.md in it is
the model card (with the rows of --results, evaluate.py's --out folder, for the checkpoint). --push-to-hub REPO_ID
writes it too and, once it matches PyTorch, uploads exactly that folder (timm students only, not the hybrid RGB+MS
teacher). An --out whose files would overwrite a kd checkpoint (--out
runs/x/best.onnx beside runs/x/best.safetensors: best.json), land in a run's resumable state or logs (runs/x/last/,
tb/) or overwrite a run's own file (config.yaml, .lock) is refused.
Each format's file ending, writer and runner are its row of FORMATS in kd/deploy/formats.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from kd.cli import add_config_arguments, resolve_config
from kd.config import Config
from kd.errors import UserError, exit_on_user_error, quote
from kd.train.run_dir import RUN_FILES, owned_by_a_run, require_writable_folder

# torch, ONNX, timm and the kd modules that use them are imported in the functions that run after the command line
# is parsed: --help, --print-config and a misspelled key answer in a fraction of a second, not seconds.
if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from kd.deploy.timm_folder import TimmCard
    from kd.models.checkpoint import CheckpointMeta


def int8_formats() -> list[str]:
    """The INT8 rows of FORMATS (read at call time: a row added to it is a format of every flag)."""
    from kd.deploy import formats as fmt

    return [name for name, f in fmt.FORMATS.items() if f.fp32]


def formats_to_write(args, ranges: dict) -> list[str]:
    """The formats the flags ask for, ONNX first: the ONNX Runtime quantizers start from it."""
    names = ["onnx", *args.formats] + (["tflite"] if args.tflite else []) + (["timm"] if args.push_to_hub else [])
    if args.int8:
        names += [
            n for n in int8_formats() if (n != "tflite-int8" or args.tflite) and (n != "torch-int8-qat" or ranges)
        ]
    if "torch-int8-qat" in names and not ranges:
        raise UserError(
            f"torch-int8-qat: {args.checkpoint} holds no QAT ranges (its epoch was not quantization-aware). Export "
            "a QAT run's latest.safetensors (its best epoch may precede QAT), distill with "
            "distillation.qat_start_fraction=0.8, or use torch-int8-static (post-training calibration)"
        )
    return list(dict.fromkeys(names))


def is_checkpoint_file(path: Path) -> bool:
    """A kd checkpoint's weights, or metadata that read_meta accepts (export.py's sidecars lack inputs)."""
    if path.suffix == ".safetensors":
        return path.exists()
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and {"arch", "classes", "inputs"} <= meta.keys()


def refuse_overwriting_a_checkpoint(args, names: list[str]) -> None:
    """No file the export writes (each format's, the sidecar <stem>.json, export_report.json) may be a checkpoint's,
    nor lie in a run's resumable state or logs, nor replace a run's own file (`owned_by_a_run`)."""
    from kd.deploy import formats as fmt
    from kd.models.checkpoint import checkpoint_stem

    out = Path(args.out)
    planned = [fmt.export_path(out, name) for name in names]
    planned += [out.with_suffix(".json"), out.parent / "export_report.json"]
    owned = next((found for path in planned if (found := owned_by_a_run(path))), None)
    if owned:
        how = "overwrite" if owned.name in RUN_FILES else "write into"
        raise UserError(
            f"--out {quote(args.out)} would {how} {owned}, which belongs to the run in {owned.parent}: export "
            f"elsewhere, e.g. --out {owned.parent / 'export' / out.with_suffix('.onnx').name}"
        )
    clash = next((path for path in planned if is_checkpoint_file(path)), None)
    if clash:
        whose = "the --checkpoint" if checkpoint_stem(clash) == checkpoint_stem(args.checkpoint) else "a kd checkpoint"
        raise UserError(
            f"--out {quote(args.out)} would overwrite {clash}, a file of {whose}: export elsewhere, e.g. "
            f"--out {out.parent / 'export' / out.with_suffix('.onnx').name}"
        )


def size_mb(path: Path) -> float:
    """A file's size, or a folder's (the timm format) over the files in it."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def check_repo_id(repo_id: str) -> None:
    """A malformed --push-to-hub is refused before minutes of exports, not after."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise UserError(f"--push-to-hub {quote(repo_id)} is not a Hub repository id ({e}): write user/name") from None


def check_images(args, meta: CheckpointMeta, cfg: Config) -> tuple[list[dict], list[torch.Tensor]]:
    """Batches the files are checked on (--split of --config's data, else random inputs) and calibration images."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from kd.data.loaders import prepare_data
    from kd.deploy.inference import checkpoint_loader

    if not args.config:
        size, generator = meta.input_spec.image_size, torch.Generator().manual_seed(0)
        batches = [{"rgb": torch.randn(8, 3, size, size, generator=generator)} for _ in range(2)]
        return batches, [torch.randn(8, 3, size, size, generator=generator) for _ in range(4)]
    prepare_data(cfg.data)
    batches = [b for b, _ in zip(checkpoint_loader(cfg.data, meta, args.split, 32), range(args.max_batches))]
    # A random sample of the training images: the loader lists them class by class, and ranges calibrated on
    # the first classes alone clip the others' activations.
    train = checkpoint_loader(cfg.data, meta, "train", 32)
    picked = torch.randperm(len(train.dataset), generator=torch.Generator().manual_seed(0))
    sample = Subset(train.dataset, picked[: args.calibration_images].tolist())
    return batches, [b["rgb"] for b in DataLoader(sample, batch_size=32, collate_fn=train.collate_fn)]


def compare(reference: np.ndarray, got: np.ndarray, labels: np.ndarray | None) -> dict:
    """Max |logit difference|, top-1 agreement and (with labels) accuracy of `got` against `reference` logits."""
    import numpy as np

    return {
        "max_abs_diff": float(np.abs(got - reference).max()),
        "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
        "samples": len(got),
        "accuracy": None if labels is None else float((got.argmax(1) == labels).mean()),
    }


def verdict(name: str, row: dict, args) -> str:
    """ok | not recommended | rejected. fp32 must match to --atol; INT8 is judged on top-1 agreement."""
    from kd.deploy import formats as fmt

    if fmt.FORMATS[name].fp32 is None:
        return "ok" if row["max_abs_diff"] <= args.atol else "rejected"
    if row["top1_agreement"] < args.reject_agreement:
        return "rejected"
    return "ok" if row["top1_agreement"] >= args.min_agreement else "not recommended"


def print_table(rows: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = ("format", "file", "MB", "latency (ms)", "x fp32", "accuracy", "agreement", "max |diff|", "status")
    table = Table(*columns, title=title)
    for name, r in rows.items():
        table.add_row(
            name,
            Path(r["file"]).name,
            f"{r['size_mb']:.2f}",
            f"{r['latency_ms']:.2f}",
            "-" if r["speedup_vs_fp32"] is None else f"{r['speedup_vs_fp32']:.2f}",
            "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
            f"{r['top1_agreement']:.3f}",
            f"{r['max_abs_diff']:.1e}",
            r["status"],
        )
    Console(width=max(140, Console().width)).print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="student checkpoint (.safetensors + .json); required")
    parser.add_argument("--out", default="exports/student.onnx", help="ONNX path; other files go beside it")
    parser.add_argument("--config", help="config whose data section gives validation images for the check")
    parser.add_argument("--split", default="val", help="split used for the parity and accuracy check")
    parser.add_argument(  # checked against FORMATS once parsed: kd/deploy/formats.py imports torch and ONNX
        "--formats",
        nargs="+",
        default=["onnx", "torchscript"],
        metavar="FORMAT",
        help="rows of FORMATS in kd/deploy/formats.py: onnx, torchscript, tflite, timm and their INT8 variants",
    )
    parser.add_argument("--int8", action="store_true", help="add every INT8 format (TFLite INT8 with --tflite)")
    parser.add_argument("--tflite", action="store_true", help="add TFLite (needs `make export-deps`)")
    parser.add_argument("--calibration-images", type=int, default=256, help="training images for INT8 ranges")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest allowed |logit difference| (fp32)")
    parser.add_argument("--min-agreement", type=float, default=0.9, help="INT8 top-1 agreement to recommend it")
    parser.add_argument("--reject-agreement", type=float, default=0.8, help="INT8 top-1 agreement below: rejected")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--max-batches", type=int, default=10, help="batches of 32 images used for the check")
    parser.add_argument("--latency-runs", type=int, default=50, help="timed batch-1 calls per format")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="write the timm folder and, once it matches PyTorch, upload it to the Hugging Face Hub as REPO_ID "
        "(user/name; needs a token: `hf auth login` or HF_TOKEN)",
    )
    parser.add_argument(
        "--license",
        help="licence of the timm folder and Hub repository (a Hub licence id, e.g. apache-2.0, cc-by-4.0); "
        "default: none is stated",
    )
    parser.add_argument(
        "--results",
        metavar="FOLDER",
        help="evaluate.py's --out folder (results.json + results.md) that evaluated --checkpoint: its rows go "
        "into the timm folder's model card (README.md); without it the card says 'not evaluated'",
    )
    add_config_arguments(parser, "export.py")
    parser.add_argument("overrides", nargs="*", help="data.key=value overrides of --config")
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    # checked (and printed) now, and read once: --config <(...) is a pipe, empty the second time
    cfg = resolve_config("export.py", args.config, args.overrides, args.print_config)
    from kd.deploy import formats as fmt

    if unknown := [name for name in args.formats if name not in fmt.FORMATS]:
        fp32_first = sorted(fmt.FORMATS, key=lambda name: fmt.FORMATS[name].fp32 is not None)
        choices = ", ".join(map(repr, fp32_first))
        parser.error(f"argument --formats: invalid choice: {unknown[0]!r} (choose from {choices})")
    if not args.checkpoint:
        parser.error("the following arguments are required: --checkpoint")
    if args.overrides and not args.config:
        raise UserError(
            f"{' '.join(args.overrides)}: overrides change --config's data section, and without --config the check "
            "runs on random inputs; pass --config (e.g. --config configs/b0.yaml) or drop the overrides"
        )
    if Path(args.out).is_dir():
        example = Path(args.out) / "student.onnx"
        raise UserError(f"--out {quote(args.out)} is a folder; --out names the ONNX file, e.g. {example}")
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)
    card_flags = [flag for flag, value in (("--license", args.license), ("--results", args.results)) if value]
    if card_flags and "timm" not in args.formats and not args.push_to_hub:
        raise UserError(f"{' and '.join(card_flags)} describe the timm folder: add --formats timm or --push-to-hub")
    return args, cfg


def load_student(args) -> tuple[nn.Module, CheckpointMeta, dict, list[str]]:
    """The checkpoint's model, metadata and QAT ranges, and the formats to write; every refusal that needs no
    export is made here, before minutes of exports."""
    from kd.deploy import formats as fmt
    from kd.deploy.timm_folder import require_timm_model
    from kd.models.checkpoint import checkpoint_ranges, load_checkpoint
    from kd.models.zoo import input_keys

    model, meta = load_checkpoint(args.checkpoint)  # first: a missing or damaged checkpoint is named as such
    ranges = checkpoint_ranges(args.checkpoint)
    names = formats_to_write(args, ranges)
    refuse_overwriting_a_checkpoint(args, names)
    require_writable_folder(Path(args.out).parent, "--out")
    if any(name.startswith("tflite") for name in names):
        fmt.require_litert()
    if input_keys(model) != ("rgb",):
        timm_too = " (and timm cannot rebuild kd's RGB+MS fusion model: no timm format)" if "timm" in names else ""
        raise UserError(
            f"{args.checkpoint} is a {meta.arch['name']} model with inputs {meta.inputs}; "
            f"export.py exports RGB students (distill.py or train_teacher.py with a timm model){timm_too}"
        )
    if "timm" in names:
        require_timm_model(model, meta)
    return model.eval(), meta, ranges, names


def timm_card(args, out: Path) -> TimmCard:
    """The timm folder's model card: the --license, the run's recipe, and --results' rows for the checkpoint."""
    from kd.deploy import formats as fmt
    from kd.deploy.timm_folder import TimmCard, evaluated_rows, run_recipe

    recipe, recipe_file = run_recipe(args.checkpoint)
    rows, results_file = evaluated_rows(args.results, args.checkpoint) if args.results else ([], None)
    title = args.push_to_hub or fmt.export_path(out, "timm").name
    return TimmCard(title, args.license, recipe, recipe_file, rows, results_file)


def check_formats(runners: dict, files: dict, batches: list[dict], args) -> tuple[dict, list[str]]:
    """Each file's report row (agreement with PyTorch, accuracy, size, latency, status) and what failed; a rejected
    file is renamed *.rejected."""
    from functools import partial

    import numpy as np
    import torch

    from kd.deploy import formats as fmt
    from kd.eval.measure import latency_ms

    images = torch.cat([b["rgb"] for b in batches])
    labels = torch.cat([b["label"] for b in batches]).numpy() if "label" in batches[0] else None
    reference = runners["pytorch"](images)
    rows = {name: {"file": str(files[name]), "size_mb": size_mb(files[name])} for name in files}
    for name, run in runners.items():
        rows[name] |= compare(reference, np.concatenate([run(b["rgb"]) for b in batches]), labels)
    calls = {name: partial(run, images[:1]) for name, run in runners.items()}
    for name, speed in latency_ms(calls, warmup=10, runs=args.latency_runs).items():
        rows[name]["latency_ms"] = speed["median"]
    failures = []
    for name, row in rows.items():
        fp32 = fmt.FORMATS[name].fp32 if name in fmt.FORMATS else None
        row["speedup_vs_fp32"] = rows[fp32]["latency_ms"] / row["latency_ms"] if fp32 in rows else None
        row["status"] = "ok" if name == "pytorch" else verdict(name, row, args)
        if row["status"] == "rejected":
            rejected = Path(row["file"] + ".rejected")
            Path(row["file"]).rename(rejected)
            row["file"] = str(rejected)
            failures.append(
                f"{name}: max |diff| {row['max_abs_diff']:.2e}, top-1 agreement "
                f"{row['top1_agreement']:.3f}; moved to {rejected}, do not ship it"
            )
    return rows, failures


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(argv)
    import torch

    from kd.deploy import formats as fmt
    from kd.deploy.timm_folder import push_timm

    out = Path(args.out)
    model, meta, ranges, names = load_student(args)
    card = timm_card(args, out) if "timm" in names else None  # a wrong --results is refused before the exports
    batches, calibration = check_images(args, meta, cfg)

    files = {"pytorch": Path(args.checkpoint).with_suffix(".safetensors")}
    runners = {"pytorch": fmt.torch_runner(model)}
    inputs = fmt.ExportInputs(model, meta, calibration, out, ranges, args.opset, card)
    for name in names:
        print(f"writing {name} ...", flush=True)
        files[name] = fmt.FORMATS[name].write(inputs, fmt.export_path(out, name))
        runners[name] = fmt.FORMATS[name].runner(files[name])
    rows, failures = check_formats(runners, files, batches, args)

    report = {
        "checkpoint": args.checkpoint,
        "opset": args.opset,
        "threads": torch.get_num_threads(),
        "split": args.split if args.config else "random inputs",
        "calibration_images": sum(len(c) for c in calibration),
        "thresholds": {"atol": args.atol, "min_agreement": args.min_agreement, "reject": args.reject_agreement},
        "formats": rows,
    }
    sidecar = meta.to_json(exported=True)
    sidecar.update(input="rgb: float32 N×3×H×W, normalized", output="logits: float32 N×classes")
    out.with_suffix(".json").write_text(json.dumps({**sidecar, "export": report}, indent=2))
    (out.parent / "export_report.json").write_text(json.dumps(report, indent=2))
    images = sum(len(b["rgb"]) for b in batches)
    print_table(
        rows,
        f"export check on {report['split']} ({images} images), batch-1 latency on CPU, {report['threads']} "
        "threads; x fp32 = the same runtime's fp32 latency / this one",
    )
    if failures:
        raise UserError("exported model(s) do not match PyTorch:\n  " + "\n  ".join(failures))
    weak = [n for n, r in rows.items() if r["status"] == "not recommended"]
    if weak:
        print(f"not recommended: {', '.join(weak)} (top-1 agreement below --min-agreement {args.min_agreement})")
    print(f"wrote {len(names)} files beside {out} and {out.parent / 'export_report.json'}; all match PyTorch")
    if args.push_to_hub:
        print(f"pushing {files['timm']} to the Hugging Face Hub as {args.push_to_hub} ...", flush=True)
        report["hub"] = push_timm(files["timm"], args.push_to_hub)
        print(f"pushed: {report['hub']}")
    return report


if __name__ == "__main__":
    main()
