"""Loading and saving the Hugging Face models a study works on, with errors a user can act on."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from moefy.errors import MoefyError
from moefy.ffn import family

hf_logging.disable_progress_bar()  # a bar per load/save would drown the steps' own progress in the logs


def _load(what: str, name_or_path: str, loader):
    try:
        return loader()
    except (OSError, ValueError, SafetensorError) as err:
        where = "local folder" if Path(name_or_path).exists() else "hub id or local folder"
        raise MoefyError(
            f"cannot load the {what} from {name_or_path!r} ({where}): {str(err).splitlines()[0]}. "
            "If it is a workflow output (results/<study>/finetune/model), it is damaged: delete it and rerun "
            "snakemake to regenerate it. Otherwise set model.name_or_path to a folder with config.json, weights "
            "and tokenizer files, or to a hub id this machine can reach (HF_HUB_OFFLINE=1 uses the local cache only)."
        ) from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    return _load("tokenizer", name_or_path, lambda: AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code))


def load_classifier(
    name_or_path: str,
    label_names: list[str] | None = None,
    activation: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """A sequence classifier; with `label_names` a fresh head for those classes, with
    `activation` the FFN activation swapped before the weights are loaded."""
    config = _load("model config", name_or_path, lambda: AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code))
    adapter = family(config)
    if label_names is not None:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    if activation is not None:
        adapter.set_activation(config, activation)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" notice is expected here
    try:
        model = _load(
            "model",
            name_or_path,
            lambda: AutoModelForSequenceClassification.from_pretrained(
                name_or_path, config=config, trust_remote_code=trust_remote_code, dtype=torch.float32
            ),
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def save_classifier(model: torch.nn.Module, tokenizer, folder: str | os.PathLike) -> None:
    """save_pretrained as safetensors, tokenizer beside it (a standard HF folder)."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
