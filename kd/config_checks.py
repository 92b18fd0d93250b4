"""Config rules that a range or choices cannot state (the RandAugment string, lists, teachers, names, fields that
must agree) and those that ask timm or Accelerate, imported inside their checks so that kd.config imports fast."""

import collections
import importlib.util
import inspect
import math
import re
import typing
from dataclasses import dataclass
from typing import Any

from kd.config_rules import ConfigError, check, coerce, did_you_mean, is_int
from kd.errors import quote

RANDAUGMENT_OPS = 15  # timm's increasing-magnitude RandAugment ops (kd.data.augment.OPS)
RANDAUGMENT_EXAMPLE = "rand-m9-n2 (or rand-m9-n2-mstd0.5)"


@dataclass(frozen=True)
class RandAugmentSpec:
    """A timm RandAugment string: `num_ops` ops a sample, each with `prob` at `magnitude` (0-10) + N(0, mstd)."""

    magnitude: float = 9.0
    num_ops: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0


def parse_randaugment(text: str) -> RandAugmentSpec | None:
    """ "rand-m9-n2-mstd0.5" -> RandAugmentSpec; "" -> None (off). ValueError says what is wrong."""
    if not text:
        return None
    head, *sections = text.split("-")
    if head != "rand":
        raise ValueError(f"must start with 'rand', as timm's strings do: {RANDAUGMENT_EXAMPLE}")
    names = {"m": "magnitude", "n": "num_ops", "p": "prob", "mstd": "magnitude_std"}
    values: dict = {}
    for section in sections:
        match = re.fullmatch(r"(mstd|inc|m|n|p)(\d+(?:\.\d*)?)", section)
        if not match:
            raise ValueError(
                f"has a section {section!r} kd does not read; it reads m, n, p, mstd and inc1: {RANDAUGMENT_EXAMPLE}"
            )
        key, number = match[1], float(match[2])
        if key == "inc":  # kd's ops are always timm's increasing ones
            if number != 1:
                raise ValueError("inc0 is not offered: kd uses timm's increasing-magnitude ops (inc1); drop -inc0")
            continue
        values[names[key]] = int(number) if key == "n" else number
    spec = RandAugmentSpec(**values)
    if not (0 <= spec.magnitude <= 10 and 1 <= spec.num_ops <= RANDAUGMENT_OPS and 0 <= spec.prob <= 1):
        raise ValueError(f"needs m in [0, 10], n in [1, {RANDAUGMENT_OPS}], p in [0, 1]: {RANDAUGMENT_EXAMPLE}")
    return spec


def band_list(bands: list, key: str) -> list:
    for i, band in enumerate(bands):
        ok = isinstance(band, str) or is_int(band)
        check(ok, f"{key}[{i}]", "must be a band index or a band name from bands.json", band)
    return bands


def randaugment_text(text: str, key: str) -> str:
    try:
        parse_randaugment(text)
    except ValueError as e:
        raise ConfigError(f"{key} {quote(text)} {e}") from None
    return text


def plain_name(name: str, key: str) -> str:
    ok = name not in ("", ".", "..") and not set("/\\") & set(name)
    check(ok, key, "must be a plain name, without / or \\ (TensorBoard makes it a folder under <run_dir>/tb)", name)
    check(len(name) <= 64, key, "must be at most 64 characters", name)
    return name


def layer_pairs(layers: list, key: str) -> list:
    """Layer names or [student, teacher] pairs, each layer once a side: the hooks hold one output per layer."""
    for i, entry in enumerate(layers):
        pair = isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
        ok = isinstance(entry, str) or pair
        check(ok, f"{key}[{i}]", "must be a layer name or a [student, teacher] pair of names", entry)
    pairs = [(e, e) if isinstance(e, str) else tuple(e) for e in layers]
    for side, names in (("student", [s for s, _ in pairs]), ("teacher", [t for _, t in pairs])):
        twice = sorted(name for name, count in collections.Counter(names).items() if count > 1)
        check(not twice, key, f"must name each {side} layer once", twice)
    return layers


