"""The native export (moefy.adapters.served): a moefy MoE decoder written as Qwen2-MoE or Mixtral,
loaded by transformers with remote code off, gives moefy's logits; what has no exact form is refused
with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from builders import build_tiny
from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import load_model, load_tokenizer
from moefy.adapters.served import probe_ids, write_served
from moefy.conversion.routers import LinearRouter
from moefy.errors import MoefyError
from moefy.moe.layer import moefy_model, set_experts_per_token
from moefy.moe.sparse import Routing, from_split
from moefy.training.upcycling import upcycle

E, D_FF = 8, 64


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    return build_tiny("llama", tmp_path_factory.mktemp("llama") / "model", d_ff=D_FF)


def labels_for(layer: int) -> torch.Tensor:
    return torch.randperm(D_FF, generator=torch.Generator().manual_seed(layer)) % E


def converted(folder: Path, shared: int, scale: float, k: int = 2):
    """The tiny decoder with softmax-gated converted layers (trainable SparseMoE), a linear router
    of random weights per layer."""
    torch.manual_seed(1)
    model = load_model(str(folder), "causal_lm").eval()
    moes = {}
    for ffn in find_ffns(model):
        router = LinearRouter(ffn.d_model, E - shared)
        torch.nn.init.normal_(router.proj.weight, std=0.5)
        moe = from_split(ffn, labels_for(ffn.index), E, router, k, shared_experts=shared, softmax_gates=True)
        moe.gate.scale.data.fill_(scale)
        ffn.replace(moe)
        moes[ffn.index] = moe
    return model.eval(), moes


def logits(model, vocab_size: int) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=probe_ids(vocab_size)).logits


@pytest.mark.parametrize("shared", [2, 0])
def test_a_softmax_gated_conversion_loads_as_qwen2_moe_with_moefys_logits(decoder, tmp_path, shared):
    model, moes = converted(decoder, shared, scale=0.8)
    record = write_served(model, moes, load_tokenizer(str(decoder)), decoder, tmp_path / "served")
    assert record["architecture"] == "Qwen2MoeForCausalLM"
    assert (record["routed_experts"], record["experts_per_token"]) == (E - shared, 2)
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "served", trust_remote_code=False).eval()
    assert type(served).__name__ == "Qwen2MoeForCausalLM"
    assert not served.config.norm_topk_prob
    vocab = model.config.vocab_size
    assert torch.allclose(logits(served, vocab), logits(model, vocab), atol=1e-5, rtol=0)
    # the inference layer evaluate measures (MoEFFN, gated) gives the same logits
    plain = load_model(str(decoder), "causal_lm").eval()
    routers = {i: moe.router.router for i, moe in moes.items()}
    layers = moefy_model(
        plain, {i: labels_for(i) for i in moes}, routers, E, shared_experts=shared, gates={i: m.gate for i, m in moes.items()}
    )
    set_experts_per_token(layers, 2)
    assert torch.allclose(logits(served, vocab), logits(plain, vocab), atol=1e-5, rtol=0)
    assert (tmp_path / "served" / "tokenizer_config.json").is_file()


def test_an_upcycled_decoder_loads_as_mixtral_renormalised_and_qwen2_moe_otherwise(decoder, tmp_path):
    for renormalize, architecture in ((True, "MixtralForCausalLM"), (False, "Qwen2MoeForCausalLM")):
        model = load_model(str(decoder), "causal_lm").eval()
        moes = {}
        for ffn in find_ffns(model):
            moe = upcycle(
                ffn,
                4,
                Routing("top_k", k=2, renormalize=renormalize),
                drop_ratio=0.5,
                router_std=0.5,
                generator=torch.Generator().manual_seed(ffn.index),
            )
            ffn.replace(moe)
            moes[ffn.index] = moe
        out = tmp_path / architecture
        assert write_served(model, moes, load_tokenizer(str(decoder)), decoder, out)["architecture"] == architecture
        served = AutoModelForCausalLM.from_pretrained(out).eval()
        assert type(served).__name__ == architecture
        vocab = model.config.vocab_size
        assert torch.allclose(logits(served, vocab), logits(model.eval(), vocab), atol=1e-5, rtol=0)


def test_a_dense_layer_stays_a_dense_mlp(decoder, tmp_path):
    model, moes = converted(decoder, 2, scale=0.5)
    first = find_ffns(load_model(str(decoder), "causal_lm"))[0]
    model.model.layers[0].mlp = load_model(str(decoder), "causal_lm").model.layers[0].mlp  # layer 0 back to dense
    del moes[first.index]
    write_served(model, moes, load_tokenizer(str(decoder)), decoder, tmp_path / "served")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "served").eval()
    assert served.config.mlp_only_layers == [0]
    vocab = model.config.vocab_size
    assert torch.allclose(logits(served, vocab), logits(model, vocab), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda moes: [m.gate.scale.data.fill_(0.0) for m in moes.values()], "scale is 0"),
        (lambda moes: [m.gate.scale.data.fill_(-0.2) for m in moes.values()], "scale is -0.2"),
        (lambda moes: [setattr(m, "gate", None) for m in moes.values()], "unweighted top-k"),
        (lambda moes: [setattr(moes[0], "routing", Routing("unweighted_top_k", k=3))], "differ in experts, k"),
    ],
)
def test_what_has_no_exact_form_is_refused_and_nothing_written(decoder, tmp_path, change, named):
    model, moes = converted(decoder, 2, scale=0.5)
    change(moes)
    with pytest.raises(MoefyError, match=named):
        write_served(model, moes, load_tokenizer(str(decoder)), decoder, tmp_path / "served")
    assert not (tmp_path / "served").exists()


def test_tied_embeddings_are_written_untied_as_llama_cpp_needs(decoder, tmp_path):
    model, moes = converted(decoder, 2, scale=0.5)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    write_served(model, moes, load_tokenizer(str(decoder)), decoder, tmp_path / "served")
    served = AutoModelForCausalLM.from_pretrained(tmp_path / "served").eval()
    assert not served.config.tie_word_embeddings
    assert torch.equal(served.lm_head.weight, model.model.embed_tokens.weight.detach())
    assert served.lm_head.weight.data_ptr() != served.model.embed_tokens.weight.data_ptr()


@pytest.mark.e2e
def test_the_serve_section_wires_serve_gguf_and_harness_jobs(tmp_path):
    """A dry run of a causal_lm study with serve: each softmax-gated recovery at each budget, the
    upcycled model and its merged and pruned ones served, then every served folder and the dense
    model in llama.cpp and lm-eval, and one report of them all."""
    import subprocess

    import yaml

    from studies import environment, snakemake_command

    config = {
        "study": "served",
        "task": "causal_lm",
        "model": {"name_or_path": "model"},
        "dataset": {"path": "texts.csv", "text_column": "text"},
        "grid": {
            "gated": {
                "split": ["kmeans"],
                "num_experts": [8],
                "shared_experts": [2],
                "router": ["linear"],
                "recovery": ["kd-softmax"],
                "budgets": [0.5, 1.0],
            }
        },
        "recover": {"budget": 0.5},
        "upcycling": {"models": {"top2": {"experts": 4}}},
        "merging": {"models": ["top2"], "methods": ["average", "reap"], "groups": [2], "recovery": ["none"]},
        "serve": {"budgets": [0.5, 0.75], "upcycled": True, "merged": True, "gguf": ["F32"], "harness": True},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    dry = subprocess.run(
        snakemake_command(tmp_path, "-n"), cwd=tmp_path, capture_output=True, text=True, env=environment(tmp_path)
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    counts = {
        line.split()[0]: int(line.split()[1])
        for line in dry.stdout.splitlines()
        if len(line.split()) == 2 and line.split()[1].isdigit()
    }
    # 2 budgets, 1 upcycled and 2 merged models served; those 5 and the dense model in llama.cpp and in lm-eval
    served = (counts["serve"], counts["serve_upcycled"], counts["serve_merged"], counts["gguf"], counts["harness"])
    assert served == (2, 1, 2, 6, 6)
    assert counts["report_serving"] == 1
    assert "serve/none-seed0/kmeans-E8-S2-linear-kd-softmax-b0.75/served.json" in dry.stdout
    assert "serve/none-seed0/top2-reap-G2/served.json" in dry.stdout
    assert "serve/none-seed0/dense/gguf/gguf.json" in dry.stdout


def test_pruned_and_merged_decoders_are_served_with_moefys_logits(decoder, tmp_path):
    """Pruning (prune, reap) drops experts with their router rows; merging (average, msmoe, hcsmoe,
    ...) keeps the router over the original experts and sums the gates of picks that share a merged
    expert, which one copy of that expert per router slot computes exactly."""
    from types import SimpleNamespace

    from moefy.training.merging import merge_layer

    usage = SimpleNamespace(frequency=torch.ones(4))
    cases = (("prune", [[0], [2], [3]], 3, 0), ("average", [[0, 1], [2], [3]], 4, 1), ("frequency", [[0, 1, 2], [3]], 4, 2))
    for method, groups, slots, copies in cases:
        model = load_model(str(decoder), "causal_lm").eval()
        moes = {}
        for ffn in find_ffns(model):
            full = upcycle(
                ffn, 4, Routing("top_k", k=2), drop_ratio=0.5, router_std=0.5, generator=torch.Generator().manual_seed(ffn.index)
            )
            moes[ffn.index] = merge_layer(full, groups, usage, method)
            ffn.replace(moes[ffn.index])
        out = tmp_path / method
        record = write_served(model, moes, load_tokenizer(str(decoder)), decoder, out)
        assert (record["routed_experts"], record["duplicated_experts"]) == (slots, copies * len(moes))
        served = AutoModelForCausalLM.from_pretrained(out).eval()
        vocab = model.config.vocab_size
        assert torch.allclose(logits(served, vocab), logits(model.eval(), vocab), atol=1e-5, rtol=0)
