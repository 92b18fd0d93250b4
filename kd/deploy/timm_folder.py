"""The timm format: a save_for_hf folder (as the Hugging Face Hub holds timm models) with its classes, input size and
normalization, that says only what is known of the student: config.json keeps nothing timm inherits from the
architecture's default weights and adds under "kd" how it was trained; README.md is its model card."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import timm
from huggingface_hub import HfApi
from torch import nn

import kd
from kd.errors import UserError, quote
from kd.models.checkpoint import CheckpointMeta, checkpoint_stem, read_meta

# The pretrained_cfg fields that describe this model and its preprocessing; any other (tag, license, paper_ids,
# notes, origin_url, hf_hub_id, test sizes...) is the architecture's default ImageNet weights', not the student's.
KEPT_PRETRAINED_CFG = (
    "custom_load", "input_size", "fixed_input_size", "min_input_size", "interpolation", "crop_pct", "crop_mode",
    "mean", "std", "num_classes", "pool_size", "first_conv", "classifier",
)  # fmt: skip
# The recipe values the model card lists (the whole section is in config.json under kd.recipe).
KEY_RECIPE = (
    "teacher_checkpoint", "temperature", "alpha", "feature_weight", "feature_matching", "max_epochs", "batch_size",
    "learning_rate", "weight_decay", "lr_scheduler", "warmup_epochs", "ema_decay", "qat_start_fraction",
)  # fmt: skip


@dataclass
class TimmCard:
    """What the folder says beside the weights (None: not known, not written)."""

    title: str = "kd student"
    license: str | None = None
    recipe: dict | None = None  # the run's config.yaml as a dict
    recipe_file: str | None = None
    results: list[str] = field(default_factory=list)  # markdown lines from evaluate.py's results.md
    results_file: str | None = None


def timm_settings(meta: CheckpointMeta) -> dict:
    """save_for_hf's arguments for the classes, input size and normalization. kd's loaders resize the whole image
    to the square input, bilinear, without cropping."""
    spec = meta.input_spec
    data = {"input_size": (3, spec.image_size, spec.image_size), "mean": tuple(spec.mean), "std": tuple(spec.std)}
    data |= {"interpolation": "bilinear", "crop_pct": 1.0}
    return {"model_config": {"label_names": list(meta.classes)}, "data_config": data}


def require_timm_model(model: nn.Module, meta: CheckpointMeta) -> None:
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        name = (meta.arch or {}).get("name", type(model).__name__)
        raise UserError(
            f"the timm format (and --push-to-hub) holds timm models, and {quote(name)} is not one: export a student "
            "trained with a timm model name, or use --formats onnx torchscript"
        )


def run_recipe(checkpoint: str | Path) -> tuple[dict | None, str | None]:
    """The config.yaml saved in the checkpoint's run folder, and its path."""
    from kd.config_rules import load_yaml  # the safe YAML reader; imported here, it is only needed for a card

    path = checkpoint_stem(checkpoint).parent / "config.yaml"
    if not path.is_file():
        return None, None
    try:
        recipe = load_yaml(path.read_text(), str(path))
    except Exception as e:  # a damaged config.yaml costs the card its recipe, not the export
        print(f"warning: {path} is not readable ({type(e).__name__}: {e}); the model card has no recipe")
        return None, None
    return (recipe, str(path)) if isinstance(recipe, dict) else (None, None)


def results_files(results: str | Path) -> tuple[Path, Path]:
    path = Path(results)
    folder = path if path.is_dir() else path.parent
    found = folder / "results.json", folder / "results.md"
    if path.is_file() and path.name not in ("results.json", "results.md"):
        found = path.with_suffix(".json"), path.with_suffix(".md")
    if missing := [str(p) for p in found if not p.is_file()]:
        raise UserError(
            f"--results {quote(str(results))}: {', '.join(missing)} not found; pass evaluate.py's --out folder "
            "(results.json and results.md), e.g. --results results"
        )
    return found


def same_model(path: str, checkpoint: str | Path) -> bool:
    try:
        return checkpoint_stem(Path(path)).resolve() == checkpoint_stem(Path(checkpoint)).resolve()
    except OSError:
        return False


