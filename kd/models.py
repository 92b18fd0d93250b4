"""Models: timm networks by name, the RGB+MS HybridFusion teacher, and safetensors + JSON checkpoints (no pickle)."""

import json
import math
import os
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
import torch.nn.functional as F
from torch import nn

from kd.errors import UserError, quote
from kd.qat import RANGE_PREFIX

CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".ckpt", ".pt", ".pth")


OFFLINE_HINT = (
    "\nOffline? Put timm's weights in the Hugging Face cache (HF_HOME) while online, point the pretrained key at a "
    "local weights file, or set it to null to start from random weights."
)


def create_timm(name: str, num_classes: int, pretrained: str | None = None, **kwargs: Any) -> nn.Module:
    """A timm model; `pretrained` is None/"none" (random), "imagenet" (cache, or hub when online) or a weights file."""
    base = name.split(".")[0]  # "efficientnet_b0.ra_in1k" names a pretrained tag of efficientnet_b0
    if base not in timm.list_models():
        close = timm.list_models(f"*{base[:6]}*")[:8]
        raise UserError(f"'{name}' is not a timm model name. Similar names: {', '.join(close) or 'none'}")
    if pretrained in (None, "", "none", "null"):
        return _timm_model(name, num_classes=num_classes, **kwargs)
    if pretrained != "imagenet":
        model = _timm_model(name, num_classes=num_classes, **kwargs)
        load_foreign_weights(model, pretrained)
        return model
    local, remote = pretrained_location(name)
    if local:  # read straight from the file: even a cached download would first ask the hub for a newer one
        kwargs["pretrained_cfg_overlay"] = {"file": local}
    elif remote and not reachable(remote):  # fail now, not after a minute of the hub client's retries
        raise UserError(
            f"could not load pretrained weights 'imagenet' for {name}: they are not in the local cache and {remote} "
            f"cannot be reached (no network, or HF_HUB_OFFLINE=1).{OFFLINE_HINT}"
        )
    try:
        return _timm_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"could not load pretrained weights '{pretrained}' for {name}: {e}{OFFLINE_HINT}") from None


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


class Classifier(nn.Module):
    """Plain supervised training (teachers, baseline students): cross-entropy on the labels."""

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, batch: dict) -> dict:
        logits = forward_batch(self.model, batch)
        hard = F.cross_entropy(logits.float(), batch["label"], label_smoothing=self.label_smoothing)
        return {"loss": hard, "hard": hard, "logits": logits}

    def predict(self, batch: dict) -> torch.Tensor:
        return forward_batch(self.model, batch)

    def set_model(self, model: nn.Module) -> None:
        """Swap in a graph that shares the parameters (quantization-aware training)."""
        self.model = model


# --------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_stem(path: str | Path) -> Path:
    """'runs/x/best', 'runs/x/best.safetensors', 'runs/x/best.ckpt' -> Path('runs/x/best'); a folder -> folder/best."""
    path = Path(path)
    if path.is_dir():
        return path / "best"
    return path.with_suffix("") if path.suffix in CHECKPOINT_SUFFIXES else path


def ensure_writable(run_dir: str | Path) -> None:
    """Create `run_dir` and write a probe file there, so a run that could not save fails before it trains."""
    run_dir = Path(run_dir)
    probe = run_dir / f".write-probe-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"cannot write to the run directory {run_dir} ({e.strerror or e}); point checkpoint_dir at a folder "
            "you can write to"
        ) from None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)  # a kill mid-write leaves the old file, never a half-written one
    except (OSError, safetensors.SafetensorError) as e:  # safetensors wraps its I/O errors (disk full...)
        raise UserError(f"could not write {path} ({e}); the previous {path.name}, if any, is kept") from None
    finally:
        tmp.unlink(missing_ok=True)  # what a failed write left; nothing after the replace


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict, extra: dict | None = None) -> Path:
    """Write <stem>.safetensors (weights) and <stem>.json (architecture, classes, input size, normalization...).
    `extra` tensors (a QAT run's learned ranges, under "qat.") are stored beside the weights."""
    stem = checkpoint_stem(path)
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in {**model.state_dict(), **(extra or {})}.items()}
    _atomic_write(stem.with_suffix(".safetensors"), lambda p: safetensors.torch.save_file(weights, str(p)))
    _atomic_write(stem.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=2)))
    return stem.with_suffix(".safetensors")


