"""End to end: the real Snakefile on the shared tiny study (a random BERT, a toy CSV), then the
contracts other tools rely on, the MLflow runs, a one-file rerun, an export, and torchrun with
2 CPU ranks against the plain single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from moefy.measure.evaluation import MEASURES
from moefy.moe.checkpoints import load_moe
from moefy.report.summary import reproducible
from studies import (
    BUDGETS,
    CONVERSIONS,
    D_FF,
    LAYERS,
    REPLICATE,
    ROOT,
    SPLITS,
    THRESHOLDS,
    TINY,
    VARIANT,
    E,
    environment,
    in_study,
    snakemake,
)

RECORD_KEYS = {
    "penalty",
    "seed",
    "split",
    "num_experts",
    "router",
    "budget",
    "experts_per_token",
    "test_accuracy",
    "relative_accuracy",
    "ffn_flops_fraction",
    "ffn_ms_dense",
    "ffn_ms_moe",
    "ffn_speedup",
    "model_flops_fraction",
    "dense_model_flops_per_token",
    "model_ms_dense",
    "model_ms_moe",
    "model_speedup",
    "kernels",
    "precision",
    "looped_kernel",
}

pytestmark = pytest.mark.e2e


def test_finetune_contract(tiny_study):
    model = in_study(tiny_study, "finetune", "model")
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert json.loads((model / "config.json").read_text())["hidden_act"] == "relu"
    training = json.loads((model / "training.json").read_text())
    assert training["penalty"] == "hoyer" and training["seed"] == 0 and training["precision"] == "fp32"
    metrics = json.loads(in_study(tiny_study, "finetune", "metrics.json").read_text())
    assert 0.5 < metrics["test_accuracy"] <= 1.0, "the toy task is learnable; the dense model should beat chance"
    assert metrics["penalty"] == "hoyer" and metrics["machine"]["cpu_capability"]
    assert len(metrics["sparsity_per_layer"]) == LAYERS and all(0 < s < 1 for s in metrics["sparsity_per_layer"])


def test_calibration_contract(tiny_study):
    document = json.loads(in_study(tiny_study, "calibrate", "moe_kernels.json").read_text())
    table = document["shapes"][f"d32-ff{D_FF}-E{E}"]
    assert document["threads"] == 1 and document["machine"]["cores"] >= 1
    # which looped kernel the timings are of: the compiled one, or the Python loop and why
    assert document["looped_kernel"] == "native" or document["looped_kernel"].startswith("python (")
    if os.environ.get("MOEFY_REQUIRE_NATIVE"):  # CI's machines have a compiler: the study measured the compiled loop
        assert document["looped_kernel"] == "native"
    assert len(table["winners"]) == len(table["tokens"]) and {w for row in table["winners"] for w in row} <= {
        "bags",
        "looped",
        "grouped",
        "masked",
    }
    assert all(len(times) == len(table["tokens"]) for times in table["milliseconds"].values())


def test_activations_record_the_co_activation_kernel_they_measured(tiny_study):
    metrics = json.loads(in_study(tiny_study, "activations", "metrics.json").read_text())
    assert metrics["coactivation_kernel"] in ("int8", "float32") and "float32" in metrics["coactivation_probe_seconds"]


def test_balanced_labels_contract(tiny_study):
    for split in SPLITS:
        labels = load_file(in_study(tiny_study, "balance", f"{split}-E{E}", "labels.safetensors"))
        assert sorted(labels) == [f"layer.{i}" for i in range(LAYERS)]
        for tensor in labels.values():
            assert tensor.dtype == torch.int64 and tensor.shape == (D_FF,)
            assert torch.equal(torch.bincount(tensor, minlength=E), torch.full((E,), D_FF // E))
        metrics = json.loads(in_study(tiny_study, "balance", f"{split}-E{E}", "metrics.json").read_text())
        assert {"coact_kept", "excess_coact_kept", "kmeans_objective"} <= set(metrics)


def test_evaluation_contract(tiny_study):
    for split, router in CONVERSIONS:
        records = json.loads(in_study(tiny_study, "evaluate", f"{split}-E{E}-{router}.json").read_text())
        top_k, dynamic = records[: len(BUDGETS)], records[len(BUDGETS) :]
        assert [r["budget"] for r in top_k] == BUDGETS and {r["rule"] for r in top_k} == {"top_k"}
        assert [r["tau"] for r in dynamic] == THRESHOLDS and {r["rule"] for r in dynamic} == {"dynamic"}
        assert all(RECORD_KEYS <= set(r) for r in records)
        assert {(r["penalty"], r["seed"], r["split"], r["num_experts"], r["router"]) for r in records} == {
            ("hoyer", 0, split, E, router)
        }
        for full in (top_k[-1], dynamic[-1]):  # budget 1.0 and tau 1 run every expert: the dense model
            assert full["relative_accuracy"] == 1.0 and full["ffn_flops_fraction"] == 1.0 and full["experts_per_token"] == E
            assert full["kernels"] == "dense" and full["model_flops_fraction"] == pytest.approx(1.0)
        half = top_k[1]
        assert half["experts_per_token"] == E // 2 and half["experts_per_token_std"] == 0
        # half the experts, plus the router's cost if it has one (the oracle has none)
        assert half["ffn_flops_fraction"] == 0.5 if router == "groundtruth" else 0.5 < half["ffn_flops_fraction"] < 0.7
        # the whole model saves less than its FFNs: attention, scores and the head are not converted
        assert half["ffn_flops_fraction"] < half["model_flops_fraction"] < 1 and half["model_ms_moe"] > 0
        assert half["kernels"] != "dense" and all(
            k.split()[0] in ("bags", "looped", "grouped", "masked") for k in half["kernels"].split(", ")
        )
        tau0 = dynamic[0]  # only the top expert(s) of each token
        assert tau0["experts_per_token"] <= dynamic[1]["experts_per_token"] <= E and tau0["experts_per_token"] < 2


def test_summary_contract(tiny_study):
    table = pd.read_csv(in_study(tiny_study, "report", "summary.csv"))
    assert {"penalty", "seed", "split", "num_experts", "router", "rule", "flops_at_99pct", "precision", *RECORD_KEYS} <= set(
        table.columns
    )
    main = (len(CONVERSIONS) + 1) * (len(BUDGETS) + len(THRESHOLDS))  # + kmeans / norm with attention converted
    assert len(table) == main + 2 * len(BUDGETS)  # + the second seed of coact / mlp and the recovered one, top-k only
    assert set(table["penalty"]) == {"hoyer"} and set(table["seed"]) == {0, 1}
    assert (table.groupby(["seed", "split", "router", "rule"])["flops_at_99pct"].nunique() <= 1).all()
    assert in_study(tiny_study, "report", "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    methods = pd.read_csv(in_study(tiny_study, "report", "flops_at_99pct.csv"))
    two_seeds = methods[(methods.split == "coact") & (methods.router == "mlp") & (methods.rule == "top_k")].iloc[0]
    assert two_seeds["seeds"] == 2 and len(two_seeds["flops_at_99pct_per_seed"].split()) == 2
    points = pd.read_csv(in_study(tiny_study, "report", "by_method.csv"))
    assert set(points[(points.split == "coact") & (points.router == "mlp") & (points.rule == "top_k")]["seeds"]) == {2}


def test_a_second_seed_is_a_model_and_conversion_of_its_own(tiny_study):
    """Same config, seed 1: another fine-tune, another split, other numbers; the test texts are the same."""
    labels = [
        load_file(in_study(tiny_study, "balance", "coact-E4", "labels.safetensors", variant=v)) for v in (VARIANT, REPLICATE)
    ]
    assert not any(torch.equal(labels[0][k], labels[1][k]) for k in labels[0])
    evaluations = [
        reproducible(json.loads(in_study(tiny_study, "evaluate", "coact-E4-mlp.json", variant=v).read_text()))
        for v in (VARIANT, REPLICATE)
    ]
    assert [r["seed"] for r in evaluations[1]] == [1] * len(BUDGETS)
    assert [r["test_accuracy"] for r in evaluations[0][: len(BUDGETS)]] != [r["test_accuracy"] for r in evaluations[1]]
    assert json.loads(in_study(tiny_study, "finetune", "model", "training.json", variant=REPLICATE).read_text())["seed"] == 1


def mlflow_runs(study: Path):
    client = MlflowClient(environment(study)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(TINY)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def first_invocation(study: Path):
    """The parent run of the study's first snakemake invocation and its job runs (later tests add more)."""
    runs = mlflow_runs(study)
    first = min((r for r in runs if r.data.tags.get("moefy.kind") == "workflow"), key=lambda r: r.info.start_time)
    return first, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id]


