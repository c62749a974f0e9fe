"""Step command lines: flags generated from a config section, and the user-error boundary.

A rule passes `settings_flags(config[section])`; the step parses them back with
`add_section_flags(parser, section)`. Key `max_length` is flag `--max-length`, so a step run by
hand takes the same flags that Snakemake gives it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, Callable

from moefy.config import section_properties
from moefy.errors import MoefyError

_TYPES = {"integer": int, "number": float, "string": str}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _scalar_type(prop: dict[str, Any]):
    kinds = prop.get("type", "string")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        if kind in _TYPES:
            return _TYPES[kind]
    return str


def add_section_flags(parser: argparse.ArgumentParser, section: str) -> None:
    """Add one flag per key of config section `section`, with the schema's default and description."""
    group = parser.add_argument_group(f"{section} settings (config section `{section}`)")
    for key, prop in section_properties(section).items():
        kw: dict[str, Any] = {"dest": key, "default": prop.get("default"), "help": prop.get("description")}
        kinds = prop.get("type")
        if kinds == "boolean":
            kw["action"] = argparse.BooleanOptionalAction
        elif kinds == "array" or (isinstance(kinds, list) and "array" in kinds):
            kw.update(nargs="*", type=_scalar_type(prop.get("items", {})))
        elif "enum" in prop:
            kw["choices"] = prop["enum"]
        else:
            kw["type"] = _scalar_type(prop)
        group.add_argument(_flag(key), **kw)


def settings_flags(settings: dict[str, Any]) -> str:
    """Render a config section as shell-quoted flags (None values are left to the step's default)."""
    parts: list[str] = []
    for key, value in settings.items():
        if value is None:
            continue
        if isinstance(value, bool):
            parts.append(_flag(key) if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts += [_flag(key), *(shlex.quote(str(v)) for v in value)]
        else:
            parts += [_flag(key), shlex.quote(str(value))]
    return " ".join(parts)


def run_step(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Run a step's main; a MoefyError becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except MoefyError as err:
        prog = getattr(main, "__module__", "moefy")
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
