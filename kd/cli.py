"""The scripts' command line: `--config FILE [section.key=value ...]`, the sections each script reads, and
`--print-config`. The training scripts use `parse_cli`; evaluate.py and export.py, with parsers of their own,
`add_config_arguments` and `resolve_config`."""

import argparse
import dataclasses
import math
import sys
import typing
from typing import Any

import yaml

from kd.config import Config, ConfigError, load_config, to_dict

READS = {  # the config sections each script reads, besides the top-level keys of the training scripts
    "train_teacher.py": ("data", "model", "train"),
    "distill.py": ("data", "distillation"),
    "evaluate.py": ("data",),
    "export.py": ("data",),
}


def training_section(script: str) -> str | None:
    """The section `script` trains with (each holds every key of training); None for evaluate.py and export.py."""
    return next((s for s in READS[script] if s in ("train", "distillation")), None)


def top_level(script: str) -> tuple[str, ...]:
    return ("name", "seed") if training_section(script) else ()


def sections() -> dict[str, type]:
    """{"data": DataConfig, ...}"""
    return {name: hint for name, hint in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(hint)}


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}


def check_overrides(script: str, overrides: list[str]) -> None:
    """Refuse an override of a section `script` does not read: it would change nothing. A config *file*'s other
    sections are fine: one file serves several scripts (configs/b0.yaml: distill.py, evaluate.py, export.py)."""
    reads, own = READS[script], training_section(script)
    for text in overrides:
        key, _, value = text.partition("=")
        section, _, name = key.strip().partition(".")
        if section not in sections() or section in reads:
            continue  # read, or unknown: load_config names the closest key
        message = f"{script} reads {', '.join(f'{s}.*' for s in reads)}, not {section}.*"
        if own and name.split(".")[0] in {f.name for f in dataclasses.fields(sections()[own])}:
            message += f": use {own}.{name}={value}"
        else:
            message += f" ({section}.* is {' and '.join(s for s, r in READS.items() if section in r)}'s)"
        raise ConfigError(message)


def _line(key: str, value: Any, comment: str) -> str:
    # one line per key, so that its comment can follow: lists and mappings in flow style ([a, b], {k: v})
    text = yaml.safe_dump({key: value}, default_flow_style=True, width=math.inf, sort_keys=False).strip()[1:-1]
    return f"{text}  # {comment}"


def config_yaml(config: Config, script: str) -> str:
    """The sections `script` reads as YAML, each key with its help: a valid config file."""
    values, top, classes = to_dict(config), field_help(Config), sections()
    lines = [f"# {script}'s resolved config (defaults, then the --config file, then overrides); the keys it reads"]
    for key in (*top_level(script), *READS[script]):
        if key not in classes:
            lines.append(_line(key, values[key], top[key]))
            continue
        lines.append(f"{key}:  # {top[key]}")
        comments = field_help(classes[key])
        lines += [f"  {_line(name, value, comments[name])}" for name, value in values[key].items()]
    return "\n".join(lines) + "\n"


def sections_help(script: str) -> str:
    """The --help epilog: the sections `script` reads, and where to see every key."""
    top, reads = field_help(Config), READS[script]
    rows = [("name, seed", "the run's name (runs/<name>) and seed")] if top_level(script) else []
    rows += [(f"{s}.*", top[s]) for s in reads]
    others = [f"{s}:" for s in sections() if s not in reads]
    return "\n".join(
        [
            "config sections it reads (set a key with section.key=value, or in the --config file):",
            *(f"  {name:<16}{meaning}" for name, meaning in rows),
            f"A config file's other sections ({', '.join(others)}) are other scripts' and are not read; "
            "overriding them is an error.",
            f"Every key with its value and meaning: python {script} [--config FILE] --print-config",
        ]
    )


def add_config_arguments(parser: argparse.ArgumentParser, script: str) -> None:
    """`--print-config`, and the sections `script` reads in the --help epilog."""
    parser.epilog = sections_help(script)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file and overrides) with each key's meaning as YAML, and exit",
    )


def resolve_config(script: str, path: str | None, overrides: list[str], print_config: bool = False) -> Config:
    """The validated config of `path` with `overrides`; `print_config`: print it and exit with status 0, as --help."""
    check_overrides(script, overrides)
    config = load_config(path, overrides)
    if print_config:
        sys.stdout.write(config_yaml(config, script))
        sys.exit(0)
    return config


def parse_cli(
    argv: list[str] | None, script: str, description: str, list_layers: bool = False, cache_teacher: bool = False
) -> tuple[Config, argparse.Namespace]:
    """`--config C [--resume] [--print-config] [section.key=value ...]` -> (validated Config, parsed arguments)."""
    own = training_section(script)
    parser = argparse.ArgumentParser(prog=script, description=description)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from <run_dir>/last")
    add_config_arguments(parser, script)
    if list_layers:
        parser.add_argument(
            "--list-layers", action="store_true", help="print hookable layers with shapes, suggest pairs, exit"
        )
    if cache_teacher:
        parser.add_argument(
            "--cache-teacher",
            action="store_true",
            help="run the teacher(s) once over every epoch's training views, store top-k logits in "
            "distillation.teacher_cache, exit",
        )
    parser.add_argument("overrides", nargs="*", help=f"section.key=value, e.g. {own}.max_epochs=3")
    args = parser.parse_intermixed_args(argv)
    return resolve_config(script, args.config, args.overrides, args.print_config), args
