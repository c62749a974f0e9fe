"""End to end: the real Snakefile on a tiny random BERT and a toy CSV, then the contracts other
tools rely on, the MLflow runs, a one-file rerun, and torchrun with 2 CPU ranks against 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from conftest import ROOT, build_tiny_bert, environment, snakemake, write_toy_sentiment
from moefy.export import load_moe
from moefy.report import reproducible

STUDY = "tiny"
SPLITS, SELECTORS, E, D_FF, LAYERS = ["random", "kmeans", "coact"], ["groundtruth", "similarity", "mlp", "norm"], 4, 64, 2
BUDGETS, THRESHOLDS = [0.5, 1.0], [0.0, 0.5, 1.0]
PENALTY = "hoyer"  # the default study's none is the reliability tests' study
RECORD_KEYS = {"budget", "experts_per_token", "test_accuracy", "relative_accuracy", "ffn_flops_fraction",
               "ffn_ms_dense", "ffn_ms_moe", "ffn_speedup"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("study")
    build_tiny_bert(workdir / "model", layers=LAYERS, d_ff=D_FF)
    write_toy_sentiment(workdir / "reviews.csv", rows=400)
    config = {
        "study": STUDY,
        "model": {"name_or_path": "model"},
        "dataset": {"path": "reviews.csv", "text_column": "text", "label_column": "category", "labels": ["rotten", "fresh"]},
        "grid": {"split": SPLITS, "num_experts": [E], "selector": SELECTORS, "sparsity_penalty": [PENALTY]},
        "finetune": {"epochs": 3, "batch_size": 16, "max_length": 32, "learning_rate": 3e-3, "freeze_embeddings": False,
                     "sparsity_weight": 0.05},
        "activations": {"max_tokens": 3000, "sample_tokens": 1500, "batch_size": 32},
        "selector": {"mlp_epochs": 5, "norm_hidden": 16},
        "evaluate": {"budgets": BUDGETS, "thresholds": THRESHOLDS, "batch_size": 32},
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir)
    return workdir


def results(study: Path, step: str, *parts: str) -> Path:
    """results/<study>/<step>/[<penalty>/]...: every step after data is per fine-tuning variant."""
    per_variant = step not in ("data", "report", "logs", "mlflow")
    return study.joinpath("results", STUDY, step, *([PENALTY] if per_variant else []), *parts)


def test_finetune_contract(study):
    model = results(study, "finetune", "model")
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert json.loads((model / "config.json").read_text())["hidden_act"] == "relu"
    metrics = json.loads(results(study, "finetune", "metrics.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1.0, "the toy task is learnable; the dense model should beat chance"
    assert metrics["sparsity_penalty"] == PENALTY
    assert len(metrics["sparsity_per_layer"]) == LAYERS and all(0 < s < 1 for s in metrics["sparsity_per_layer"])


def test_balanced_labels_contract(study):
    for split in SPLITS:
        labels = load_file(results(study, "balance", f"{split}-E{E}", "labels.safetensors"))
        assert sorted(labels) == [f"layer.{i}" for i in range(LAYERS)]
        for tensor in labels.values():
            assert tensor.dtype == torch.int64 and tensor.shape == (D_FF,)
            assert torch.equal(torch.bincount(tensor, minlength=E), torch.full((E,), D_FF // E))
        metrics = json.loads(results(study, "balance", f"{split}-E{E}", "metrics.json").read_text())
        assert {"coact_kept", "excess_coact_kept", "kmeans_objective"} <= set(metrics)


def test_evaluation_contract(study):
    for split in SPLITS:
        for selector in SELECTORS:
            records = json.loads(results(study, "evaluate", f"{split}-E{E}-{selector}.json").read_text())
            top_k, dynamic = records[:len(BUDGETS)], records[len(BUDGETS):]
            assert [r["budget"] for r in top_k] == BUDGETS and {r["rule"] for r in top_k} == {"top_k"}
            assert [r["tau"] for r in dynamic] == THRESHOLDS and {r["rule"] for r in dynamic} == {"dynamic"}
            assert all(RECORD_KEYS <= set(r) for r in records)
            for full in (top_k[-1], dynamic[-1]):  # budget 1.0 and tau 1 run every expert: the dense model
                assert full["relative_accuracy"] == 1.0 and full["ffn_flops_fraction"] == 1.0 and full["experts_per_token"] == E
            assert top_k[0]["experts_per_token"] == E // 2 and 0.5 <= top_k[0]["ffn_flops_fraction"] < 0.7  # + the router, if any
            assert top_k[0]["experts_per_token_std"] == 0
            tau0 = dynamic[0]  # only the top expert(s) of each token
            assert tau0["experts_per_token"] <= dynamic[1]["experts_per_token"] <= E and tau0["experts_per_token"] < 2


def test_summary_contract(study):
    table = pd.read_csv(results(study, "report", "summary.csv"))
    assert {"penalty", "split", "num_experts", "selector", "rule", "flops_at_99pct", *RECORD_KEYS} <= set(table.columns)
    assert len(table) == len(SPLITS) * len(SELECTORS) * (len(BUDGETS) + len(THRESHOLDS))
    assert set(table["penalty"]) == {PENALTY}
    assert (table.groupby(["split", "selector", "rule"])["flops_at_99pct"].nunique() <= 1).all()
    assert results(study, "report", "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"


def mlflow_runs(study: Path):
    client = MlflowClient(environment(study)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(STUDY)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def test_mlflow_parent_and_job_runs(study):
    runs = mlflow_runs(study)
    parents = [r for r in runs if r.data.tags.get("moefy.kind") == "workflow"]
    first = min(parents, key=lambda r: r.info.start_time)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id]
    rules = sorted(r.data.tags["rule"] for r in children)
    expected = {"data": 1, "finetune": 1, "activations": 1, "split": 3, "balance": 3, "selector": 12, "evaluate": 12, "report": 1}
    assert {rule: rules.count(rule) for rule in set(rules)} == expected
    assert first.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    evaluations = {(r.data.tags["wildcard.split"], r.data.tags["wildcard.selector"]): r for r in children if r.data.tags["rule"] == "evaluate"}
    assert set(evaluations) == {(s, q) for s in SPLITS for q in SELECTORS}
    kmeans_mlp = evaluations[("kmeans", "mlp")]
    assert kmeans_mlp.data.params["batch_size"] == "32" and kmeans_mlp.data.params["wildcard.num_experts"] == str(E)
    assert {"test_accuracy/budget_0.5", "relative_accuracy/budget_1", "ffn_flops_fraction/budget_0.5",
            "experts_per_token/tau_0.5"} <= set(kmeans_mlp.data.metrics)
    assert kmeans_mlp.data.tags["wildcard.penalty"] == PENALTY
    finetune = next(r for r in children if r.data.tags["rule"] == "finetune")
    assert "test_accuracy" in finetune.data.metrics and "sparsity/layer_1" in finetune.data.metrics


def test_asking_for_one_file_reruns_one_ablation(study):
    target = results(study, "evaluate", f"kmeans-E{E}-mlp.json")
    before = reproducible(json.loads(target.read_text()))
    target.unlink()
    done = snakemake(study, str(target.relative_to(study)))
    assert "evaluate" in done.stderr and "finetune:" not in done.stderr
    assert reproducible(json.loads(target.read_text())) == before, "the same inputs must give the same evaluation"
    newest = max((r for r in mlflow_runs(study) if r.data.tags.get("moefy.kind") == "workflow"), key=lambda r: r.info.start_time)
    reran = [r for r in mlflow_runs(study) if r.data.tags.get("mlflow.parentRunId") == newest.info.run_id]
    assert [r.data.tags["rule"] for r in reran] == ["evaluate"]


def test_an_exported_model_predicts_what_evaluate_measured(study):
    target = results(study, "export", f"kmeans-E{E}-mlp-b0.5")
    snakemake(study, str(target.relative_to(study)))
    model, tokenizer = load_moe(target)
    rows = [json.loads(line) for line in results(study, "data", "test.jsonl").read_text().splitlines()]
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1)
    accuracy = float((predicted == torch.tensor([r["label"] for r in rows])).double().mean())
    measured = next(r for r in json.loads(results(study, "evaluate", f"kmeans-E{E}-mlp.json").read_text()) if r["budget"] == 0.5)
    assert accuracy == pytest.approx(measured["test_accuracy"])


def torchrun(module: str, nproc: int, *args: str, cwd: Path) -> None:
    env = environment(cwd) | {"OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", f"moefy.steps.{module}",
           "--device", "cpu", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_cpu_ranks_give_the_same_results_as_one(study, tmp_path):
    model, data = results(study, "finetune", "model"), results(study, "data")
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        torchrun("activations", nproc, "--model", str(model), "--data", str(data), "--out", str(out / "activations"),
                 "--max-tokens", "3000", "--sample-tokens", "1500", "--batch-size", "8", cwd=study)
        for method in ("coact", "kmeans"):  # layer-parallel: each rank splits its own layers
            torchrun("split", nproc, "--model", str(model), "--method", method, "--num-experts", str(E),
                     "--coactivation", str(out / "activations" / "coactivation.safetensors"),
                     "--out", str(out / "split" / method), cwd=study)
        torchrun("evaluate", nproc, "--model", str(model), "--data", str(data), "--labels", str(results(study, "balance", f"kmeans-E{E}", "labels.safetensors")),
                 "--router", str(results(study, "selector", f"kmeans-E{E}-mlp", "router.safetensors")),
                 "--split", "kmeans", "--num-experts", str(E), "--selector", "mlp", "--budgets", "0.25", "0.5", "--thresholds", "0.5",
                 "--batch-size", "8", "--out", str(out / "evaluate.json"), cwd=study)
    one, two = tmp_path / "ranks1", tmp_path / "ranks2"
    for name in ("activations/coactivation.safetensors", "activations/hidden.safetensors",
                 "split/coact/labels.safetensors", "split/kmeans/labels.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    evaluations = [json.loads((run / "evaluate.json").read_text()) for run in (one, two)]
    assert reproducible(evaluations[0]) == reproducible(evaluations[1])
    assert all(r["ffn_ms_dense"] > 0 and r["ffn_ms_moe"] > 0 for r in evaluations[0])
    counts = load_file(one / "activations" / "coactivation.safetensors")["layer.0"]
    assert np.allclose(counts.numpy(), counts.numpy().T) and counts.sum() > 0


def test_lint_is_clean():
    done = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True,
                          env=environment(ROOT))
    assert done.returncode == 0 and "Lints for" not in done.stdout + done.stderr, done.stdout + done.stderr