def test_mlflow_parent_and_job_runs(tiny_study):
    first, children = first_invocation(tiny_study)
    rules = sorted(r.data.tags["rule"] for r in children)
    evaluations = len(CONVERSIONS) + 2  # + the second seed's and the converted-attention one
    expected = {
        "data": 1,
        "calibrate": 1,
        "finetune": 2,
        "distill_attention": 1,
        "activations": 3,  # two seeds, and the distilled model
        "split": len(SPLITS) + 2,
        "balance": len(SPLITS) + 2,
        "router": evaluations,
        "evaluate": evaluations + 1,  # + the recovered conversion
        "report": 1,
        "train_moe": 7,  # recovery, the upcycled model, the dense continuation, 4 distillations of merged models
        "upcycle": 1,
        "report_upcycling": 1,
        "usage": 1,
        "merge": 3,  # msmoe-G2, hcsmoe-G2, reap-G2
        "compress": 2,  # msmoe-G2-svd, msmoe-G2-kd-svd
        "evaluate_smoe": 7,  # full, msmoe-G2-svd, msmoe-G2-kd-svd-kd, hcsmoe-G2(-kd), reap-G2(-kd)
        "report_merging": 1,
    }
    assert {rule: rules.count(rule) for rule in set(rules)} == expected
    assert first.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in children)
    seeded = {
        (r.data.tags["wildcard.seed"], r.data.tags["wildcard.split"], r.data.tags["wildcard.router"]): r
        for r in children
        if r.data.tags["rule"] == "evaluate" and r.data.tags["wildcard.convert"] == "ffn"
    }
    assert set(seeded) == {("0", s, q) for s, q in CONVERSIONS} | {("1", "coact", "mlp")}
    attention = [r for r in children if r.data.tags.get("wildcard.convert") == "ffn+attention"]
    assert sorted(r.data.tags["rule"] for r in attention) == ["activations", "balance", "evaluate", "router", "split"]
    coact_mlp = seeded[("0", "coact", "mlp")]
    assert coact_mlp.info.run_name == f"evaluate {VARIANT} coact-E{E}-mlp"
    assert coact_mlp.data.params["batch_size"] == "32" and coact_mlp.data.params["wildcard.num_experts"] == str(E)
    assert {
        "test_accuracy/budget_0.5",
        "relative_accuracy/budget_1",
        "ffn_flops_fraction/budget_0.5",
        "experts_per_token/tau_0.5",
    } <= set(coact_mlp.data.metrics)
    assert coact_mlp.data.tags["wildcard.penalty"] == "hoyer"
    finetune = next(r for r in children if r.data.tags["rule"] == "finetune" and r.data.tags["wildcard.seed"] == "0")
    assert "test_accuracy" in finetune.data.metrics and "sparsity/layer_1" in finetune.data.metrics
    assert finetune.data.tags["precision"] == "fp32"


