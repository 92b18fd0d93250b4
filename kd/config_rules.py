"""How kd/config.py's dataclasses are read and checked: `option` declares a field with its help and rule,
`check_fields` applies every rule, `coerce` the types; `read_config` reads YAML and overrides with the reader's
bounds (a "billion laughs" is refused), `build` makes the dataclasses with unknown keys refused. Also the
RandAugment string format, a config value that kd.data.augment reads."""

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
    """`value` checked against a type hint and returned as that type: ints are accepted for floats, and numeric
    strings like '3e-4' too; a list[float] has each entry coerced. Floats must be finite, ints fit in 64 bits,
    strings hold no NUL character. Other hints (unions of several types, dict) pass the value through."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                number = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
            except OverflowError:
                number = math.inf  # an int beyond the float range
            except ValueError:
                pass
        if number is not None:
            # once here for every float key, so no range check has to think of nan (which fails every comparison)
            # or inf (which passes every lower bound): both would only fail mid-training
            check(math.isfinite(number), key, "must be a finite number", value)
            return number
    elif hint is int:
        if is_int(value):
            check(-(2**63) <= value < 2**63, key, "must fit in 64 bits (torch and numpy take no larger)", value)
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            text = str(value)
            check("\0" not in text, key, "must not contain a NUL character (paths and names cannot)", value)
            return text
    elif hint is list or typing.get_origin(hint) is list:
        if isinstance(value, (list, tuple)):
            items = typing.get_args(hint)
            return [coerce(v, items[0], f"{key}[{i}]") for i, v in enumerate(value)] if items else list(value)
    else:
        return value
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(
        f"{key} must be {'null or ' if optional else ''}{name}, got {quote(value)} ({type(value).__name__})"
    )


def _too_many_values(value: Any, limit: int = MAX_VALUES) -> bool:
    """Whether `value` holds more than `limit` values once YAML aliases are expanded; stops counting at the limit.

    A YAML alias is a reference, so a 400-byte document of nested aliases loads in a blink but is billions of
    values to anything that walks it (a repr in an error message, a copy); a self-referencing one never ends.
    """
    pending, count = [value], 0
    while pending:
        node = pending.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(node, dict):
            pending.extend(node.keys())
            pending.extend(node.values())
        elif isinstance(node, (list, tuple)):
            pending.extend(node)
    return False


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, with what a YAML parser lets through that would be a traceback or a memory bomb refused.

    Raises yaml.YAMLError for text that is not YAML; ConfigError (naming `where`) for everything else.
    """
    try:
        value = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where} nests lists or mappings too deeply to read") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ConfigError(f"{where} holds a value Python cannot read: {e}") from None
    if _too_many_values(value):
        raise ConfigError(
            f"{where} expands to more than {MAX_VALUES} values (nested YAML anchors and aliases?); "
            "a config needs far fewer: write the values out"
        )
    return value


def option(default: Any, help: str, rule: str | Callable[[Any, str], Any] = "") -> Any:
    """A config field: its `default`, its one-line `help` (--print-config) and its `rule`, which `check_fields`
    applies and its error message states ("must be <rule>"): an interval ("[0, 1)", "a probability in [0, 1]"),
    a bound (">= 1", "> 0"), or choices ("error | skip", "max or min"); words after it explain it. A list's every
    entry must follow the rule; null passes where the type allows it. A mapping's rule is its type error's wording.
    A rule that is a function is called with the value and the key, and returns the value checked."""
    metadata = {"help": help, "rule": rule}
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


def check_fields(config: Any) -> None:
    """Coerce each field of a config dataclass to its type (kd.config_rules.coerce) and hold it to its rule."""
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
            nullable = type(None) in typing.get_args(hint) and "null" not in rule and not isinstance(value, list)
            text = f"{'in ' if rule[0] in '[(' else ''}{rule}{' or null' if nullable else ''}"
            check(
                all(_follows(v, rule) for v in (value if isinstance(value, list) else [value])),
                key,
                f"must be {text}",
                value,
            )


def _follows(value: Any, rule: str) -> bool:
    """Whether `value` follows `rule` (see `option`)."""
    if interval := re.search(r"([\[(])(\S+), (\S+?)([\])])", rule):
        opening, low, high, closing = interval[1], _number(interval[2]), _number(interval[3]), interval[4]
        return (low <= value if opening == "[" else low < value) and (value <= high if closing == "]" else value < high)
    if bound := re.match(r"(>=?) (\S+)", rule):
        return value >= _number(bound[2]) if bound[1] == ">=" else value > _number(bound[2])
    return value in re.split(r" \| | or ", re.sub(r" \(.*", "", rule))


def _number(text: str) -> float:
    base, _, power = text.partition("**")  # a bound such as 2**32
    return float(base) ** float(power or 1)


def build(cls: type, raw: Any, prefix: str, replaced: dict) -> Any:
    """The dataclass `cls` from `raw`, a mapping from YAML, its sections built likewise; an unknown key is refused
    with the closest known one, a key in `replaced` ({"section.key": (soft loss, argument)}) with its new spelling."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix[:-1] or 'the config'} must be a mapping of keys to values, got {quote(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if where in replaced:
            loss, argument = replaced[where]
            raise ConfigError(
                f"{where} was replaced by distillation.soft_loss_args: {{{argument}: {quote(value)}}} (an argument "
                f"of soft_loss {loss}); write it there and remove {key}"
            )
        if key not in names:
            close = difflib.get_close_matches(str(key)[:QUOTE_LIMIT], names, n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else f" Valid keys: {', '.join(names)}."
            raise ConfigError(f"unknown config key {quote(where)}.{hint}")
        if dataclasses.is_dataclass(hints[key]):
            value = build(hints[key], {} if value is None else value, where + ".", replaced)
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
        for key, value in values.items() if isinstance(values, dict) else [("", values)]:
            name = f"{part}/{key}" if key else part
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def to_dict(config: Any) -> dict:
    """The resolved config as plain data, ready for YAML (saved beside every run)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
