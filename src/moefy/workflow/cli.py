"""Step command lines: one parser for the flags steps share, flags generated from a config section,
and the user-error boundary.

Every flag that means the same thing in several steps (--model, --task, --penalty, --seed, --convert, --split,
--num-experts, --shared-experts, --router, --recovery, --device, --out) is defined once here, with its names from the schema, so
`python -m moefy.steps.<step> --help` reads the same in every step. A rule passes
`settings_flags(config[section])`; the step parses them back with `add_section_flags(parser,
section)`. Key `max_length` is flag `--max-length`, so a step run by hand takes the same flags
that Snakemake gives it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moefy.config import ABLATION, CONVERTS, DEVICES, PENALTIES, RECOVERIES, ROUTERS, SPLITS, TASKS, section_properties
from moefy.errors import MoefyError

_TYPES = {"integer": int, "number": float, "string": str}

# The flags several steps take, each defined once.
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "model": dict(
        required=True,
        help="model folder: the fine-tuned model (finetune/<variant>/model), or for finetune the pretrained model (hub id or folder)",
    ),
    "task": dict(choices=TASKS, default="classification", help="the task the model is trained and measured on"),
    "penalty": dict(choices=PENALTIES, default="none", help="the fine-tuning variant's activation-sparsity penalty"),
    "seed": dict(type=int, default=0, help="replicate seed (for data: the seed of the train/validation/test subsets)"),
    "convert": dict(
        choices=CONVERTS,
        default="ffn",
        help="what the conversion turns into experts: ffn, or ffn+attention (--model is then a distilled model, step distill)",
    ),
    "split": dict(choices=SPLITS, required=True, help="how the FFN neurons were grouped into experts"),
    "num_experts": dict(type=int, required=True, help="experts per FFN layer, shared ones included"),
    "shared_experts": dict(
        type=int, default=0, help="of them, the always-on experts of the neurons firing on most tokens (0: every expert routed)"
    ),
    "router": dict(choices=ROUTERS, required=True, help="the router that picks experts per token"),
    "recovery": dict(
        choices=RECOVERIES, default="none", help="none: the conversion as converted; task or kd: after recovery training"
    ),
    "device": dict(choices=DEVICES, default="auto", help="auto: CUDA when available, else CPU"),
}


# The flags that place a conversion in the grid (its variant, and split, experts and router).
CONVERSION_FLAGS = ("penalty", "seed", "convert", "split", "num_experts", "shared_experts", "router")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def step_parser(
    step: str, doc: str, *shared: str, out: str = "output folder", optional: tuple[str, ...] = ()
) -> argparse.ArgumentParser:
    """The parser of `python -m moefy.steps.<step>`: --out, plus the named SHARED_FLAGS (those in
    `optional` not required, for a step that needs them in one mode only)."""
    parser = argparse.ArgumentParser(prog=f"python -m moefy.steps.{step}", description=doc.strip().splitlines()[0])
    for name in shared:
        spec = SHARED_FLAGS[name] | ({"required": False} if name in optional else {})
        parser.add_argument(_flag(name), dest=name, **spec)
    parser.add_argument("--out", required=True, type=Path, help=out)
    return parser


def ablation(args: argparse.Namespace) -> dict[str, Any]:
    """The job's place in the grid (those of penalty, seed, split, num_experts, router it has)."""
    return {name: getattr(args, name) for name in ABLATION if getattr(args, name, None) is not None}


def _scalar_type(prop: dict[str, Any]):
    kinds = prop.get("type", "string")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        if kind in _TYPES:
            return _TYPES[kind]
    return str


def _number_or_words(prop: dict[str, Any]):
    """The flag type of a key that takes a number or one of a few words (`sparsity_weight: auto`,
    schema `anyOf: [{type: number}, {const: auto}]`): the word as given, else the number, else an
    argparse error naming both."""
    alternatives = prop["anyOf"]
    words = [w for alt in alternatives for w in ([alt["const"]] if "const" in alt else alt.get("enum", []))]
    number = next((_TYPES[alt["type"]] for alt in alternatives if alt.get("type") in ("integer", "number")), float)

    def parse(text: str):
        if text in words:
            return text
        try:
            return number(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor {' / '.join(map(str, words))}") from None

    parse.__name__ = f"number or {' / '.join(map(str, words))}"  # argparse's error names the type
    return parse


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
        elif "anyOf" in prop:
            kw["type"] = _number_or_words(prop)
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
