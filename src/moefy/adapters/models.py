"""Loading and saving the Hugging Face models a study works on, with errors a user can act on.

A model is a folder (or hub id) with config.json, weights and tokenizer, or a single .gguf file,
which transformers dequantises to float32 (this needs the `gguf` and `accelerate` packages).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from moefy.adapters.attention import install_saved_projections, save_projections
from moefy.adapters.families import causal_lm_families, family
from moefy.adapters.ffn import find_ffns
from moefy.config import TASKS
from moefy.errors import MoefyError
from moefy.files import read_json

hf_logging.disable_progress_bar()  # a bar per load/save would drown the steps' own progress in the logs

_HEADS = {"classification": AutoModelForSequenceClassification, "causal_lm": AutoModelForCausalLM}
assert set(_HEADS) == set(TASKS)
# Written by the finetune step into the model folder: how the model was trained (task, penalty,
# seed, precision, machine), so every later step and record can say so.
TRAINING_FILE = "training.json"


def _source(name_or_path: str) -> tuple[str, dict]:
    """(folder or hub id, extra from_pretrained kwargs): a .gguf file is read from its folder."""
    if not name_or_path.lower().endswith(".gguf"):
        return name_or_path, {}
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MoefyError(
            f"{name_or_path} is a GGUF file; transformers needs the {' and '.join(missing)} package(s) to read it, "
            f"which are not installed. Run `pip install {' '.join(missing)}` (moefy's own dependencies: reinstall moefy), "
            "or point model.name_or_path at a folder with config.json and safetensors weights"
        )
    path = Path(name_or_path)
    if not path.is_file():
        raise MoefyError(f"GGUF file {name_or_path} does not exist; fix model.name_or_path (or let its fetch rule extract it)")
    return str(path.parent), {"gguf_file": path.name}


def _plain_float_model(model: torch.nn.Module) -> None:
    """Forget that the weights came from a GGUF file: they are dequantised float32 tensors in
    plain nn.Linear modules, which the fine-tuned model is saved as (a quantizer would refuse)."""
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _load(what: str, name_or_path: str, loader):
    try:
        return loader()
    except (OSError, ValueError, SafetensorError) as err:
        where = "local folder" if Path(name_or_path).exists() else "hub id or local folder"
        raise MoefyError(
            f"cannot load the {what} from {name_or_path!r} ({where}): {str(err).splitlines()[0]}. "
            "If it is a workflow output (results/<study>/finetune/model), it is damaged: delete it and rerun "
            "snakemake to regenerate it. Otherwise set model.name_or_path to a folder with config.json, weights "
            "and tokenizer files (or a .gguf file), or to a hub id this machine can reach (HF_HUB_OFFLINE=1 uses "
            "the local cache only)."
        ) from None


def load_config(name_or_path: str, trust_remote_code: bool = False):
    where, extra = _source(name_or_path)
    return _load(
        "model config", name_or_path, lambda: AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    )


# The files a tokenizer's vocabulary is read from (fast tokenizers, WordPiece, BPE, SentencePiece,
# tiktoken's *.tiktoken): a model folder with none of them has no tokenizer of its own.
VOCABULARY_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
)
# Fewer tokens than this besides the special ones is the vocabulary transformers makes up when the
# files are missing (BERT: 0 of 5, GPT-2: 0 of 1, T5: 1 of 104); the tests' toy vocabulary has 34.
MIN_ORDINARY_TOKENS = 10


def _check_tokenizer_files(folder: Path) -> None:
    """Without them transformers builds an empty tokenizer from config.json alone (or fails obscurely)."""
    if any((folder / name).is_file() for name in VOCABULARY_FILES) or any(folder.glob("*.tiktoken")):
        return
    raise MoefyError(
        f"no tokenizer files ({', '.join(VOCABULARY_FILES)}, ...) in {folder}: copy the tokenizer of the model it "
        "was trained from into it (tokenizer.save_pretrained), or point model.name_or_path at a folder that has one"
    )


# The files transformers reads a folder's weights from: one file, or a sharded checkpoint's index.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_weight_files(folder: Path) -> None:
    """The weights are there and every safetensors file is whole (its header is read, not its
    tensors): a folder saved without them, or copied in part, would otherwise pass every check
    before the study and fail its first fine-tune."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise MoefyError(
            f"no weights ({', '.join(WEIGHT_FILES)}) in {folder}: copy the model's weights into it "
            "(model.save_pretrained), or point model.name_or_path at a folder that has them"
        )
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise MoefyError(f"{path} is damaged ({err}): copy the model's weights into {folder} again") from None


