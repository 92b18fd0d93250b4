"""Is INT8 faster than fp32 here? Every export format of a student at deployment size, timed in one run.

python benchmarks/int8_latency.py                                   # efficientnet_b0, 224 px, random weights
python benchmarks/int8_latency.py --arch mobilenetv3_large_100 --image-size 224 --no-tflite --out results/int8.json

Latency does not depend on the weights, so the student is a randomly initialized timm model saved as a kd
checkpoint in a temporary folder; export.py then writes and times every format (INT8 files are kept whatever their
agreement: random weights make near-ties, so agreement means nothing here; measure it on a trained student with
export.py --config). Formats take turns over the timed rounds, so a burst of load hits them alike.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing kd

import export  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from kd.data.dataset import InputSpec  # noqa: E402
from kd.errors import exit_on_user_error  # noqa: E402
from kd.models.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402
from kd.models.timm_models import create_timm  # noqa: E402


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="efficientnet_b0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=5)
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--no-tflite", action="store_true", help="skip TFLite (without `make export-deps`)")
    parser.add_argument("--out", help="also write the report here (JSON)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = create_timm(args.arch, args.num_classes)
    arch, classes = (
        {"name": args.arch, "num_classes": args.num_classes},
        [f"class_{i}" for i in range(args.num_classes)],
    )
    meta = CheckpointMeta(arch, classes, InputSpec(args.image_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(Path(tmp) / "checkpoint" / "student", model, meta)  # not beside the exports
        report = export.main(
            ["--checkpoint", str(checkpoint), "--out", str(Path(tmp) / "student.onnx"), "--int8"]
            + ([] if args.no_tflite else ["--tflite"])
            + ["--min-agreement", "0", "--reject-agreement", "0", "--latency-runs", str(args.latency_runs)]
        )
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