def evaluated_rows(results: str | Path, checkpoint: str | Path) -> tuple[list[str], str]:
    """The lines of evaluate.py's results.md about `checkpoint` (its rows of every table, beside the teacher's),
    with the tables' titles and notes; and the results.json they came from."""
    json_path, md_path = results_files(results)
    try:
        data = json.loads(json_path.read_text())
        models, summary = data["models"], data["summary"]
        teacher = data.get("settings", {}).get("teacher")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"--results: {json_path} is not evaluate.py's results.json ({type(e).__name__}: {e})") from None
    names = [name for name, row in models.items() if same_model(str(row.get("path", "")), checkpoint)]
    if not names:
        evaluated = ", ".join(str(row.get("path")) for row in models.values())
        raise UserError(
            f"--results {quote(str(results))} holds no evaluation of {checkpoint} (it evaluated {evaluated}): "
            f"run evaluate.py on it (e.g. --models student={checkpoint}) or drop --results"
        )
    groups = [g for g, row in summary.items() if set(row.get("runs", [g])) & set(names)]
    shown = groups + ([teacher] if teacher in summary and teacher not in groups else [])

    def about(line: str) -> bool:
        first = line.strip("|").split("|")[0].strip()
        return any(first == g or first.startswith(f"{g} (") for g in shown)

    lines, in_body = [], False
    for line in md_path.read_text().splitlines():
        if line.startswith("- "):  # the derived comparison lines: about evaluate.py's roles, not this card
            continue
        if line.startswith("|---"):
            in_body = True
        elif not line.startswith("|"):
            in_body = False
        elif in_body and not about(line):
            continue
        lines.append(line)
    return lines, str(json_path)


def teacher_line(path: str) -> str:
    try:
        arch = read_meta(path).arch or {}
    except (UserError, OSError):
        return f"`{path}`"
    parts = [arch.get("name")] + [arch[k] for k in ("backbone", "ms_backbone") if arch.get(k)]
    return f"`{path}` ({', '.join(str(p) for p in parts if p)})"


def kd_record(meta: CheckpointMeta, card: TimmCard) -> dict:
    recipe = card.recipe or {}
    section = "distillation" if meta.teachers else "train"
    record = {"version": kd.__version__, "distilled": bool(meta.teachers), "teachers": list(meta.teachers)}
    record |= {"epoch": meta.epoch, "ema": meta.ema, "qat": meta.qat}
    # distill.py builds the student from its distillation section; train_teacher.py from model + train
    keys = ("name", "seed", section) if meta.teachers else ("name", "seed", "model", section)
    record["recipe"] = {k: recipe[k] for k in keys if k in recipe} or None
    record["data"] = recipe.get("data")
    return record


def initialization(meta: CheckpointMeta, recipe: dict) -> str:
    if not recipe:
        return "not recorded (no config.yaml beside the checkpoint)"
    section, key = ("distillation", "student_pretrained") if meta.teachers else ("model", "pretrained")
    weights = (recipe.get(section) or {}).get(key)
    if not weights:
        return "random weights"
    if weights == "imagenet":
        name = (meta.arch or {}).get("name")
        return f"timm's ImageNet weights for `{name}` (their terms may apply to this model too)"
    return f"the weights file `{weights}`"


