"""Every supported family, as a tiny random model built here: the adapter finds its FFNs, the MoE
at full budget is the dense model to the last bit, a partial budget changes it, the ReLU swap
survives a save and reload, and bad inputs are clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from builders import DECODERS, FAMILIES, build_tiny
from moefy.adapters.ffn import TransposedLinear, capture, find_ffns
from moefy.adapters.models import load_model, load_tokenizer
from moefy.conversion.routers import GroundTruthRouter, MLPRouter, SimilarityRouter, expert_centroids, expert_mass
from moefy.errors import MoefyError
from moefy.moe.layer import moefy_model, set_experts_per_token

E = 8
GATED = {"t5-gated", "llama", "mistral", "qwen2"}
CASES = [(f, "classification") for f in FAMILIES] + [(f, "causal_lm") for f in DECODERS]
TEXTS = ["the movie was good and funny", "bad", "a dull boring plot with its cast"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: build_tiny(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def load(folder, task, activation=None):
    torch.manual_seed(0)  # the same fresh classifier head every time
    labels = ["a", "b"] if task == "classification" else None
    return load_model(str(folder), task, label_names=labels, activation=activation).eval()


def batch(folder):
    return load_tokenizer(str(folder))(TEXTS, padding=True, return_tensors="pt")


def moefied(folder, task, router, activation=None):
    model = load(folder, task, activation)
    ffns = find_ffns(model)
    labels = {f.index: torch.randperm(f.d_ff, generator=torch.Generator().manual_seed(f.index)) % E for f in ffns}
    routers = {}
    for f in ffns:
        if router == "groundtruth":
            routers[f.index] = GroundTruthRouter(labels[f.index], E)
        elif router == "similarity":
            routers[f.index] = SimilarityRouter(expert_centroids(f.keys, labels[f.index], E))
        else:
            torch.manual_seed(f.index)
            routers[f.index] = MLPRouter(f.d_model, E)
    return model, moefy_model(model, labels, routers, E)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_every_ffn_with_unique_indices(folders, family):
    model = load(folders[family], "classification")
    ffns = find_ffns(model)
    expected_layers = 4 if family.startswith("t5") else 2  # T5: encoder blocks, then decoder blocks
    assert [f.index for f in ffns] == list(range(expected_layers))
    assert all(isinstance(m, nn.Linear) for f in ffns for m in (f.w_in, f.w_out))
    assert all((f.w_gate is not None) == (family in GATED) for f in ffns)
    assert (ffns[0].d_model, ffns[0].d_ff) == (32, 64) and ffns[0].keys.shape == (64, 32)
    # what the block computes is what the adapter says: h = activations(x), read by w_out
    with capture(ffns) as seen, torch.no_grad():
        model(**batch(folders[family]))
        for f in ffns:
            torch.testing.assert_close(seen[f.index]["h"], f.activations(seen[f.index]["x"]))


@pytest.mark.parametrize("family,task", CASES)
@pytest.mark.parametrize("router", ["groundtruth", "similarity", "mlp"])
def test_full_budget_is_the_dense_model_and_a_partial_one_is_not(folders, family, task, router):
    inputs = batch(folders[family])
    dense = load(folders[family], task, activation="relu")
    model, layers = moefied(folders[family], task, router, activation="relu")
    with torch.no_grad():
        expected = dense(**inputs).logits
        # the MoE's dense path sums neurons in expert order: equal up to float rounding
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        set_experts_per_token(layers, 1)
        assert not torch.allclose(model(**inputs).logits, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_relu_swap_survives_save_and_reload(folders, family, tmp_path):
    model = load(folders[family], "classification", activation="relu")
    assert all(isinstance(f.act, nn.ReLU) for f in find_ffns(model))
    model.save_pretrained(tmp_path)
    load_tokenizer(str(folders[family])).save_pretrained(tmp_path)
    again = load(tmp_path, "classification")
    assert all(isinstance(f.act, nn.ReLU) for f in find_ffns(again))
    inputs = batch(folders[family])
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_gpt2_conv1d_becomes_linear_and_saves_as_conv1d(folders, tmp_path):
    from transformers import GPT2LMHeadModel

    model = load(folders["gpt2"], "causal_lm")
    ffn = find_ffns(model)[0]
    assert isinstance(ffn.w_in, TransposedLinear) and ffn.w_in.weight.shape == (64, 32)
    model.save_pretrained(tmp_path)
    original = GPT2LMHeadModel.from_pretrained(tmp_path).eval()  # plain transformers, Conv1D layout
    assert original.transformer.h[0].mlp.c_fc.weight.shape == (32, 64)
    torch.testing.assert_close(original.transformer.h[0].mlp.c_fc.weight, ffn.w_in.weight.t())
    inputs = batch(folders["gpt2"])
    with torch.no_grad():
        torch.testing.assert_close(original(**inputs).logits, model(**inputs).logits)


def test_t5_decoder_ffns_are_in_the_decoder(folders):
    model = load(folders["t5"], "classification")
    ffns = find_ffns(model)
    decoder_wo = {id(block.layer[-1].DenseReluDense.wo) for block in model.base_model.decoder.block}
    assert [id(f.w_out) in decoder_wo for f in ffns] == [False, False, True, True]


def test_gated_score_counts_magnitude_and_silu_fires_by_top_fraction(folders):
    ffn = find_ffns(load(folders["llama"], "causal_lm"))[0]
    h = ffn.activations(torch.randn(5, 32))
    assert (h < 0).any() and not ffn.exact_zeros  # SiLU(gate) * up goes negative
    labels = torch.arange(64) % E
    mass = expert_mass(h, labels, E)
    torch.testing.assert_close(mass[:, 3], h[:, labels == 3].abs().sum(-1))
    fired = ffn.fired(h, 0.25)
    assert fired.dtype == torch.bool and torch.equal(fired.sum(-1), torch.full((5,), 16))
    smallest_fired = h.abs().masked_fill(~fired, float("inf")).amin(-1)
    largest_not = h.abs().masked_fill(fired, -1.0).amax(-1)
    assert (smallest_fired >= largest_not).all()


def test_relu_gated_neuron_fires_when_nonzero_even_if_negative(folders):
    ffn = find_ffns(load(folders["llama"], "causal_lm", activation="relu"))[0]
    h = ffn.activations(torch.randn(50, 32))
    assert ffn.exact_zeros and (h < 0).any()
    assert torch.equal(ffn.fired(h, 0.1), h != 0)


def test_t5_has_no_causal_lm_head(folders):
    with pytest.raises(MoefyError, match="task causal_lm needs a decoder-only model.*'t5'.*gpt2, llama"):
        load_model(str(folders["t5"]), "causal_lm")


def test_gguf_without_its_packages_is_a_clear_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(MoefyError, match=r"GGUF file; transformers needs the gguf package.*pip install gguf"):
        load_model(str(tmp_path / "model.Q4_1.gguf"), "causal_lm")


def test_missing_gguf_file_is_named(tmp_path):
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        pytest.skip("needs gguf and accelerate installed")
    with pytest.raises(MoefyError, match=r"GGUF file .*model.gguf does not exist"):
        load_tokenizer(str(tmp_path / "model.gguf"))


def test_decoder_classifier_gets_a_pad_token(folders, tmp_path):
    """Without a pad token the tokenizer pads with eos, and the classifier reads that id."""
    tokenizer = load_tokenizer(str(folders["gpt2"]))
    tokenizer.pad_token = None
    tokenizer.eos_token = "[SEP]"
    model = load(folders["gpt2"], "classification")
    model.config.pad_token_id = None
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    assert reloaded.pad_token == "[SEP]" and reloaded.padding_side == "right"
    classifier = load(tmp_path, "classification")
    assert classifier.config.pad_token_id == reloaded.convert_tokens_to_ids("[SEP]")
    inputs = reloaded(TEXTS, padding=True, return_tensors="pt")
    alone = reloaded(TEXTS[1:2], return_tensors="pt")
    with torch.no_grad():  # padding does not change a text's logits: the last real token is read
        torch.testing.assert_close(classifier(**inputs).logits[1], classifier(**alone).logits[0])