def teacher_list(teachers: list, key: str) -> list:
    for i, t in enumerate(teachers):
        where = f"{key}[{i}]"
        if not (isinstance(t, dict) and "checkpoint" in t and set(t) <= {"checkpoint", "weight"}):
            raise ConfigError(f"{where} must look like {{checkpoint: path, weight: 1.0}}, got {quote(t)}")
        t["checkpoint"] = coerce(t["checkpoint"], str, f"{where}.checkpoint")
        if "weight" in t:
            t["weight"] = coerce(t["weight"], float, f"{where}.weight")
            check(t["weight"] > 0, f"{where}.weight", "must be > 0", t["weight"])
    return teachers


def check_teacher_weights(cfg: Any) -> None:
    """The EMA teacher needs an EMA; the weights normalized as kd.distill.teachers does (the EMA teacher's too) are
    finite and sum to one: 1e308 + 1e308 overflows the sum to inf and every normalized weight to 0."""
    if cfg.ema_teacher_weight > 0 and cfg.ema_decay == 0:
        raise ConfigError("distillation.ema_teacher_weight > 0 needs an EMA: set distillation.ema_decay, e.g. 0.999")
    weights, keys = [t.get("weight", 1.0) for t in cfg.teachers] or [1.0], "distillation.teachers[*].weight"
    if cfg.ema_teacher_weight > 0:
        weights, keys = [*weights, cfg.ema_teacher_weight], f"{keys} and distillation.ema_teacher_weight"
    total = sum(weights)
    normalized = [w / total for w in weights] if math.isfinite(total) and total > 0 else [math.nan]
    ok = all(math.isfinite(w) for w in normalized) and abs(sum(normalized) - 1) <= 1e-6
    why = "(their sum overflows or vanishes): use weights like 1 or 0.5"
    check(ok, keys, f"must normalize to finite weights that sum to 1 {why}", weights)


def check_qat(cfg: Any, key: str) -> None:
    """Quantization-aware training refuses the EMA and bf16; `key`: the section's prefix, e.g. "train."."""
    if cfg.qat_start_fraction is not None and cfg.ema_decay > 0:
        raise ConfigError(
            f"{key}qat_start_fraction and ema_decay cannot be combined: the EMA would average float "
            "weights into a fake-quantized graph. Turn one of them off."
        )
    # fp16 is not refused here: without a CUDA GPU the loop trains fp16 configs in fp32, which QAT takes
    if cfg.qat_start_fraction is not None and cfg.mixed_precision == "bf16":
        raise ConfigError(
            f"{key}qat_start_fraction cannot train under precision {quote(cfg.precision)}: PyTorch's fake "
            "quantization takes float32 only (the run would crash when QAT starts). Set precision: no."
        )


def check_qat_depth(qat_start_fraction: float | None, drop_path_rate: float, key: str) -> None:
    """QAT exports the student's graph in train mode, so stochastic depth would stay on in eval: refused."""
    if qat_start_fraction is not None and drop_path_rate > 0:
        raise ConfigError(
            f"{key} > 0 cannot be combined with qat_start_fraction: the QAT graph keeps stochastic depth on in "
            f"eval and the INT8 model would drop blocks at random. Set {key}=0."
        )