def model_card(meta: CheckpointMeta, config: dict, card: TimmCard, params: int) -> str:
    """README.md: the model card, from what the checkpoint, its run and evaluate.py record and nothing else."""
    recipe = card.recipe or {}
    spec, arch = meta.input_spec, config["architecture"]
    header = ["---", "library_name: timm", "pipeline_tag: image-classification"]
    header += [f"license: {card.license}"] if card.license else []
    header += ["tags:", "- image-classification", "- timm"] + (["- knowledge-distillation"] if meta.teachers else [])
    lines = [*header, "---", "", f"# {card.title}", ""]
    how = "distilled with kd" if meta.teachers else "trained on labels with kd"
    lines += [f"An image classifier ({arch}, {params / 1e6:.2f}M parameters) {how} {kd.__version__}.", ""]

    lines += ["## Model", "", f"- Architecture: timm `{arch}`, {len(meta.classes)} classes"]
    lines += [
        f"- Classes (logit order): {', '.join(f'`{c}`' for c in meta.classes)}",
        f"- Input: RGB, the whole image resized (bilinear, no crop) to {spec.image_size}×{spec.image_size}, "
        f"scaled to [0, 1] and normalized with mean {list(spec.mean)}, std {list(spec.std)} (timm's data config "
        "from config.json does exactly this)",
        "- Output: logits, one per class",
        "",
    ]

    lines += ["## Training", ""]
    if meta.teachers:
        lines += ["Distilled from the teacher checkpoint(s), not published here:", ""]
        lines += [*(f"- {teacher_line(t)}" for t in meta.teachers), ""]
    else:
        lines += ["Trained on the labels alone: the checkpoint records no teacher.", ""]
    lines += [f"- Initialization: {initialization(meta, recipe)}"]
    section = recipe.get("distillation" if meta.teachers else "train") or {}
    if values := [f"{k}={section[k]}" for k in KEY_RECIPE if section.get(k) is not None]:
        lines += [f"- Recipe (the run's config.yaml): {', '.join(values)}"]
    if meta.epoch is not None:
        lines += [f"- Weights: epoch {meta.epoch}" + (", EMA" if meta.ema else "") + (", QAT" if meta.qat else "")]
    lines += ["- The full recipe is in config.json under `kd.recipe`.", ""]

    lines += ["## Results", ""]
    if card.results:
        while card.results and not card.results[-1].strip():
            card.results.pop()
        lines += ["From kd's evaluate.py (results.md):", "", *card.results, ""]
    else:
        lines += ["Not evaluated: no evaluate.py results were given to the export (export.py --results)."]
        if meta.metrics:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in meta.metrics.items())
            lines += [
                "",
                f"The checkpoint records its validation metrics from training ({shown}); the validation split "
                "chose this checkpoint, so they overstate what to expect on new images.",
            ]
        lines += [""]

    data = recipe.get("data") or {}
    if data.get("demo"):
        source = "kd's built-in synthetic demo images (not real photographs)."
    elif data.get("root"):
        source = f"The user's own images, from `{data['root']}` (not published here)."
    else:
        source = "Not recorded (no config.yaml beside the checkpoint)."
    licence = f"`{card.license}`" if card.license else "not stated"
    lines += ["## Data", "", source, "", f"Classes: {', '.join(meta.classes)}.", ""]
    lines += [
        "## Limitations",
        "",
        "- Trained on the data above only; it knows only these classes and has not been evaluated on other data "
        "(other sites, cameras, seasons, or conditions).",
        f"- Expects {spec.image_size}×{spec.image_size} inputs normalized as above; other preprocessing changes "
        "its predictions.",
        f"- Licence: {licence}.",
        "",
    ]
    where = f"hf-hub:{card.title}" if "/" in card.title else "local-dir:path/to/this/folder"
    return (
        "\n".join(lines)
        + f"""
## How to load

```python
import timm

model = timm.create_model("{where}", pretrained=True).eval()
config = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**config)
labels = model.pretrained_cfg['label_names']
```
"""
    )


def save_timm_folder(model: nn.Module, meta: CheckpointMeta, path: Path, card: TimmCard | None = None) -> Path:
    """config.json, model.safetensors and README.md (the model card) in the folder `path`."""
    require_timm_model(model, meta)
    card = card or TimmCard(title=path.name)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; the timm format writes a folder there: move the file or change --out")
    timm.models.save_for_hf(model.eval(), str(path), safe_serialization=True, **timm_settings(meta))
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    cfg = config["pretrained_cfg"]
    config["pretrained_cfg"] = {k: cfg[k] for k in KEPT_PRETRAINED_CFG if k in cfg}
    if card.license:
        config["pretrained_cfg"]["license"] = card.license
    config["kd"] = kd_record(meta, card)
    config_path.write_text(json.dumps(config, indent=2))
    params = sum(p.numel() for p in model.parameters())
    (path / "README.md").write_text(model_card(meta, config, card, params))
    return path


def push_timm(folder: Path, repo_id: str) -> str:
    """Upload the folder as save_timm_folder wrote it to the Hugging Face Hub; the commit's URL."""
    try:
        api = HfApi()
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", commit_message="kd export (timm format)"
        )
    except Exception as e:  # the hub client raises its HTTP library's errors, not OSError: report any failed push
        raise UserError(
            f"could not push to the Hugging Face Hub repository {quote(repo_id)} ({type(e).__name__}: {e}); the local "
            "files are written. Check the network and the token (`hf auth login`, or HF_TOKEN)"
        ) from None
    return str(getattr(commit, "commit_url", commit))
