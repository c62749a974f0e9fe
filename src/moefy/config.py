"""The study config: its schema is the single source of keys, defaults, descriptions and names.

The Snakefile validates config.yaml with `validate`; step command-line flags and the config
reference in docs/configuration.md are generated from the same schema, so they cannot drift
apart. The names a split, router, penalty, task, device or precision can have (the schema's
`$defs`) are read here once; every other module takes them from this module.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cache
from importlib.resources import files
from typing import Any

import yaml

from moefy.errors import MoefyError

SCHEMA_PATH = files("moefy") / "schemas" / "config.schema.yaml"

# Config sections whose keys become a step's command-line flags.
STEP_SECTIONS = (
    "finetune", "activations", "split", "router", "evaluate", "train_moe", "recover", "upcycle", "usage", "merge", "compress",
)  # fmt: skip


@cache
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _names(definition: str) -> tuple[str, ...]:
    return tuple(schema()["$defs"][definition]["enum"])


SPLITS = _names("split")
ROUTERS = _names("router")
PENALTIES = _names("penalty")
TASKS = _names("task")
DEVICES = _names("device")
PRECISIONS = _names("precision")
RECOVERIES = _names("recovery")
CONVERTS = _names("convert")
ROUTINGS = _names("routing")
ALLOCATIONS = _names("allocation")
# What identifies one job of the ablation grid: its MLflow tags and the fields of its records.
ABLATION = ("penalty", "seed", "convert", "split", "num_experts", "shared_experts", "router", "recovery")


def _with_defaults(validator_class):
    """A validator that also fills in schema defaults (the jsonschema FAQ recipe)."""
    from jsonschema import validators

    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, subschema):
        if isinstance(instance, dict):
            for key, prop in properties.items():
                if "default" in prop:
                    instance.setdefault(key, copy.deepcopy(prop["default"]))
        yield from validate_properties(validator, properties, instance, subschema)

    return validators.extend(validator_class, {"properties": set_defaults})


def _describe(error) -> str:
    key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        return f"config key {key}: {error.message}; allowed keys: {', '.join(allowed)}"
    if error.validator == "enum":
        return f"config key {key}: {error.instance!r} is not allowed; choose one of {error.validator_value}"
    if error.validator == "oneOf" and key == "dataset":
        return "config key dataset: give exactly one of `path` (a local file) or `hub` (a Hugging Face dataset)"
    if error.validator == "minProperties" and key == "grid":
        return "config key grid: name at least one arm, e.g. grid: {moefication: {split: [kmeans], num_experts: [48], router: [mlp]}}"
    if error.validator == "anyOf":
        allowed = " or ".join(_alternative(option) for option in error.validator_value)
        message = f"{error.instance!r} is not allowed; use {allowed}"
    else:
        message = error.message
    hint = error.schema.get("description") if isinstance(error.schema, dict) else None
    # one line: folded YAML descriptions end in a newline
    return f"config key {key}: {message}" + (f" ({' '.join(hint.split())})" if hint else "")


def _alternative(option: dict[str, Any]) -> str:
    """One branch of an anyOf in words: jsonschema's own message names none of them."""
    if "const" in option:
        return repr(option["const"])
    words = f"a {option.get('type', 'value')}"
    if "minimum" in option:
        words += f" of at least {option['minimum']}"
    if "maximum" in option:
        words += f" of at most {option['maximum']}"
    return words


# Keys that were renamed, with their new names: an old config is refused with the new name rather
# than read with the schema's "unexpected key" alone. `*` stands for any name (a grid arm).
RENAMED = {
    ("selector",): "router",
    ("grid", "*", "selector"): "grid.<arm>.router",
    ("compute", "threads", "selector"): "compute.threads.router",
    ("cluster", "rules", "selector"): "cluster.rules.router",
    ("distill",): "distill_attention",
    ("compute", "threads", "distill"): "compute.threads.distill_attention",
    ("cluster", "rules", "distill"): "cluster.rules.distill_attention",
    ("cluster", "rules", "distil_merged"): "cluster.rules.distill_merged",
    ("train_moe", "balance_weight"): "train_moe.load_loss_weight",
}


def _found(node: Any, path: tuple[str, ...], prefix: str = "") -> Iterator[str]:
    """The dotted keys of `node` that `path` (with `*` for any name) matches."""
    if not path:
        yield prefix.rstrip(".")
        return
    if not isinstance(node, dict):
        return
    for key in sorted(node) if path[0] == "*" else [path[0]] if path[0] in node else []:
        yield from _found(node[key], path[1:], f"{prefix}{key}.")


def renamed_keys(config: dict[str, Any]) -> list[str]:
    """One message per renamed key `config` still uses, naming the new key."""
    return [f"config key {old} was renamed: write {new}" for path, new in RENAMED.items() for old in _found(config, path)]


