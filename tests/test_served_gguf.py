"""A moefy MoE decoder end to end into llama.cpp: a tiny random LLaMA (tied embeddings, as SmolLM2's)
converted with shared experts and softmax gates, and upcycled with renormalised top-k gates (one
layer then merged), written
as its transformers MoE class (moefy.adapters.served), converted to GGUF F32 by llama.cpp's own
converter and run in llama.cpp: its logits are moefy's within 1e-4 (KV cache in F32; see
tests/test_gguf.py for what F32 achieves) and its greedy tokens moefy's for 16 steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builders import gguf_decoder_config, gpt2_tokenizer
from moefy.adapters.ffn import find_ffns
from moefy.adapters.served import write_served
from moefy.conversion.routers import LinearRouter
from moefy.moe.sparse import Routing, from_split
from moefy.serving import llama_cpp_measure as measure
from moefy.serving.converter import llama_cpp_source
from moefy.serving.gguf import to_gguf
from moefy.training.upcycling import upcycle

pytestmark = pytest.mark.gguf

MAX_LENGTH = 64
TEXT = "Mixture-of-Experts layers compute only the experts a router picks for each token."
PROMPT = "Once upon a time, in a small village by the sea,"
E, SHARED = 8, 2


def tiny_decoder(tokenizer):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(gguf_decoder_config("llama", len(tokenizer), tie_word_embeddings=True)).eval()


def gated_conversion(model):
    moes = {}
    for ffn in find_ffns(model):
        router = LinearRouter(ffn.d_model, E - SHARED)
        torch.nn.init.normal_(router.proj.weight, std=0.5)
        labels = torch.randperm(ffn.d_ff, generator=torch.Generator().manual_seed(ffn.index)) % E
        moe = from_split(ffn, labels, E, router, k=2, shared_experts=SHARED, softmax_gates=True)
        moe.gate.scale.data.fill_(0.8)
        ffn.replace(moe)
        moes[ffn.index] = moe
    return model, moes


def upcycled_and_merged(model):
    """Upcycled to 4 experts; layer 0 then merged (experts 0 and 1 averaged: two router slots share one)."""
    from types import SimpleNamespace

    from moefy.training.merging import merge_layer

    moes = {}
    for ffn in find_ffns(model):
        routing = Routing("top_k", k=2, renormalize=True)
        generator = torch.Generator().manual_seed(ffn.index)
        moes[ffn.index] = upcycle(ffn, 4, routing, drop_ratio=0.5, router_std=0.5, generator=generator)
        if ffn.index == 0:
            moes[0] = merge_layer(moes[0], [[0, 1], [2], [3]], SimpleNamespace(frequency=torch.ones(4)), "average")
        ffn.replace(moes[ffn.index])
    return model, moes


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer(llama_cpp_source(), MAX_LENGTH)


@pytest.mark.parametrize(
    "make, architecture", [(gated_conversion, "Qwen2MoeForCausalLM"), (upcycled_and_merged, "MixtralForCausalLM")]
)
def test_a_served_moe_runs_in_llama_cpp_with_moefys_logits_and_greedy_tokens(tokenizer, tmp_path, make, architecture):
    model, moes = make(tiny_decoder(tokenizer))
    record = write_served(model, moes, tokenizer, tmp_path, tmp_path / "served")
    assert record["architecture"] == architecture
    path = to_gguf(tmp_path / "served", tmp_path / "model-F32.gguf", "F32")
    ids = tokenizer(TEXT).input_ids
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
        prompt = torch.tensor([tokenizer(PROMPT).input_ids])
        greedy = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=16, min_new_tokens=16
        )
    with measure.open_gguf(path, threads=2, context=MAX_LENGTH, logits=True, kv_cache="F32") as llm:
        assert np.abs(measure.logits_of(llm, ids) - expected).max() < 1e-4
        got = measure.greedy(llm, PROMPT, 16)
    assert got["prompt_ids"] == prompt[0].tolist()
    assert got["tokens"] == greedy[0, prompt.shape[1] :].tolist()


def test_the_serving_speed_benchmark_times_dense_and_served_side_by_side(tokenizer, tmp_path, monkeypatch, capsys):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    dense = tiny_decoder(tokenizer)
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    model, moes = gated_conversion(tiny_decoder(tokenizer))
    write_served(model, moes, tokenizer, tmp_path, tmp_path / "moe-b0.5" / "model")
    spec = importlib.util.spec_from_file_location("serve_speed", Path(__file__).parents[1] / "benchmarks" / "serve_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["serve_speed", "--dense", str(tmp_path / "dense"), "--served", str(tmp_path / "moe-b0.5" / "model"), "--types", "F32"]
    argv += ["--experts", "4", "--budgets", "0.5", "--shared-fraction", "0.25"]  # a random conversion: E 4, 1 shared, k 1
    argv += ["--prompt-tokens", "8", "--decode-tokens", "4", "--repeats", "1", "--work", str(tmp_path / "gguf")]
    monkeypatch.setattr(sys, "argv", argv + ["--json", str(tmp_path / "speed.json")])
    bench.main()
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [(r["model"], r["runtime"]) for r in rows] == [
        ("dense", "llama.cpp F32"),
        ("dense", "transformers F32"),
        ("moe-b0.5", "llama.cpp F32"),
        ("moe-b0.5", "transformers F32"),
        ("random-E4-S1-b0.5", "llama.cpp F32"),
        ("random-E4-S1-b0.5", "transformers F32"),
    ]
    shaped = json.loads((tmp_path / "gguf" / "random-E4-S1-b0.5" / "model" / "config.json").read_text())
    assert (shaped["num_experts"], shaped["num_experts_per_tok"], shaped["moe_intermediate_size"]) == (3, 1, 32)
    assert all(r["decode_tokens_per_s"] > 0 and r["prompt_tokens_per_s"] > 0 for r in rows)
    assert rows[0]["decode_vs_dense"] == 1.0 and "decode vs dense" in capsys.readouterr().out
