"""Whole-model FLOPs per token (moefy.measure.flops) against hand counts, and the forward timer."""

from __future__ import annotations

import pytest
import torch

from builders import build_tiny
from moefy.adapters.models import load_model
from moefy.measure.flops import ForwardTimer, model_flops

D, D_FF, LAYERS, L = 32, 64, 2, 10.0


def test_tiny_bert_classifier_by_hand(tmp_path):
    model = load_model(str(build_tiny("bert", tmp_path / "bert")), "classification", label_names=["a", "b"])
    flops = model_flops(model, mean_length=L, causal=False)
    per_layer_attention = 2 * 4 * D * D  # q, k, v, o
    per_layer_ffn = 2 * 2 * D * D_FF
    assert flops.ffn == LAYERS * per_layer_ffn
    assert flops.projections == LAYERS * per_layer_attention
    assert flops.attention_scores == LAYERS * 4 * D * L  # Q K^T and the sum over V, L keys each
    assert flops.head == pytest.approx(2 * (D * D + D * 2) / L)  # pooler and classifier, once per sequence
    assert flops.total == pytest.approx(LAYERS * (per_layer_attention + per_layer_ffn + 4 * D * L) + 2 * (D * D + 2 * D) / L)
    assert flops.fraction_with(1.0) == pytest.approx(1.0)
    assert flops.fraction_with(0.0) == pytest.approx(1 - flops.ffn / flops.total)


def test_tiny_llama_causal_lm_by_hand(tmp_path):
    model = load_model(str(build_tiny("llama", tmp_path / "llama")), "causal_lm")
    config = model.config
    head_dim = D // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim  # grouped-query attention: narrower k and v
    flops = model_flops(model, mean_length=L, causal=True)
    assert flops.ffn == LAYERS * 2 * 3 * D * D_FF  # gate, up, down
    assert flops.projections == LAYERS * 2 * (D * D + 2 * D * kv + D * D)
    assert flops.attention_scores == LAYERS * 4 * D * (L + 1) / 2  # a token attends to its prefix
    assert flops.head == 2 * D * config.vocab_size  # the next-token head, every token


def test_forward_timer_adds_up_whole_forwards(tmp_path):
    model = load_model(str(build_tiny("bert", tmp_path / "bert")), "classification", label_names=["a", "b"]).eval()
    inputs = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    timer = ForwardTimer()
    with timer.attached(model), torch.no_grad():
        model(**inputs)
        once = timer.seconds
        model(**inputs)
    assert 0 < once < timer.seconds
    total = timer.seconds
    with torch.no_grad():
        model(**inputs)  # detached: no longer counted
    assert timer.seconds == total
