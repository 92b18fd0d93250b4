"""How kd/config.py's dataclasses are read and checked: `option` declares a field with its help and rule,
`check_fields` applies the rules, `read_config` reads bounded YAML and overrides, `build` refuses unknown keys."""

import copy
import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from kd.errors import QUOTE_LIMIT, UserError, quote

MAX_VALUES = 10_000  # values a config may hold with YAML aliases expanded: a "billion laughs" is refused, not built


class ConfigError(UserError):
    """The config file or a command-line override is invalid."""


def check(ok: bool, key: str, rule: str, value: Any) -> None:
    """The one shape of a config error: `<key> <rule>, got <value>`."""
    if not ok:
        raise ConfigError(f"{key} {rule}, got {quote(value)}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true/false are ints to Python


def did_you_mean(value: str, choices: list[str], n: int = 1) -> str:
    """' Did you mean 'x' or 'y'?' for the `n` closest of `choices`, or ''."""
    close = [repr(c) for c in difflib.get_close_matches(value[:QUOTE_LIMIT], choices, n=n)]
    if not close:
        return ""
    return f" Did you mean {' or '.join([', '.join(close[:-1]), close[-1]] if len(close) > 1 else close)}?"


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint`: ints and numeric strings ('3e-4') pass for floats, a list[float]'s entries are coerced.
    Floats must be finite, ints fit in 64 bits, strings hold no NUL. Other hints (unions, dict) pass it through."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    is_list = hint is list or typing.get_origin(hint) is list
    if hint not in (float, int, bool, str) and not is_list:
        return value
    scalar = isinstance(value, (int, float, str)) and not isinstance(value, bool)  # YAML's true/false are ints
    if hint is float and scalar:
        try:
            number = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
        except OverflowError:
            number = math.inf  # an int beyond the float range
        except ValueError:
            number = None
        if number is not None:
            # once here for every float key, so no range check has to think of nan (which fails every comparison)
            # or inf (which passes every lower bound): both would only fail mid-training
            check(math.isfinite(number), key, "must be a finite number", value)
            return number
    if hint is int and is_int(value):
        check(-(2**63) <= value < 2**63, key, "must fit in 64 bits (torch and numpy take no larger)", value)
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and scalar:
        check("\0" not in str(value), key, "must not contain a NUL character (paths and names cannot)", value)
        return str(value)
    if is_list and isinstance(value, (list, tuple)):
        items = typing.get_args(hint)
        return [coerce(v, items[0], f"{key}[{i}]") for i, v in enumerate(value)] if items else list(value)
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(
        f"{key} must be {'null or ' if optional else ''}{name}, got {quote(value)} ({type(value).__name__})"
    )


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load that refuses what would be a traceback or a memory bomb with a ConfigError naming `where`
    (text that is not YAML still raises yaml.YAMLError)."""
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where} nests lists or mappings too deeply to read") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ConfigError(f"{where} holds a value Python cannot read: {e}") from None
    # count the values with aliases expanded, no further than the bound: an alias is a reference, so a 400-byte
    # document of nested ones is billions of values to a repr or a copy, and a self-reference is endless
    pending, count = [value], 0
    while pending and count <= MAX_VALUES:
        node = pending.pop()
        count += 1
        if isinstance(node, dict):
            pending += [*node, *node.values()]
        elif isinstance(node, (list, tuple)):
            pending += node
    if count > MAX_VALUES:
        raise ConfigError(
            f"{where} expands to more than {MAX_VALUES} values (nested YAML anchors and aliases?); "
            "a config needs far fewer: write the values out"
        )
    return value


def option(default: Any, help: str, rule: str | Callable[[Any, str], Any] = "") -> Any:
    """A config field with its one-line `help` (--print-config) and its `rule`, stated by the error ("must be <rule>"):
    an interval ("[0, 1)"), a bound (">= 1") or choices ("error | skip", "max or min"), words after it explaining it,
    held by every entry of a list; a mapping's type-error wording; or a function (value, key) -> checked value."""
    metadata = {"help": help, "rule": rule}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


def check_fields(config: Any) -> None:
    """Coerce each field of a config dataclass to its type and hold it to its rule."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        hint, key, rule = hints[f.name], f"{config.SECTION}.{f.name}".lstrip("."), f.metadata.get("rule", "")
        value = getattr(config, f.name)
        if hint is dict:
            check(isinstance(value, dict), key, f"must be {rule}", value)
        if dataclasses.is_dataclass(hint) or hint is dict:
            continue
        value = coerce(value, hint, key)
        if callable(rule):
            value = rule(value, key)
        setattr(config, f.name, value)
        if value is not None and isinstance(rule, str) and rule:
            values = value if isinstance(value, list) else [value]
            nullable = type(None) in typing.get_args(hint) and "null" not in rule and not isinstance(value, list)
            text = f"{'in ' if rule[0] in '[(' else ''}{rule}{' or null' if nullable else ''}"
            check(all(_follows(v, rule) for v in values), key, f"must be {text}", value)


def _follows(value: Any, rule: str) -> bool:
    if interval := re.search(r"([\[(])(\S+), (\S+?)([\])])", rule):
        opening, low, high, closing = interval[1], _number(interval[2]), _number(interval[3]), interval[4]
        return (low <= value if opening == "[" else low < value) and (value <= high if closing == "]" else value < high)
    if bound := re.match(r"(>=?) (\S+)", rule):
        return value >= _number(bound[2]) if bound[1] == ">=" else value > _number(bound[2])
    return value in re.split(r" \| | or ", re.sub(r" \(.*", "", rule))


def _number(text: str) -> float:
    base, _, power = text.partition("**")  # a bound such as 2**32
    return float(base) ** float(power or 1)


# keys that set a soft loss's arguments before soft_loss_args did: {key: (the soft loss, its argument)}
REPLACED = {f"distillation.{k}": tuple(k.split("_")) for k in ("dkd_alpha", "dkd_beta", "dist_beta", "dist_gamma")}


def build(cls: type, raw: Any, prefix: str = "") -> Any:
    """The dataclass `cls` from the YAML mapping `raw`, sections likewise; an unknown key is refused with the closest
    known one, a key of REPLACED with its new spelling."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix[:-1] or 'the config'} must be a mapping of keys to values, got {quote(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if where in REPLACED:
            loss, argument = REPLACED[where]
            raise ConfigError(
                f"{where} was replaced by distillation.soft_loss_args: {{{argument}: {quote(value)}}} (an argument "
                f"of soft_loss {loss}); write it there and remove {key}"
            )
        if key not in names:
            close = difflib.get_close_matches(str(key)[:QUOTE_LIMIT], names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"unknown config key {quote(where)}.{hint}")
        if dataclasses.is_dataclass(hints[key]):
            value = build(hints[key], {} if value is None else value, where + ".")
        kwargs[key] = value
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'distillation.alpha=0.5' -> (['distillation', 'alpha'], 0.5); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {quote(text)} must look like section.key=value, e.g. train.max_epochs=3")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), load_yaml(value, f"override {quote(text)}") if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override {quote(text)}: the value is not valid YAML ({getattr(e, 'problem', e)}); put text in quotes"
        ) from None


def read_config(path: str | Path | None, overrides: tuple[str, ...] | list[str]) -> dict:
    """The YAML config at `path` (or {}) with the `section.key=value` overrides applied, as plain data."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist (configs live in configs/, e.g. configs/b0.yaml)")
        if path.is_dir():  # anything else that reads, a pipe such as --config <(...) included, is read once
            raise ConfigError(f"config file {path} is a folder; pass a YAML file, e.g. configs/b0.yaml")
        try:
            raw = load_yaml(path.read_text(), str(path)) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a mapping of sections to keys (data:, train:, ...), got {quote(raw)}")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            if node.get(k) is None:  # an absent or empty section
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {quote(text)}: {quote(k)} is a value, not a section")
            node = node[k]
        node[keys[-1]] = value
    return raw


def flat_hparams(config: Any) -> dict:
    """The config flattened to {"section/key": scalar} for TensorBoard's hparams view."""
    flat = {}
    for part, values in to_dict(config).items():
        flat.update({f"{part}/{k}": v for k, v in values.items()} if isinstance(values, dict) else {part: values})
    return {name: v if isinstance(v, (int, float, str, bool)) else str(v) for name, v in flat.items()}


def to_dict(config: Any) -> dict:
    """The resolved config as plain data, ready for YAML (saved beside every run)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
