"""benchmarks/ensemble_accuracy.py, whose rows docs/results/real_field.md quotes: each member's top-1 and recall agree
with evaluate.py's for the same checkpoint, and the ensemble weighs its members as distill.py's teachers do."""

import json
import sys
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
from benchmarks import ensemble_accuracy  # noqa: E402
from kd.data.dataset import InputSpec, LeafDataset  # noqa: E402
from kd.models.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _model(path: Path, seed: int, classes: list[str]) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", num_classes=len(classes))
    with torch.no_grad():
        model.get_classifier().weight.mul_(20)  # clear logit gaps: no argmax ties
    arch = {"name": "test_efficientnet", "num_classes": len(classes)}
    return save_checkpoint(path, model, CheckpointMeta(arch, classes, InputSpec(32, MEAN, STD)))


def _ensemble(tiny_demo: Path, out: Path, *teachers: str) -> dict:
    torch.set_num_threads(1)
    data = [f"data.root={tiny_demo}", "data.demo=false", "data.num_workers=0"]
    argv = ["--config", str(ROOT / "configs/b0.yaml"), "--split", "val", "--out", str(out), *data, "--teachers"]
    sys_argv, sys.argv = sys.argv, ["ensemble_accuracy.py", *argv, *teachers]
    try:
        ensemble_accuracy.main()
    finally:
        sys.argv = sys_argv
    return {row["name"]: row for row in json.loads(out.read_text())["rows"]}


def test_members_match_evaluate_and_the_ensemble_follows_its_weights(tiny_demo, tmp_path):
    classes = LeafDataset(tiny_demo, "val").classes
    a, b = (str(_model(tmp_path / name / "best", seed, classes)) for name, seed in (("a", 1), ("b", 2)))
    data = [f"data.root={tiny_demo}", "data.demo=false", "data.num_workers=0", "--split", "val"]
    speed = ["--latency-runs", "1", "--warmup", "1", "--throughput-batch", "2", "--memory", "weights", "--threads", "1"]
    models = ["--models", f"a={a}", f"b={b}", "--out", str(tmp_path / "results")]
    rows = evaluate.main(["--config", str(ROOT / "configs/b0.yaml"), *data, *speed, *models])["models"]

    equal = _ensemble(tiny_demo, tmp_path / "equal.json", a, b)
    for path, name in ((a, "a"), (b, "b")):
        member = equal[f"{path} (weight 1)"]
        assert abs(member["top1"] - rows[name]["top1"]) < 1e-9
        assert member["recall"] == dict(zip(classes, rows[name]["per_class_accuracy"].values(), strict=True))
    assert rows["a"]["top1"] != rows["b"]["top1"]  # the members disagree, so the weights matter below

    # a member weighted a million times the other decides every argmax; weights are normalized, not summed raw
    for heavy, name in ((a, "a"), (b, "b")):
        light = b if heavy == a else a
        lopsided = _ensemble(tiny_demo, tmp_path / f"{name}.json", f"{heavy}:1000000", f"{light}:1")
        assert abs(lopsided["ensemble"]["top1"] - rows[name]["top1"]) < 1e-9
    same = _ensemble(tiny_demo, tmp_path / "same.json", a, f"{a}:3")  # one model averaged with itself is itself
    assert abs(same["ensemble"]["top1"] - rows["a"]["top1"]) < 1e-9