def _check_vocabulary(tokenizer, name_or_path: str) -> None:
    """Refuse a vocabulary of (almost) only special tokens: every text would become [UNK]s or nothing."""
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    ordinary = len(set(tokenizer.get_vocab()) - special)
    if ordinary < MIN_ORDINARY_TOKENS:
        raise MoefyError(
            f"the tokenizer of {name_or_path} has {ordinary} tokens besides its {len(special)} special ones: an empty "
            "tokenizer, not the model's vocabulary (every text would become [UNK]s); copy the tokenizer of the model "
            "it was trained from into it (tokenizer.save_pretrained)"
        )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer, padding on the right (position ids of real tokens then start at 0 in
    decoders too) and with a pad token: decoder tokenizers often have none, so eos pads.

    A model folder without tokenizer files, or a tokenizer of almost only special tokens, is
    refused: training would otherwise run on [UNK]s without a word of warning."""
    where, extra = _source(name_or_path)
    if not extra and Path(where).is_dir():  # a .gguf file carries its tokenizer inside
        _check_tokenizer_files(Path(where))
    tokenizer = _load(
        "tokenizer", name_or_path, lambda: AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **extra)
    )
    _check_vocabulary(tokenizer, name_or_path)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        fill = tokenizer.eos_token or tokenizer.unk_token
        if fill is None:
            raise MoefyError(
                f"the tokenizer of {name_or_path} has no pad, eos or unk token to pad batches with; "
                "add a pad token to its tokenizer files"
            )
        tokenizer.pad_token = fill
    return tokenizer


def load_model(
    name_or_path: str,
    task: str = "classification",
    label_names: list[str] | None = None,
    activation: str | None = None,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """The model with the task's head: a sequence classifier (with `label_names`, a fresh head for
    those classes) or a causal LM. With `activation` the FFN activation is swapped before the
    weights are loaded. FFNs come back in the adapter's form (plain nn.Linear projections)."""
    if task not in _HEADS:
        raise MoefyError(f"task {task!r} is unknown; choose one of {', '.join(TASKS)}")
    where, extra = _source(name_or_path)
    config = load_config(name_or_path, trust_remote_code)
    adapter = family(config)
    weights = dict(extra)
    if "gguf_file" in extra:  # unpack every weight: the FFN adapter and MoE layers need plain nn.Linear
        from transformers import GgufConfig

        weights["quantization_config"] = GgufConfig(gguf_file=extra["gguf_file"], dequantize=True)
    if task == "causal_lm" and not adapter.causal_lm:
        raise MoefyError(
            f"task causal_lm needs a decoder-only model with a next-token head; {name_or_path} is a "
            f"{config.model_type!r} model. Use task: classification, or one of {', '.join(causal_lm_families())}"
        )
    if label_names is not None:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}
    if task == "classification" and getattr(config, "pad_token_id", None) is None:
        # Decoder classifiers read the last non-pad token, so they must know the pad id.
        config.pad_token_id = load_tokenizer(name_or_path, trust_remote_code).pad_token_id
    if activation is not None:
        adapter.set_activation(config, activation)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" notice is expected here
    try:
        model = _load(
            "model",
            name_or_path,
            lambda: _HEADS[task].from_pretrained(
                where, config=config, trust_remote_code=trust_remote_code, dtype=torch.float32, **weights
            ),
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if "gguf_file" in extra:
        _plain_float_model(model)
    find_ffns(model)  # converts GPT-2 Conv1Ds in place, before an optimizer sees the parameters
    if Path(where).is_dir():  # a model with distilled attention projections (the distill step's output)
        install_saved_projections(model, where)
    return model


def load_classifier(
    name_or_path: str, label_names: list[str] | None = None, activation: str | None = None, trust_remote_code: bool = False
) -> torch.nn.Module:
    """A sequence classifier (load_model with task classification)."""
    return load_model(name_or_path, "classification", label_names, activation, trust_remote_code)


def save_model(model: torch.nn.Module, tokenizer, folder: str | os.PathLike) -> None:
    """save_pretrained as safetensors, tokenizer beside it (a standard HF folder); distilled
    attention projections go to projections.safetensors, which load_model puts back in place."""
    model.save_pretrained(folder, safe_serialization=True)
    save_projections(model, folder)
    tokenizer.save_pretrained(folder)


save_classifier = save_model


def read_training(folder: str | os.PathLike) -> dict:
    """The finetune step's training.json of a model folder ({} for a folder it did not write)."""
    path = Path(folder) / TRAINING_FILE
    return read_json(path) if path.is_file() else {}