def validate(config: dict[str, Any]) -> dict[str, Any]:
    """Check `config` against the schema and fill in defaults, in place; raise one clear MoefyError."""
    from jsonschema import Draft202012Validator

    renamed = renamed_keys(config)
    if renamed:
        raise MoefyError("invalid config: " + "; ".join(renamed))

    inherit_upcycle_defaults(config)
    validator = _with_defaults(Draft202012Validator)(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), str(e.absolute_path)))
    if errors:
        raise MoefyError("invalid config: " + "; ".join(_describe(e) for e in errors))
    impossible = impossible_settings(config)
    if impossible:
        raise MoefyError("invalid config: " + "; ".join(impossible))
    return config


def inherit_upcycle_defaults(config: dict[str, Any]) -> None:
    """Give each of upcycling.models the `upcycle` section's keys it does not set itself, before the
    schema's defaults fill the rest: the section is the models' defaults, as documented, and a key set
    there must not be silently replaced by the schema's default. Idempotent; malformed sections are
    left for the schema to name."""
    section = config.get("upcycle")
    upcycling = config.get("upcycling")
    models = upcycling.get("models") if isinstance(upcycling, dict) else None
    if not isinstance(section, dict) or not isinstance(models, dict):
        return
    for name, model in models.items():
        if isinstance(model, dict):
            models[name] = section | model


def impossible_settings(config: dict[str, Any]) -> list[str]:
    """Keys the schema allows one by one that cannot hold together, one message each: without this
    check a k above the experts was silently clipped to them, and too many merge groups failed
    the merge job after the upcycled model had trained. `config` is schema-valid, defaults filled."""
    problems = []
    models = config["upcycling"]["models"]
    for name, model in models.items():
        # expert_choice routes by capacity_factor; the other routings pick k experts per token
        if model["routing"] != "expert_choice" and model["k"] > model["experts"]:
            problems.append(
                f"config key upcycling.models.{name}.k: {model['k']} experts per token, but the model has "
                f"{model['experts']} (upcycling.models.{name}.experts); use k of at most {model['experts']}, or more experts"
            )
    for name in config["merging"]["models"]:
        experts = models[name]["experts"] if name in models else None  # an unknown name: moefy.workflow.study says so
        too_many = [groups for groups in config["merging"]["groups"] if experts is not None and groups > experts]
        if too_many:
            problems.append(
                f"config key merging.groups: {', '.join(map(str, too_many))} groups per layer, more than the {experts} "
                f"experts of upcycling.models.{name}, which merging.models merges; use groups of at most {experts}"
            )
    return problems


def _resolved(prop: dict[str, Any]) -> dict[str, Any]:
    """A property with its $ref merged in (the property's own keys win)."""
    if "$ref" not in prop:
        return prop
    target = schema()["$defs"][prop["$ref"].rsplit("/", 1)[-1]]
    return {**_resolved(target), **{k: v for k, v in prop.items() if k != "$ref"}}


def section_properties(section: str) -> dict[str, dict[str, Any]]:
    """The keys of one config section with their schema (refs resolved)."""
    return {key: _resolved(prop) for key, prop in _resolved(schema()["properties"][section])["properties"].items()}


def section_defaults(section: str) -> dict[str, Any]:
    return {key: copy.deepcopy(prop.get("default")) for key, prop in section_properties(section).items()}


def iter_keys(node: dict[str, Any] | None = None, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """Every documented key as (dotted key, default or None, description), schema order.

    Named entries (the arms of `grid`, the rules of `cluster.rules`) are documented once, as
    grid.<arm>.<key>: the placeholder is the name of their definition in the schema's $defs."""
    node = schema() if node is None else node
    for key, prop in node.get("properties", {}).items():
        name = f"{prefix}{key}"
        prop = _resolved(prop)
        children = prop.get("properties")
        default = prop.get("default") if not children else None
        yield name, default, " ".join(str(prop.get("description", "")).split())
        if children:
            yield from iter_keys(prop, prefix=f"{name}.")
        arm = prop.get("additionalProperties")
        if isinstance(arm, dict) and not _documented_as_section(arm):
            yield from iter_keys(_resolved(arm), prefix=f"{name}.<{arm['$ref'].rsplit('/', 1)[-1]}>.")


def _documented_as_section(prop: dict[str, Any]) -> bool:
    """Whether `prop` is a $ref that a top-level section also uses (its keys are listed there)."""
    return "$ref" in prop and any(p.get("$ref") == prop["$ref"] for p in schema()["properties"].values())


def markdown_table() -> str:
    """The config reference of docs/configuration.md; `python -m moefy.config` prints it."""
    rows = ["| key | default | what it does |", "|---|---|---|"]
    for key, default, description in iter_keys():
        shown = (
            "" if default is None else f"`{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}`"
        )
        rows.append(f"| `{key}` | {shown} | {description.replace('|', '/')} |")
    return "\n".join(rows)


def check_names(kind: str, value: str, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of the `allowed` names of `kind`, else a MoefyError listing them."""
    if value not in allowed:
        raise MoefyError(f"{kind} {value!r} is unknown; choose one of {', '.join(allowed)}")
    return value


if __name__ == "__main__":
    print(markdown_table())
