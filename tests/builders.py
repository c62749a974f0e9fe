"""Tiny models and data built in the tests: a random 2-layer BERT and a random model of every
supported family (d_model 32, 2 heads, the toy vocabulary's tokenizer), a learnable toy sentiment
CSV shaped like the Rotten Tomatoes file, a synthetic FFN for the MoE layer's unit tests, and a real
tokenizer (GPT-2's, from llama.cpp's source) for models converted to GGUF."""

from __future__ import annotations

import csv
import random
import struct
from pathlib import Path

import torch
from torch import nn

from moefy.adapters.ffn import FFN

POSITIVE = "good great fine superb lovely moving funny smart charming brilliant".split()
NEGATIVE = "bad awful dull boring weak messy tedious stupid bland clumsy".split()
FILLER = "the a movie film story plot this it was is and with its cast".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_bert(folder: Path, hidden_act: str = "gelu", layers: int = 2, d_ff: int = 64) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=d_ff,
        max_position_embeddings=64,
        hidden_act=hidden_act,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


FAMILIES = ("bert", "roberta", "distilbert", "t5", "t5-gated", "gpt2", "llama", "mistral", "qwen2")
DECODERS = ("gpt2", "llama", "mistral", "qwen2")


def _family_config(family: str, vocab_size: int, layers: int, d_ff: int, hidden_act: str | None):
    """A tiny config of one family: d_model 32, 2 heads, the BERT test vocabulary's special ids."""
    import transformers as tf

    special = {"pad_token_id": 0}
    if family == "bert":
        return tf.BertConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=d_ff,
            max_position_embeddings=64,
            hidden_act=hidden_act or "gelu",
        )
    if family == "roberta":
        return tf.RobertaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=d_ff,
            max_position_embeddings=70,
            type_vocab_size=1,
            hidden_act=hidden_act or "gelu",
            **special,
        )
    if family == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=vocab_size,
            dim=32,
            n_layers=layers,
            n_heads=2,
            hidden_dim=d_ff,
            max_position_embeddings=64,
            activation=hidden_act or "gelu",
            **special,
        )
    if family in ("t5", "t5-gated"):
        # T5 classifiers read the decoder at the eos token: [SEP] ends every text of the test tokenizer.
        proj = ("gated-" if family == "t5-gated" else "") + (hidden_act or ("gelu" if family == "t5-gated" else "relu"))
        return tf.T5Config(
            vocab_size=vocab_size,
            d_model=32,
            d_kv=16,
            d_ff=d_ff,
            num_layers=layers,
            num_heads=2,
            feed_forward_proj=proj,
            eos_token_id=SPECIAL.index("[SEP]"),
            decoder_start_token_id=0,
            **special,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size,
            n_embd=32,
            n_layer=layers,
            n_head=2,
            n_positions=64,
            n_inner=d_ff,
            activation_function=hidden_act or "gelu_new",
            bos_token_id=2,
            eos_token_id=3,
        )
    kinds = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}
    return kinds[family](
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=d_ff,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        hidden_act=hidden_act or "silu",
    )


def build_tiny(
    family: str, folder: Path, hidden_act: str | None = None, layers: int = 2, d_ff: int = 64, tokenizer: bool = True
) -> Path:
    """A random model of `family` with the toy vocabulary's tokenizer (input ids and mask only;
    `tokenizer` False: config and weights alone, as save_pretrained of the model writes them).

    Decoders are saved with their LM head, the others as base models; moefy adds the head it needs.
    """
    from transformers import AutoModel, AutoModelForCausalLM, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    toy = BertTokenizer(
        vocab={word: i for i, word in enumerate(words)}, do_lower_case=True, model_input_names=["input_ids", "attention_mask"]
    )
    torch.manual_seed(0)
    config = _family_config(family, toy.vocab_size, layers, d_ff, hidden_act)
    (AutoModelForCausalLM if family in DECODERS else AutoModel).from_config(config).save_pretrained(folder)
    if tokenizer:
        toy.save_pretrained(folder)
    return folder


def write_toy_sentiment(path: Path, rows: int = 240, seed: int = 0, mixed: bool = False) -> Path:
    """A CSV shaped like the Rotten Tomatoes file: category (fresh/rotten/plot), text, movie_name.

    With `mixed`, texts also carry words of the other sentiment, so some are hard to call and a
    perturbed model (an MoE at a small budget) changes some predictions.
    """
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name"])
        for i in range(rows):
            category = rng.choice(["fresh", "rotten", "plot"]) if i % 10 == 0 else rng.choice(["fresh", "rotten"])
            words = POSITIVE if category == "fresh" else NEGATIVE
            text = " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 8)))
            text += " " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
            if mixed:
                other = NEGATIVE if words is POSITIVE else POSITIVE
                text += " " + " ".join(rng.choice(other) for _ in range(rng.randint(0, 3)))
            writer.writerow([category, text, f"movie {i % 7}"])
    return path


def synthetic_ffn(d: int, d_ff: int, gated: bool, bias: bool, act: torch.nn.Module) -> FFN:
    torch.manual_seed(1)
    return FFN(
        0,
        nn.Linear(d, d_ff, bias=bias),
        act,
        nn.Linear(d_ff, d, bias=bias),
        lambda m: None,
        w_gate=nn.Linear(d, d_ff, bias=bias) if gated else None,
    )


# GGUF metadata value types (gguf's GGUFValueType): struct formats of the scalars; 8 string, 9 array.
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: Path) -> dict:
    """A GGUF file's key/value header (gguf's GGUFReader takes seconds over 100,000 strings; this 0.4 s)."""
    data, pos = path.read_bytes(), 24  # magic, version, tensor count, then the key count at 16

    def read(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def value(kind: int):
        nonlocal pos
        if kind == 8:
            size = read("Q")
            pos += size
            return data[pos - size : pos].decode("utf-8")
        if kind == 9:
            inner, count = read("I"), read("Q")
            return [value(inner) for _ in range(count)]
        return read(SCALARS[kind])

    metadata = {}
    for _ in range(struct.unpack_from("<Q", data, 16)[0]):
        key = value(8)
        metadata[key] = value(read("I"))
    return metadata


def gpt2_tokenizer(source: Path, max_length: int):
    """GPT-2's byte-level BPE (50,257 tokens) rebuilt from llama.cpp's copy of its vocabulary in `source`
    (moefy.serving.converter.llama_cpp_source()): a tokenizer llama.cpp's converter recognises, which
    the toy vocabulary's is not, for tiny models exported to GGUF."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    metadata = gguf_metadata(source / "models" / "ggml-vocab-gpt-2.gguf")
    tokens, merges = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.merges"]
    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end, model_max_length=max_length)


def gguf_decoder_config(family: str, vocab_size: int, **overrides):
    """A tiny random decoder's config ("qwen2moe", "mixtral" or "llama") for a GPT-2-vocabulary
    tokenizer (gpt2_tokenizer), as the GGUF tests export it."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig

    # initializer_range 0.2: logits of magnitude ~8, so greedy picks are not decided by rounding.
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=False,
    )
    if family == "qwen2moe":
        moe = dict(moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=8, num_experts_per_tok=2)
        return Qwen2MoeConfig(**(common | moe | {"norm_topk_prob": False, "qkv_bias": False} | overrides))
    if family == "mixtral":
        return MixtralConfig(**(common | {"num_local_experts": 8, "num_experts_per_tok": 2} | overrides))
    return LlamaConfig(**(common | overrides))
