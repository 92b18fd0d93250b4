"""What a checkpoint's metadata must hold, key by key: every problem is named before a model is built from it."""

import math
from pathlib import Path
from typing import Any

from kd.config import MAX_IMAGE_SIZE
from kd.errors import UserError, quote
from kd.models.hybrid import HYBRID_ARGS, HybridFusion

SCHEMA_VERSION = 1  # raise it when the layout changes in a way older kd cannot read


def refuse(path: str | Path, problems: list[str], exported: bool = False) -> None:
    if not problems:
        return
    listing = "".join(f"\n  - {p}" for p in problems)
    if exported:
        raise UserError(
            f"the metadata of {path} is not as export.py writes it:{listing}\n"
            "Fix its sidecar .json (or --meta file), or export the checkpoint again with export.py."
        )
    raise UserError(
        f"{path} is not a kd checkpoint's metadata as kd writes it:{listing}\n"
        "Fix these keys, restore the .json the run wrote beside the .safetensors, or retrain the model."
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any, count: int | None = None, positive: bool = False) -> bool:
    if not isinstance(value, list) or not value or len(value) != (count or len(value)):
        return False
    finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    return finite and (not positive or min(value) > 0)


def _class_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(c, str) for c in value) and 0 < len(set(value)) == len(value)


# What each key of a checkpoint's metadata must hold: (test, what to write in the message).
META_KEYS = {
    "schema_version": (
        lambda v: _is_int(v) and 0 < v <= SCHEMA_VERSION,
        f"a version this kd reads (1 to {SCHEMA_VERSION}; a newer kd wrote a larger one: update kd)",
    ),
    "classes": (_class_names, "a list of distinct class names (strings)"),
    "inputs": (lambda v: v in (["rgb"], ["rgb", "ms"]), '["rgb"], or ["rgb", "ms"] for the hybrid model'),
    "image_size": (
        lambda v: _is_int(v) and 0 < v <= MAX_IMAGE_SIZE,
        f"a positive integer (pixels), at most {MAX_IMAGE_SIZE}",
    ),
    "mean": (lambda v: _numbers(v, 3), "3 numbers (R, G, B)"),
    "std": (lambda v: _numbers(v, 3, positive=True), "3 positive numbers (R, G, B)"),
    "ms_mean": (_numbers, "a list of numbers, one per MS band"),
    "ms_std": (lambda v: _numbers(v, positive=True), "a list of positive numbers, one per MS band"),
    "ms_bands": (
        lambda v: isinstance(v, list) and all(_is_int(b) or isinstance(b, str) for b in v),
        "a list of band indices or names",
    ),
}


def meta_problems(meta: Any, exported: bool = False) -> list[str]:
    """One phrase per thing missing or malformed (`exported`: no arch needed); training records are left alone."""
    if not isinstance(meta, dict):
        return [f"it holds a JSON {type(meta).__name__}, not an object with arch, classes, inputs, image_size..."]
    required = ([] if exported else ["arch"]) + ["classes", "inputs", "image_size", "mean", "std"]
    required += ["ms_mean", "ms_std"] if isinstance(meta.get("inputs"), list) and "ms" in meta["inputs"] else []
    missing = [k for k in required if meta.get(k) is None]
    problems = [f"it lacks {', '.join(missing)}"] if missing else []
    problems += [
        f"{key} must be {expected}, got {quote(meta[key])}"
        for key, (ok, expected) in META_KEYS.items()
        if meta.get(key) is not None and not ok(meta[key])
    ]
    if _numbers(meta.get("ms_mean")) and _numbers(meta.get("ms_std")) and len(meta["ms_mean"]) != len(meta["ms_std"]):
        problems.append(
            f"ms_mean has {len(meta['ms_mean'])} values but ms_std {len(meta['ms_std'])}: one per band each"
        )
    arch, classes = meta.get("arch"), meta.get("classes")
    if arch is not None:
        problems += arch_problems(arch, len(classes) if _class_names(classes) else None)
        reads = list(HybridFusion.input_keys if isinstance(arch, dict) and arch.get("name") == "hybrid" else ["rgb"])
        if meta.get("inputs") in (["rgb"], ["rgb", "ms"]) and meta["inputs"] != reads:
            problems.append(f"inputs are {meta['inputs']}, but the {quote(arch.get('name'))} model reads {reads}")
    return problems


def arch_problems(arch: Any, num_classes: int | None = None) -> list[str]:
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str)):
        return [f'arch must be an object with a string "name" (a timm model or "hybrid"), got {quote(arch)}']
    problems = []
    if not (_is_int(arch.get("num_classes")) and arch["num_classes"] > 0):
        problems.append(f"arch.num_classes must be a positive integer, got {quote(arch.get('num_classes'))}")
    elif num_classes is not None and arch["num_classes"] != num_classes:
        problems.append(f"arch.num_classes is {arch['num_classes']}, but classes has {num_classes} names")
    if arch["name"] == "hybrid":  # timm models' arguments are checked by building them (load_checkpoint)
        accepted = list(HYBRID_ARGS)
        unknown = [k for k in arch if k not in ("name", "num_classes", *accepted)]
        if unknown:
            problems.append(f"arch has arguments HybridFusion does not take: {quote(unknown)} (it takes {accepted})")
        problems += [
            f"arch.{key} must be {expected}, got {quote(arch[key])}"
            for key, (ok, expected) in HYBRID_ARGS.items()
            if key in arch and not ok(arch[key])
        ]
    return problems
