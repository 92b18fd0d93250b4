"""The sha256 of the weights of fixed tiny runs of train_teacher.py and distill.py: a refactor that only moves code
must leave every line of this output unchanged.

python benchmarks/fingerprint.py            # prints one line per run: its name and the sha256 of its weights
python benchmarks/fingerprint.py --threads 2  # the same at two threads: other hashes (summation order), repeatable

The runs cover the paths a move can break: a hybrid RGB+MS teacher, a plain timm model with RandAugment, Mixup and
EMA, and a student distilled from the teacher with feature matching and unlabelled images. CPU, fp32, one thread.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = ["data.image_size=32", "data.num_workers=0", "data.demo=false"]
RUNS = {
    "teacher": [
        "train_teacher.py",
        "configs/teacher.yaml",
        "model.backbone=test_efficientnet",
        "model.ms_backbone=test_resnet",
        "train.max_epochs=2",
        "train.warmup_epochs=0",
        "train.batch_size=8",
    ],
    "baseline": [
        "train_teacher.py",
        "configs/baseline_b0.yaml",
        "model.name=test_efficientnet",
        "train.max_epochs=2",
        "train.warmup_epochs=1",
        "train.batch_size=8",
        "data.randaugment=rand-m9-n2",
        "train.mixup_alpha=0.2",
        "train.ema_decay=0.9",
    ],
    "student": [
        "distill.py",
        "configs/b0.yaml",
        "distillation.teacher_checkpoint={work}/teacher/best.safetensors",
        "distillation.student_backbone=test_efficientnet",
        "distillation.student_pretrained=null",
        "distillation.feature_layers=[blocks.1, [blocks.3, rgb.blocks.4]]",
        "distillation.max_epochs=2",
        "distillation.warmup_epochs=0",
        "distillation.batch_size=8",
        "distillation.precision=null",
        "data.unlabeled_root={data}/unlabeled",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each run (default 1)")
    threads = parser.parse_args().threads

    from kd.data.demo import make_demo_dataset

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_demo_dataset(work / "data", seed=1, per_class=(8, 4, 4), size=32, unlabeled_per_class=2)
        for name, (script, config, *overrides) in RUNS.items():
            section = "distillation" if script == "distill.py" else "train"
            args = [
                f"--config={ROOT / config}",
                f"data.root={data}",
                *COMMON,
                f"{section}.checkpoint_dir={work / name}",
            ]
            args += [o.format(work=work, data=data) for o in overrides]
            proc = subprocess.run([sys.executable, str(ROOT / script), *args], env=env, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            for stem in ("best", "latest"):
                digest = hashlib.sha256((work / name / f"{stem}.safetensors").read_bytes()).hexdigest()
                print(f"{name}/{stem}: {digest}")


if __name__ == "__main__":
    main()
