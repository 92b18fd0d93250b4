"""The timm format: a folder as timm's save_for_hf writes it and the Hugging Face Hub holds timm models, which
timm.create_model("local-dir:<folder>", pretrained=True) loads with its classes, input size and normalization."""

from pathlib import Path

import timm
from torch import nn

from kd.errors import UserError, quote
from kd.models.checkpoint import CheckpointMeta


def timm_settings(meta: CheckpointMeta) -> dict:
    """The keyword arguments of timm's save_for_hf and push_to_hf_hub that carry what the checkpoint records beside
    the weights: class names (label_names), input size and normalization (pretrained_cfg). kd's loaders resize the
    whole image to the square input, bilinear, without cropping: so crop_pct 1.0 and bilinear interpolation."""
    spec = meta.input_spec
    size = spec.image_size
    data = {"input_size": (3, size, size), "mean": tuple(spec.mean), "std": tuple(spec.std)}
    data |= {"interpolation": "bilinear", "crop_pct": 1.0}
    return {"model_config": {"label_names": list(meta.classes)}, "data_config": data}


def require_timm_model(model: nn.Module, meta: CheckpointMeta) -> None:
    """timm rebuilds a model from its name and arguments: only a model timm built can be saved its way."""
    if not isinstance(getattr(model, "pretrained_cfg", None), dict):
        name = (meta.arch or {}).get("name", type(model).__name__)
        raise UserError(
            f"the timm format (and --push-to-hub) holds timm models, and {quote(name)} is not one: export a student "
            "trained with a timm model name, or use --formats onnx torchscript"
        )


def save_timm_folder(model: nn.Module, meta: CheckpointMeta, path: Path) -> Path:
    """config.json (architecture, its arguments, num_classes, label_names, pretrained_cfg with the input size and
    normalization) and model.safetensors in the folder `path`."""
    require_timm_model(model, meta)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; the timm format writes a folder there: move the file or change --out")
    timm.models.save_for_hf(model.eval(), str(path), safe_serialization=True, **timm_settings(meta))
    return path


def push_timm(model: nn.Module, meta: CheckpointMeta, repo_id: str) -> str:
    """Upload the model as write_timm saves it (with a generated model card) to the Hugging Face Hub; its URL."""
    require_timm_model(model, meta)
    try:
        commit = timm.models.push_to_hf_hub(model.eval(), repo_id, safe_serialization=True, **timm_settings(meta))
    except Exception as e:  # the hub client raises its HTTP library's errors, not OSError: report any failed push
        raise UserError(
            f"could not push to the Hugging Face Hub repository {quote(repo_id)} ({type(e).__name__}: {e}); the local "
            "files are written. Check the network and the token (`hf auth login`, or HF_TOKEN)"
        ) from None
    return str(getattr(commit, "commit_url", commit))


def load_timm_folder(path: Path) -> nn.Module:
    """The folder loaded by timm alone, as a user would: timm.create_model("local-dir:<folder>", pretrained=True)."""
    return timm.create_model(f"local-dir:{path}", pretrained=True).eval()