def check_log_with(log_with: Any, key: str) -> Any:
    """Names only: whether a tracker is installed is checked when a run starts, so evaluate.py reads any config."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    ok = isinstance(log_with, str) or (isinstance(log_with, list) and all(isinstance(n, str) for n in log_with))
    check(ok, key, "must be a tracker name or a list of them, e.g. [tensorboard, wandb]", log_with)
    names = [log_with] if isinstance(log_with, str) else log_with
    known = [*LOGGER_TYPE_TO_CLASS]  # Accelerate's trackers (and any registered with register_tracker_class)
    for name in names:
        if name not in (*known, "all", "none"):
            raise ConfigError(
                f"{key}: Accelerate has no tracker {quote(name)}.{did_you_mean(name, [*known, 'all', 'none'])} "
                f"Its trackers: {', '.join(known)}; or all (every installed one), none"
            )
    check("none" not in names or len(names) == 1, key, "cannot list none beside trackers", log_with)
    return log_with


def tracker_names(log_with: str | list) -> list[str]:
    """`log_with` as a list of Accelerate tracker names: [] for "none", ["all"] for every installed tracker."""
    return [name for name in ([log_with] if isinstance(log_with, str) else log_with) if name != "none"]


def optimizer_arguments(cfg: Any) -> dict:
    """`optimizer_args` as the optimizer takes them: YAML has no tuples, so lists (betas) become tuples."""
    return {key: tuple(v) if isinstance(v, list) else v for key, v in cfg.optimizer_args.items()}


def _optimizer_argument(value: Any, parameter: inspect.Parameter, key: str) -> Any:
    """`value` as the optimizer's parameter takes it, judged by its default (few optimizers annotate their types;
    some default a float argument to an int 0)."""
    default, hint = parameter.default, parameter.annotation
    if value is None and (default is None or type(None) in typing.get_args(hint)):
        return None
    if isinstance(default, bool):
        return coerce(value, bool, key)
    if isinstance(default, (int, float)):
        return coerce(value, int if hint is int else float, key)
    if isinstance(default, tuple):  # betas
        ok = isinstance(value, (list, tuple)) and len(value) == len(default)
        check(ok, key, f"must list {len(default)} numbers, like its default {list(default)}", value)
        return [coerce(v, float, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def check_optimizer(cfg: Any, key: str) -> None:
    """The optimizer exists in timm, is first-order, and takes `optimizer_args`, tried on a throwaway parameter so
    that a value it refuses fails here, not after loading. `key`: the section's prefix, e.g. "train."."""
    import torch
    from timm.optim import create_optimizer_v2, get_optimizer_info, list_optimizers

    name, args = cfg.optimizer, cfg.optimizer_args
    if name not in list_optimizers():
        raise ConfigError(
            f"{key}optimizer: timm has no optimizer {quote(name)}.{did_you_mean(name, list_optimizers(), n=5)} "
            "All of them: python -c 'import timm.optim; print(timm.optim.list_optimizers())'"
        )
    info = get_optimizer_info(name)
    if info.second_order:
        raise ConfigError(
            f"{key}optimizer: {name} needs a second-order backward (create_graph=True), which the training loop does "
            "not run; choose a first-order optimizer such as adamw, sgd or lamb"
        )
    for argument, instead in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
        if argument in args:
            raise ConfigError(
                f"{key}optimizer_args.{argument}: set {instead} instead (the LR schedule and no-decay groups use it)"
            )
    if isinstance(info.opt_class, str):  # bitsandbytes and apex optimizers: imported (and CUDA needed) at the start
        package = info.opt_class.split(".")[0]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"{key}optimizer: {name} comes from the {package} package, which is not installed: install it (it "
                "needs a CUDA GPU) or choose another optimizer"
            )
        return
    parameters = inspect.signature(info.opt_class).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    arguments = [p for p in parameters if p not in ("self", "params", "lr", "weight_decay")]
    for argument, value in args.items():
        if argument not in arguments and not takes_any:
            raise ConfigError(
                f"{key}optimizer_args: {name} ({info.opt_class.__name__}) takes no argument {quote(argument)}."
                f"{did_you_mean(str(argument), arguments)} Its arguments: {', '.join(arguments)}"
            )
        if argument in parameters:
            args[argument] = _optimizer_argument(value, parameters[argument], f"{key}optimizer_args.{argument}")
    weight = torch.zeros(2, 2, requires_grad=True)
    try:
        create_optimizer_v2(
            [weight], name, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **optimizer_arguments(cfg)
        )
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"{key}optimizer_args: {name} refuses {quote(args)}: {e}") from None