def test_parallel_jobs_lose_no_mlflow_run_or_metric(tiny_study):
    """The study ran 4 jobs at a time against one fresh SQLite store: one run per job, none twice."""
    jobs = first_invocation(tiny_study)[1]
    keys = [
        (
            r.data.tags["rule"],
            r.data.tags.get("wildcard.seed"),
            r.data.tags.get("wildcard.convert"),
            r.data.tags.get("wildcard.split"),
            r.data.tags.get("wildcard.router"),
            r.data.tags.get("wildcard.recovery"),
            r.data.tags.get("wildcard.mode"),
            r.data.tags.get("wildcard.upcycled"),
            r.data.tags.get("wildcard.merged"),
        )
        for r in jobs
    ]
    conversions = len(CONVERSIONS) + 1
    training = 1 + 3 + 1 + 1  # the recovered evaluate, train_moe, upcycle, report_upcycling
    merging = 1 + 3 + 4 + 2 + 7 + 1  # usage, 3 merges, 4 distillations, 2 compressions, 7 evaluate_smoe, report_merging
    attention = 1 + 1 + 1 + 1 + 2  # distill, then activations, split, balance, router and evaluate of its model
    assert len(keys) == len(set(keys)) == 1 + 1 + 2 + 2 + 4 + 4 + 2 * conversions + 1 + training + merging + attention, (
        "one run per job, none lost, none twice"
    )
    for run in jobs:
        tags = run.data.tags
        if tags["rule"] == "evaluate" and tags["wildcard.seed"] == "0" and tags["wildcard.recovery"] == "none":
            per_rule = 2 + len(MEASURES)  # test and relative metric, then every measure
            assert len(run.data.metrics) == (len(BUDGETS) + len(THRESHOLDS)) * per_rule, run.info.run_name
        if run.data.tags["rule"] == "router":
            assert {f"recall_at_{b:g}" for b in BUDGETS} <= set(run.data.metrics)


def test_asking_for_one_file_reruns_one_ablation(tiny_study):
    target = in_study(tiny_study, "evaluate", f"coact-E{E}-mlp.json")
    before = reproducible(json.loads(target.read_text()))
    target.unlink()
    done = snakemake(tiny_study, str(target.relative_to(tiny_study)))
    assert "evaluate" in done.stderr and "rule finetune:" not in done.stderr and "rule calibrate:" not in done.stderr
    assert reproducible(json.loads(target.read_text())) == before, "the same inputs must give the same evaluation"
    newest = max(
        (r for r in mlflow_runs(tiny_study) if r.data.tags.get("moefy.kind") == "workflow"), key=lambda r: r.info.start_time
    )
    reran = [r for r in mlflow_runs(tiny_study) if r.data.tags.get("mlflow.parentRunId") == newest.info.run_id]
    assert [r.data.tags["rule"] for r in reran] == ["evaluate"]


