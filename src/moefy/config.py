"""The study config: its schema is the single source of keys, defaults and descriptions.

The Snakefile validates config.yaml with `validate`; step command-line flags and the README's
config table are generated from the same schema, so the three cannot drift apart.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib.resources import files
from typing import Any, Iterator

import jsonschema
import yaml
from jsonschema import Draft202012Validator, validators

from moefy.errors import MoefyError

SCHEMA_PATH = files("moefy") / "schemas" / "config.schema.yaml"

# Config sections whose keys become a step's command-line flags.
STEP_SECTIONS = ("finetune", "activations", "split", "selector", "evaluate")


@cache
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(validator_class):
    """A validator that also fills in schema defaults (the jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for key, prop in properties.items():
                if "default" in prop:
                    instance.setdefault(key, copy.deepcopy(prop["default"]))
        yield from validate_properties(validator, properties, instance, subschema)

    return validators.extend(validator_class, {"properties": set_defaults})


def _describe(error: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return f"config key {key}: {error.message}; allowed keys: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"config key {key}: {error.instance!r} is not allowed; choose one of {error.validator_value}"
    if error.validator == "oneOf" and key == "dataset":
        return "config key dataset: give exactly one of `path` (a local file) or `hub` (a Hugging Face dataset)"
    hint = error.schema.get("description") if isinstance(error.schema, dict) else None
    return f"config key {key}: {error.message}" + (f" ({hint})" if hint else "")


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check `config` against the schema and fill in defaults, in place; raise one clear MoefyError."""
    validator = _with_defaults(Draft202012Validator)(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise MoefyError("invalid config: " + "; ".join(_describe(e) for e in errors))
    return config


def section_properties(section: str) -> dict[str, dict[str, Any]]:
    """The keys of one config section with their schema (refs resolved)."""
    defs = schema()["$defs"]
    props = {}
    for key, prop in schema()["properties"][section]["properties"].items():
        if "$ref" in prop:
            prop = {**defs[prop["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in prop.items() if k != "$ref"}}
        props[key] = prop
    return props


def section_defaults(section: str) -> dict[str, Any]:
    return {key: copy.deepcopy(prop.get("default")) for key, prop in section_properties(section).items()}


def iter_keys(node: dict[str, Any] | None = None, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """Every documented key as (dotted key, default or None, description), schema order."""
    node = schema() if node is None else node
    defs = schema()["$defs"]
    for key, prop in node.get("properties", {}).items():
        name = f"{prefix}{key}"
        if "$ref" in prop:
            prop = {**defs[prop["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in prop.items() if k != "$ref"}}
        children = prop.get("properties")
        default = prop.get("default") if not children else None
        yield name, default, " ".join(str(prop.get("description", "")).split())
        if children:
            yield from iter_keys(prop, prefix=f"{name}.")


def markdown_table() -> str:
    """The README's config reference; `python -m moefy.config` prints it."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    for key, default, description in iter_keys():
        shown = "" if default is None else f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`"
        rows.append(f"| `{key}` | {shown} | {description.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