def read_meta(path: str | Path) -> dict:
    """The metadata <stem>.json beside <stem>.safetensors, checked: one error lists everything wrong with it."""
    meta_path, meta, problems = _read_sidecar(path)
    _refuse(meta_path, problems)
    return meta


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model from <stem>.json and load <stem>.safetensors into it (strict). Returns (model, meta)."""
    meta_path, meta, problems = _read_sidecar(path)
    model = None
    if isinstance(meta, dict) and not _arch_problems(meta.get("arch")):  # the model builder has its own say
        try:
            model = build_model(meta["arch"])
        except UserError as e:  # an unknown timm name or argument
            problems.append(f"arch: {e}")
    _refuse(meta_path, problems)
    stem = checkpoint_stem(path)
    try:
        weights = safetensors.torch.load_file(str(stem.with_suffix(".safetensors")))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        message = f"cannot read weights {stem}.safetensors ({e}); the file is damaged or not safetensors"
        raise UserError(message) from None
    misfit = f"weights in {stem}.safetensors do not fit architecture {meta['arch']} from {stem}.json"
    weights = {k: v for k, v in weights.items() if not k.startswith(RANGE_PREFIX)}  # see checkpoint_ranges
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # same names, other shapes: another width, class count or band count
        raise UserError(f"{misfit}: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise UserError(f"{misfit}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model, meta


def _read_sidecar(path: str | Path) -> tuple[Path, Any, list[str]]:
    """(the .json path, its parsed content, what is wrong with it)."""
    stem = checkpoint_stem(path)
    meta_path = stem.with_suffix(".json")
    if not stem.with_suffix(".safetensors").is_file() or not meta_path.is_file():
        hint = ""
        if Path(path).suffix in (".ckpt", ".pt", ".pth"):
            hint = (
                f" kd reads {Path(path).suffix} paths as their <stem>.safetensors + <stem>.json pair and found neither."
            )
        raise UserError(
            f"checkpoint {path} not found: expected {stem}.safetensors and {stem}.json.{hint} "
            "Train one first, e.g. `python train_teacher.py --config configs/teacher.yaml`."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not JSON, or not text at all
        raise UserError(f"checkpoint metadata {meta_path} is not valid JSON ({e}); the file is damaged") from None
    return meta_path, meta, meta_problems(meta)


def _refuse(meta_path: Path, problems: list[str]) -> None:
    if problems:
        listing = "".join(f"\n  - {p}" for p in problems)
        raise UserError(
            f"{meta_path} is not a kd checkpoint's metadata as kd writes it:{listing}\n"
            "Fix these keys, restore the .json the run wrote beside the .safetensors, or retrain the model."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value: Any, count: int | None = None, positive: bool = False) -> bool:
    """A non-empty list of finite numbers (`count` of them; all > 0 when `positive`)."""
    if not isinstance(value, list) or not value or len(value) != (count or len(value)):
        return False
    finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    return finite and (not positive or min(value) > 0)


def _class_names(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(c, str) for c in value)
        and len(set(value)) == len(value)
    )


# What each key of a checkpoint's metadata must hold: (test, what to write in the message).
META_KEYS = {
    "classes": (_class_names, "a list of distinct class names (strings)"),
    "inputs": (lambda v: v in (["rgb"], ["rgb", "ms"]), '["rgb"], or ["rgb", "ms"] for the hybrid model'),
    "image_size": (lambda v: _is_int(v) and v > 0, "a positive integer (pixels)"),
    "mean": (lambda v: _numbers(v, 3), "3 numbers (R, G, B)"),
    "std": (lambda v: _numbers(v, 3, positive=True), "3 positive numbers (R, G, B)"),
    "ms_mean": (_numbers, "a list of numbers, one per MS band"),
    "ms_std": (lambda v: _numbers(v, positive=True), "a list of positive numbers, one per MS band"),
    "ms_bands": (
        lambda v: isinstance(v, list) and all(_is_int(b) or isinstance(b, str) for b in v),
        "a list of band indices or names",
    ),
}
FUSIONS = ("concat", "add", "attention")


def meta_problems(meta: Any) -> list[str]:
    """Everything missing or malformed in a checkpoint's metadata, one phrase each; [] when it is usable.
    Keys kd does not read (epoch, metrics, teachers...) are left alone."""
    if not isinstance(meta, dict):
        return [f"it holds a JSON {type(meta).__name__}, not an object with arch, classes, inputs, image_size..."]
    required = ["arch", "classes", "inputs", "image_size", "mean", "std"]
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
        problems += _arch_problems(arch, len(classes) if _class_names(classes) else None)
        reads = list(HybridFusion.input_keys if isinstance(arch, dict) and arch.get("name") == "hybrid" else ["rgb"])
        if meta.get("inputs") in (["rgb"], ["rgb", "ms"]) and meta["inputs"] != reads:
            problems.append(f"inputs are {meta['inputs']}, but the {quote(arch.get('name'))} model reads {reads}")
    return problems


HYBRID_ARGS = {  # what each HybridFusion argument a checkpoint sets must be (every argument but the built-in two)
    "backbone": (lambda v: isinstance(v, str) and v, "a timm model name"),
    "ms_backbone": (lambda v: isinstance(v, str), 'a timm model name, or "" for the RGB backbone'),
    "ms_channels": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "fusion": (lambda v: v in FUSIONS, " or ".join(FUSIONS)),
    "drop_rate": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "in [0, 1)"),
}


def _arch_problems(arch: Any, num_classes: int | None = None) -> list[str]:
    """What is wrong with an architecture spec, as far as can be told without building the model."""
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


def checkpoint_ranges(path: str | Path) -> dict[str, torch.Tensor]:
    """The INT8 ranges a QAT run learned (kd/qat.py `range_state`), stored in its checkpoints; {} without QAT."""
    read_meta(path)  # a missing or foreign checkpoint: the message that says so
    with safetensors.safe_open(str(checkpoint_stem(path).with_suffix(".safetensors")), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(RANGE_PREFIX)}


def check_ms_bands(meta: dict | None, dataset: Any) -> None:
    """Refuse MS stacks whose band count differs from the one the checkpoint's model was trained on."""
    if meta is None or "ms" not in meta["inputs"] or "ms_channels" not in meta.get("arch", {}):
        return
    bands, expected = dataset.read(0)[1].shape[0], meta["arch"]["ms_channels"]
    if bands != expected:
        raise UserError(
            f"the multispectral stacks have {bands} bands (e.g. {dataset.ms_files[dataset.samples[0][0]]}, after "
            f"data.ms_bands), but the teacher was trained on {expected}: use data with the teacher's bands, or "
            "train a teacher on these"
        )