def test_an_exported_model_predicts_what_evaluate_measured(tiny_study):
    """The export folder (moefy.export.load_moe) and its remote-code form (transformers alone) give
    the predictions evaluate measured at the budget."""
    from transformers import AutoModelForSequenceClassification

    target = in_study(tiny_study, "export", f"coact-E{E}-mlp-b0.5")
    remote = target.with_name(f"{target.name}-remote-code")
    snakemake(tiny_study, str(target.relative_to(tiny_study)), str(remote.relative_to(tiny_study)))
    model, tokenizer = load_moe(target)
    served = AutoModelForSequenceClassification.from_pretrained(remote, trust_remote_code=True).eval()
    rows = [json.loads(line) for line in in_study(tiny_study, "data", "test.jsonl").read_text().splitlines()]
    with torch.no_grad():
        batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1)
        assert torch.equal(served(**batch).logits.argmax(-1), predicted)
    accuracy = float((predicted == torch.tensor([r["label"] for r in rows])).double().mean())
    measured = next(
        r for r in json.loads(in_study(tiny_study, "evaluate", f"coact-E{E}-mlp.json").read_text()) if r["budget"] == 0.5
    )
    assert accuracy == pytest.approx(measured["test_accuracy"])


def run_step(module: str, nproc: int, *args: str, cwd: Path) -> None:
    """A step on one thread per rank: as the workflow runs it on 2 ranks (torch.distributed.run), and
    for one rank its main in this process, which is what the workflow's plain process runs."""
    import importlib

    from moefy.workflow.launch import step_command

    if nproc == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            importlib.import_module(f"moefy.steps.{module}").main(["--device", "cpu", *args])
        finally:
            torch.set_num_threads(threads)
        return
    env = environment(cwd) | {"OMP_NUM_THREADS": "1"}
    cmd = [*step_command(module, nproc, python=sys.executable).split(), "--device", "cpu", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_cpu_ranks_give_the_same_results_as_one(tiny_study, tmp_path, mlflow_store):
    model, data = in_study(tiny_study, "finetune", "model"), in_study(tiny_study, "data")
    for nproc in (1, 2):
        out = tmp_path / f"ranks{nproc}"
        run_step(
            "activations",
            nproc,
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out / "activations"),
            "--max-tokens",
            "3000",
            "--sample-tokens",
            "1500",
            "--batch-size",
            "8",
            cwd=tiny_study,
        )
        run_step(  # layer-parallel, as every split method: each rank splits its own layers
            "split",
            nproc,
            "--model",
            str(model),
            "--split",
            "coact",
            "--num-experts",
            str(E),
            "--coactivation",
            str(out / "activations" / "coactivation.safetensors"),
            "--out",
            str(out / "split" / "coact"),
            cwd=tiny_study,
        )
        run_step(
            "evaluate",
            nproc,
            "--model",
            str(model),
            "--data",
            str(data),
            "--labels",
            str(in_study(tiny_study, "balance", f"coact-E{E}", "labels.safetensors")),
            "--router-file",
            str(in_study(tiny_study, "router", f"coact-E{E}-mlp", "router.safetensors")),
            "--kernels",
            str(in_study(tiny_study, "calibrate", "moe_kernels.json")),
            "--split",
            "coact",
            "--num-experts",
            str(E),
            "--router",
            "mlp",
            "--budgets",
            "0.25",
            "0.5",
            "--thresholds",
            "0.5",
            "--batch-size",
            "8",
            "--out",
            str(out / "evaluate.json"),
            cwd=tiny_study,
        )
    one, two = tmp_path / "ranks1", tmp_path / "ranks2"
    for name in (
        "activations/coactivation.safetensors",
        "activations/hidden.safetensors",
        "split/coact/labels.safetensors",
    ):
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    evaluations = [json.loads((run / "evaluate.json").read_text()) for run in (one, two)]
    assert reproducible(evaluations[0]) == reproducible(evaluations[1])
    assert all(r["ffn_ms_dense"] > 0 and r["ffn_ms_moe"] > 0 for r in evaluations[0])
    counts = load_file(one / "activations" / "coactivation.safetensors")["layer.0"]
    assert np.allclose(counts.numpy(), counts.numpy().T) and counts.sum() > 0


def test_lint_is_clean():
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=ROOT, capture_output=True, text=True, env=environment(ROOT)
    )
    assert done.returncode == 0 and "Lints for" not in done.stdout + done.stderr, done.stdout + done.stderr
