"""README's "Your own images" section, run as written on a tiny folder of JPEGs: the three commands of its bash block
(teacher -> distil with unlabelled photos -> evaluate) from a clone's root, each with only overrides appended that make
it small (a tiny timm model, 32 px, 1 epoch) and evaluate.py's measurements short. `python` is this interpreter."""

import json
import random
import re
import shlex

from PIL import Image, ImageDraw
from test_end_to_end import ROOT, run

SECTION = "## Your own images"
CLASSES = {"healthy": (60, 150, 60), "rust": (170, 90, 30), "mildew": (215, 215, 200)}
MEASURE_LESS = ["--latency-runs", "2", "--warmup", "1", "--throughput-batch", "4", "--memory", "weights"]  # speed only


def section_text() -> str:
    readme = (ROOT / "README.md").read_text()
    assert SECTION in readme, f"README.md has no {SECTION!r} section"
    return readme.split(SECTION, 1)[1].split("\n## ", 1)[0]


def section_commands() -> list[list[str]]:
    """The bash block's commands, one argv each (backslash continuations joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", section_text(), flags=re.S)
    assert len(blocks) == 1, "the section should hold exactly one bash block"
    lines = blocks[0].replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if shlex.split(line, comments=True)]


def argument(command: list[str], key: str) -> str:
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"{key}=")]
    assert len(values) == 1, f"{key}= should be given once in {command}"
    return values[0]


def write_jpeg(path, colour, rng: random.Random) -> None:
    """A 48 px photo-like JPEG: the class's colour, jittered, under a few random spots and lines."""
    base = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    image = Image.new("RGB", (48, 48), base)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x, y, r = rng.randint(0, 47), rng.randint(0, 47), rng.randint(2, 7)
        spot = tuple(rng.randint(0, 255) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=spot)
    draw.line((0, rng.randint(0, 47), 47, rng.randint(0, 47)), fill=(20, 60, 20), width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=90)


def test_section_names_the_folder_the_demo_switch_and_the_unlabelled_photos():
    text = section_text()
    assert "data.demo=false" in text or "demo: false" in text
    assert "data.unlabeled_root" in text and "data.manifest" in text and "docs/data.md" in text
    for config in set(re.findall(r"configs/own/\w+\.yaml", text)):
        assert "demo: false" in (ROOT / config).read_text(), config  # a missing folder is an error, not a demo set


def test_the_readme_commands_run_as_written_on_a_folder_of_jpegs(tmp_path):
    teacher, student, evaluate = section_commands()
    assert [c[:2] for c in (teacher, student, evaluate)] == [
        ["python", "train_teacher.py"],
        ["python", "distill.py"],
        ["python", "evaluate.py"],
    ]
    for name in ("train_teacher.py", "distill.py", "evaluate.py", "configs"):  # the commands run from a clone's root
        (tmp_path / name).symlink_to(ROOT / name)
    rng = random.Random(0)
    root, unlabeled = tmp_path / argument(teacher, "data.root"), tmp_path / argument(student, "data.unlabeled_root")
    for name, colour in CLASSES.items():
        for i in range(8):
            write_jpeg(root / name / f"IMG_{i:04d}.jpg", colour, rng)
    for i, colour in enumerate(list(CLASSES.values()) * 2):
        write_jpeg(unlabeled / f"field_{i}.jpg", colour, rng)

    data = ["data.image_size=32", "data.num_workers=0"]  # run() runs sys.executable on each command minus `python`
    run(
        *teacher[1:],
        *data,
        *["model.name=test_efficientnet", "model.pretrained=null"],
        *["train.max_epochs=1", "train.warmup_epochs=0", "train.batch_size=8"],
        cwd=tmp_path,
    )
    distilled = run(
        *student[1:],
        *data,
        *["distillation.student_backbone=test_efficientnet", "distillation.student_pretrained=null"],
        *["distillation.max_epochs=1", "distillation.warmup_epochs=0", "distillation.batch_size=8"],
        cwd=tmp_path,
    )
    assert "6 unlabelled" in distilled.stdout  # the photos of data.unlabeled_root were trained on
    run(*evaluate[1:], "data.num_workers=0", *MEASURE_LESS, cwd=tmp_path)

    assert (root / "splits.json").is_file()  # the folder of classes was split once
    models = dict(arg.split("=", 1) for arg in evaluate[evaluate.index("--models") + 1 :] if "=" in arg)
    for path in models.values():
        assert (tmp_path / path).is_file() and (tmp_path / path).with_suffix(".json").is_file()
    out = tmp_path / evaluate[evaluate.index("--out") + 1]
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == set(models) == {"teacher", "student"}
    table = (out / "results.md").read_text()
    assert all(f"| {name}" in table for name in models)
