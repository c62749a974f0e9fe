"""End to end on the other families: the real Snakefile on a tiny T5 (classification, ReLU FFNs
in encoder and decoder) and a tiny LLaMA (causal language modelling, gated SiLU FFNs kept), then
what each task's evaluations must satisfy: one conversion of the T5, the decoder conversions of
2025-26 on the LLaMA."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from builders import build_tiny, write_toy_sentiment
from moefy.conversion.routers import SoftmaxGate
from studies import diagonal, finish_snakemake, start_snakemake

pytestmark = pytest.mark.e2e

E, D_FF = 4, 64
# One conversion on T5: the shared tiny study runs every split and router on BERT, and
# test_families every router on every family; this checks that the whole chain runs on T5. The LLaMA
# runs the decoder arms below instead.
CONVERSIONS = [("coact", "mlp")]
BUDGETS = [0.5, 1.0]
VARIANT = "none-seed0"


# The decoder conversion of 2025-26 on the LLaMA: 2 of 8 experts shared, the training-free router,
# uniform and per-layer budgets; and the same conversion routed by a linear router, recovered with
# distillation and its softmax gates trained (one recovery keeps the suite's time: an unweighted
# one runs in tests/test_train_moe.py).
SHARED_ARM = {
    "split": ["kmeans"],
    "num_experts": [8],
    "shared_experts": [2],
    "router": ["representative"],
    "allocation": ["uniform", "sensitivity"],
}
GATED_ARM = SHARED_ARM | {"router": ["linear"], "recovery": ["kd-softmax"]}


def write_study(workdir: Path, family: str, task: str, finetune: dict, arms: dict | None = None) -> Path:
    build_tiny(family, workdir / "model", d_ff=D_FF)
    write_toy_sentiment(workdir / "reviews.csv", rows=300)
    write_toy_sentiment(workdir / "other.csv", rows=60, seed=1, mixed=True)  # the second corpus of causal_lm
    config = {
        "study": "tiny",
        "task": task,
        "model": {"name_or_path": "model"},
        "dataset": {"path": "reviews.csv", "text_column": "text", "label_column": "category", "labels": ["rotten", "fresh"]},
        "grid": arms or diagonal(CONVERSIONS),
        "recover": {"budget": 0.5},
        "split": {"shared_by": "mass"},  # the hidden-state sample's summed |h| (firing: tests/test_shared_experts.py)
        "train_moe": {"epochs": 1, "batch_size": 16},
        "finetune": {
            "batch_size": 16,
            "max_length": 32,
            "learning_rate": 3e-3,
            "freeze_embeddings": False,
            "precision": "fp32",
            **finetune,
        },
        "activations": {"max_tokens": 2000, "sample_tokens": 1000, "batch_size": 32},
        "router": {"mlp_epochs": 3},
        "evaluate": {"budgets": BUDGETS, "batch_size": 32},
    }
    if task == "causal_lm":
        config["second_corpus"] = {"path": "other.csv", "max_texts": 40}
        config["serve"] = {"budgets": [0.5]}  # the gated arm's recovery, as a transformers MoE class
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """Both studies, run side by side: each is a chain of a few jobs at a time, so together they keep
    the cores busy."""
    workdirs = {
        "t5": write_study(tmp_path_factory.mktemp("t5"), "t5", "classification", {"epochs": 2, "activation": "relu"}),
        "llama": write_study(
            tmp_path_factory.mktemp("llama"),
            "llama",
            "causal_lm",
            {"epochs": 1, "activation": "keep"},
            {"shared": SHARED_ARM, "gated": GATED_ARM},
        ),
    }
    running = {name: start_snakemake(workdir) for name, workdir in workdirs.items()}
    for name, proc in running.items():
        finish_snakemake(proc, workdirs[name])
    return {name: workdir / "results" / "tiny" for name, workdir in workdirs.items()}


@pytest.fixture(scope="module")
def t5_study(studies) -> Path:
    return studies["t5"]


@pytest.fixture(scope="module")
def llama_study(studies) -> Path:
    return studies["llama"]


def test_t5_labels_cover_encoder_and_decoder_layers(t5_study):
    labels = load_file(t5_study / "balance" / VARIANT / f"coact-E{E}" / "labels.safetensors")
    assert sorted(labels) == [f"layer.{i}" for i in range(4)]  # 2 encoder + 2 decoder blocks
    metrics = json.loads((t5_study / "finetune" / VARIANT / "metrics.json").read_text())
    dense = json.loads((t5_study / "evaluate" / VARIANT / f"coact-E{E}-mlp.json").read_text())[-1]
    assert (
        metrics["task"] == "classification" and metrics["test_accuracy"] == dense["test_accuracy"] == dense["dense_test_accuracy"]
    )
    assert json.loads((t5_study / "finetune" / VARIANT / "model" / "config.json").read_text())["feed_forward_proj"] == "relu"


def test_t5_evaluations_match_dense_at_full_budget(t5_study):
    for split, router in CONVERSIONS:
        records = json.loads((t5_study / "evaluate" / VARIANT / f"{split}-E{E}-{router}.json").read_text())
        assert [r["budget"] for r in records] == BUDGETS
        assert records[-1]["relative_accuracy"] == 1.0 and records[-1]["dense_agreement"] == 1.0
        assert records[0]["experts_per_token"] == E // 2


def test_llama_causal_lm_reports_perplexity(llama_study):
    metrics = json.loads((llama_study / "finetune" / VARIANT / "metrics.json").read_text())
    assert metrics["task"] == "causal_lm" and "test_accuracy" not in metrics
    assert 1 < metrics["test_perplexity"] < 39  # learned something over a uniform guess on 39 tokens
    sparsity = json.loads((llama_study / "activations" / VARIANT / "metrics.json").read_text())["sparsity_per_layer"]
    assert sparsity == pytest.approx([0.9, 0.9], abs=0.02)  # SiLU never 0: the top 10% by |h| fire
    records = json.loads((llama_study / "evaluate" / VARIANT / "kmeans-E8-S2-representative.json").read_text())
    full = next(r for r in records if r["budget"] == 1.0 and r["allocation"] == "uniform")
    assert full["relative_perplexity"] == 1.0 and full["dense_agreement"] == 1.0
    assert full["test_perplexity"] == pytest.approx(metrics["test_perplexity"], rel=1e-4)
    assert records[0]["test_perplexity"] != full["test_perplexity"]  # half the experts change the model
    table = pd.read_csv(llama_study / "report" / "summary.csv")
    assert {"test_perplexity", "relative_perplexity", "dense_test_perplexity"} <= set(table.columns)
    # the shared and the gated arm: 2 budgets x 2 allocations each (budget 1.0 runs every expert in both)
    assert len(table) == 2 * 2 * 2
    assert (llama_study / "report" / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"


def test_llama_data_has_texts_only(llama_study):
    first = json.loads((llama_study / "data" / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text"}
    router = load_file(llama_study / "router" / VARIANT / "kmeans-E8-S2-linear" / "router.safetensors")
    assert router["layer.0.proj.weight"].shape == (6, 32) and torch.isfinite(router["layer.0.proj.weight"]).all()


def test_llama_with_shared_experts_per_layer_budgets_and_recovery(llama_study):
    """2 of 8 experts shared: budget 0.5 is 4 active experts, the shared 2 and 2 routed, in every
    layer or spread over the layers by their error curves at the same FLOPs."""
    dense = json.loads((llama_study / "finetune" / VARIANT / "metrics.json").read_text())["test_perplexity"]
    labels = load_file(llama_study / "balance" / VARIANT / "kmeans-E8-S2" / "labels.safetensors")
    assert all(torch.bincount(t).tolist() == [D_FF // 8] * 8 for t in labels.values())
    kernels = json.loads((llama_study / "calibrate" / "moe_kernels.json").read_text())["shapes"]
    assert "d32-ff48-E6-gated" in kernels, "the kernels were measured on the routed part, 6 experts of 8 neurons"
    router = load_file(llama_study / "router" / VARIANT / "kmeans-E8-S2-representative" / "router.safetensors")
    assert router["layer.0.scale"].shape == (6,), "the training-free router scores the 6 routed experts"
    assert router["error_curve.0"].shape == (7,) and router["error_curve.0"][-1] < 1e-9
    for name in ("kmeans-E8-S2-representative", "kmeans-E8-S2-linear-kd-softmax"):
        records = {
            (r["budget"], r["allocation"]): r
            for r in json.loads((llama_study / "evaluate" / VARIANT / f"{name}.json").read_text())
        }
        assert set(records) == {(0.5, "uniform"), (0.5, "sensitivity"), (1.0, "uniform"), (1.0, "sensitivity")}
        uniform, spread = records[(0.5, "uniform")], records[(0.5, "sensitivity")]
        assert uniform["shared_experts"] == 2 and uniform["k"] == 2 and uniform["layer_k"] is None
        assert sum(spread["layer_k"]) == 2 * len(spread["layer_k"]) and min(spread["layer_k"]) >= 1
        assert spread["ffn_flops_fraction"] == pytest.approx(uniform["ffn_flops_fraction"])
        # 4 of 8 experts' FLOPs, the router's on top
        assert 0.5 < uniform["ffn_flops_fraction"] < 0.6
        full = records[(1.0, "uniform")]
        assert full["dense_test_perplexity"] == pytest.approx(dense, rel=1e-4), "both against the fine-tuned model"
        assert all(r["second_test_perplexity"] > 1 for r in records.values()), "the second corpus is measured too"
        if "-kd" not in name:
            assert full["relative_perplexity"] == 1.0 and full["second_relative_perplexity"] == 1.0
            assert uniform["second_relative_perplexity"] != 1.0
    recovered = json.loads((llama_study / "recover" / VARIANT / "kmeans-E8-S2-linear-kd-softmax" / "metrics.json").read_text())
    assert recovered["k"] == 2 and recovered["train_steps"] > 0


def test_llama_recovered_with_softmax_gates(llama_study):
    """The linear router trained with its gates: the recovery's router file holds them, and evaluate
    weighs the picks by them at every budget, the dense model its reference."""
    name = "kmeans-E8-S2-linear-kd-softmax"
    router = load_file(llama_study / "recover" / VARIANT / name / "router.safetensors")
    assert router["layer.0.proj.weight"].shape == (6, 32) and "layer.0.gate.scale" in router
    assert float(router["layer.0.gate.scale"]) >= SoftmaxGate.MIN_SCALE * (1 - 1e-6), "the scale stays above its floor"
    untrained = load_file(llama_study / "router" / VARIANT / "kmeans-E8-S2-linear" / "router.safetensors")
    assert not torch.equal(router["layer.0.proj.weight"], untrained["layer.0.proj.weight"]), "the router trained"
    dense = json.loads((llama_study / "finetune" / VARIANT / "metrics.json").read_text())["test_perplexity"]
    records = {
        r["budget"]: r
        for r in json.loads((llama_study / "evaluate" / VARIANT / f"{name}.json").read_text())
        if r["allocation"] == "uniform"
    }
    assert set(records) == {0.5, 1.0}
    assert records[0.5]["k"] == 2 and records[1.0]["experts_per_token"] == 6
    assert records[1.0]["dense_test_perplexity"] == pytest.approx(dense, rel=1e-4)
    assert records[1.0]["relative_perplexity"] != 1.0, "gates weigh every expert, even all of them"


def test_llama_recovery_served_as_a_transformers_moe_class(llama_study):
    """serve.budgets: the softmax-gated recovery at budget 0.5 as a Qwen2-MoE folder, loaded with
    remote code off, 2 of 6 routed experts per token beside the 2 shared ones' neurons."""
    served = llama_study / "serve" / VARIANT / "kmeans-E8-S2-linear-kd-softmax-b0.5"
    record = json.loads((served / "served.json").read_text())
    assert record["architecture"] == "Qwen2MoeForCausalLM" and record["logit_difference"] <= 1e-5
    model = AutoModelForCausalLM.from_pretrained(served / "model", trust_remote_code=False)
    config = model.config
    assert (config.num_experts, config.num_experts_per_tok, config.shared_expert_intermediate_size) == (6, 2, 2 * D_FF // 8)
    assert (served / "model" / "tokenizer_config.json").is_file()
    report = pd.read_csv(llama_study / "report" / "serving.csv")
    assert report["served"].tolist() == ["kmeans-E8-S2-linear-kd-softmax-b0.5"]
    assert report["logit_difference"].iloc[0] == pytest.approx(record["logit_difference"])
