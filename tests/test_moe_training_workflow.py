"""End to end on the shared tiny study: a recovered conversion evaluated beside the unrecovered
one, an upcycled model and the dense continuation, the report's upcycling table and plot, the
upcycled model merged and compressed (MC-SMoE), merged by HC-SMoE and pruned by REAP, with the
report's merging table, and their MLflow runs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from test_workflow import first_invocation

from moefy.adapters.models import load_model
from moefy.files import read_json
from moefy.moe.checkpoints import load_sparse_moe
from studies import BUDGETS, MERGED, RECOVERED, UPCYCLED_MODELS, VARIANT, E, in_study

pytestmark = pytest.mark.e2e


def test_a_recovered_conversion_is_evaluated_against_the_dense_model(tiny_study):
    recovered = json.loads(in_study(tiny_study, "evaluate", f"{RECOVERED}.json").read_text())
    plain = json.loads(in_study(tiny_study, "evaluate", f"kmeans-E{E}-similarity.json").read_text())
    assert [r["budget"] for r in recovered] == BUDGETS and {r["recovery"] for r in recovered} == {"kd"}
    assert {r["recovery"] for r in plain} == {"none"}
    # relative numbers stay relative to the fine-tuned model, not to the recovered one
    assert {r["dense_test_accuracy"] for r in recovered} == {plain[0]["dense_test_accuracy"]}
    full = recovered[-1]
    assert full["budget"] == 1.0 and full["relative_accuracy"] == full["test_accuracy"] / full["dense_test_accuracy"]
    training = read_json(in_study(tiny_study, "recover", RECOVERED, "metrics.json"))
    assert training["mode"] == "recover" and training["recovery"] == "kd" and training["k"] == 1  # budget 0.2 of 4
    assert training["train_steps"] == 8 and "validation_distill_loss" in training["history"][0]
    # only expert weights changed: attention and embeddings are the fine-tuned model's
    dense = load_model(str(in_study(tiny_study, "finetune", "model"))).state_dict()
    after = load_model(str(in_study(tiny_study, "recover", RECOVERED, "model"))).state_dict()
    changed = {k for k in dense if not torch.equal(dense[k], after[k])}
    assert changed and all(".intermediate." in k or (".output.dense." in k and "attention" not in k) for k in changed), changed
    summary = pd.read_csv(in_study(tiny_study, "report", "summary.csv"))
    assert set(summary[(summary.split == "kmeans") & (summary.router == "similarity")]["recovery"]) == {"none", "kd"}


def test_upcycled_models_and_dense_continuation(tiny_study):
    trained = {name: read_json(in_study(tiny_study, "upcycle", name, "metrics.json")) for name in [*UPCYCLED_MODELS, "dense"]}
    assert {m["train_steps"] for m in trained.values()} == {8}, "the same steps for every model"
    assert len({m["train_tokens"] for m in trained.values()}) == 1, "on the same batches"
    choice, dense = trained["expert-choice"], trained["dense"]
    assert choice["upcycling"]["layers"] == [1] and choice["upcycling"]["routing"]["kind"] == "expert_choice"
    assert choice["upcycling"]["drop_ratio"] == 0.5 and choice["upcycled"] == "expert-choice"
    assert dense["ffn_flops_fraction"] == 1.0 and dense["total_parameters"] == dense["active_parameters"]
    # each token takes 2 of 4 copies on average (capacity 2 T / E each) in one of the two FFNs: (1 + 2) / 2, plus a router
    assert 1.5 < choice["ffn_flops_fraction"] < 1.55 and choice["total_parameters"] > dense["total_parameters"]
    assert 0 <= choice["test_dropped_share"] < 1 and 1 <= choice["test_load_max_over_mean"]
    model, moes, _ = load_sparse_moe(in_study(tiny_study, "upcycle", "expert-choice", "model"))
    assert sorted(moes) == [1] and moes[1].num_experts == E and moes[1].routing.kind == "expert_choice"
    initial = read_json(in_study(tiny_study, "upcycle", "expert-choice", "initial", "metrics.json"))
    assert initial["total_parameters"] == choice["total_parameters"]

    table = pd.read_csv(in_study(tiny_study, "report", "upcycling.csv"))
    assert sorted(table["upcycled"]) == sorted([*UPCYCLED_MODELS, "dense"]) and set(table["penalty"]) == {"hoyer"}
    dense_row = table[table.upcycled == "dense"].iloc[0]
    assert dense_row["accuracy_minus_dense"] == 0 and dense_row["routing"] == "dense"
    row = table[table.upcycled == "expert-choice"].iloc[0]
    assert row["accuracy_minus_dense"] == pytest.approx(choice["test_accuracy"] - dense["test_accuracy"])
    assert row["routing"] == "expert_choice" and row["capacity_factor"] == 2.0
    assert in_study(tiny_study, "report", "upcycling.png").read_bytes()[:4] == b"\x89PNG"


def test_training_jobs_log_one_mlflow_run_each(tiny_study):
    _, children = first_invocation(tiny_study)
    trained = [r for r in children if r.data.tags["rule"] == "train_moe" and r.data.tags["wildcard.mode"] != "merged"]
    names = sorted(r.info.run_name for r in trained)
    assert names == sorted(
        [f"train_moe {VARIANT} {RECOVERED}", f"train_moe {VARIANT} dense"] + [f"train_moe {VARIANT} {n}" for n in UPCYCLED_MODELS]
    )
    assert sorted(r.info.run_name for r in children if r.data.tags["rule"] == "upcycle") == sorted(
        f"upcycle {VARIANT} {n}" for n in UPCYCLED_MODELS
    )
    assert [r.data.tags["rule"] for r in children].count("report_upcycling") == 1
    by_name = {r.info.run_name.split()[-1]: r for r in trained}
    for run in trained:
        assert run.info.status == "FINISHED" and {"test_accuracy", "train_flops", "validation_accuracy"} <= set(run.data.metrics)
    upcycled = by_name["expert-choice"]
    assert {"train_load_max_over_mean", "test_load_max_over_mean/layer_1", "test_dropped_share"} <= set(upcycled.data.metrics)
    assert upcycled.data.tags["wildcard.mode"] == "moe" and by_name["dense"].data.tags["wildcard.mode"] == "dense"
    recover = by_name[RECOVERED]
    assert "validation_distill_loss" in recover.data.metrics and recover.data.tags["wildcard.recovery"] == "kd"


def test_the_upcycled_model_merged_compressed_and_distilled(tiny_study):
    name = next(iter(UPCYCLED_MODELS))
    records = {m: read_json(in_study(tiny_study, "merge", name, "evaluate", f"{m}.json")) for m in MERGED}
    full, oneshot, distilled = (records[m] for m in MERGED[:3])
    usage = read_json(in_study(tiny_study, "merge", name, "usage", "metrics.json"))
    assert usage["calibration_examples"] == 64 and usage["experts"] == {"1": E} and 0 < usage["mean_weight_cosine"] < 1
    assert len(usage["reap"]["1"]) == E and max(usage["reap"]["1"]) > 0
    assert full["experts_per_layer"] == {"1": E} and oneshot["experts_per_layer"] == {"1": 2}
    assert oneshot["method"] == distilled["method"] == "mcsmoe" and distilled["recovery"] == "kd"
    assert full["recovery_steps"] == oneshot["recovery_steps"] == 0 and distilled["recovery_steps"] == 16  # 8 + 8
    assert oneshot["bytes_on_disk"] < full["bytes_on_disk"] and oneshot["expert_parameters"] < full["expert_parameters"] / 2
    merged = read_json(in_study(tiny_study, "merge", name, "msmoe-G2", "metrics.json"))
    assert sorted(sum(merged["groups_by_layer"]["1"], [])) == list(range(E)), "every expert in one group"
    for method in ("hcsmoe", "reap"):  # HC-SMoE merged, REAP pruned, one-shot and distilled
        assert records[f"{method}-G2"]["method"] == method and records[f"{method}-G2-kd"]["recovery"] == "kd"
        assert records[f"{method}-G2"]["experts_per_layer"] == {"1": 2}
    clustered = read_json(in_study(tiny_study, "merge", name, "hcsmoe-G2", "metrics.json"))["groups_by_layer"]["1"]
    assert sorted(sum(clustered, [])) == list(range(E))
    _, pruned, _ = load_sparse_moe(in_study(tiny_study, "merge", name, "reap-G2", "model"))
    assert pruned[1].num_experts == pruned[1].router_experts == 2  # the router's rows of the pruned experts removed
    model, moes, _ = load_sparse_moe(in_study(tiny_study, "merge", name, "msmoe-G2-kd-svd-kd", "model"))
    assert moes[1].num_experts == 2 and moes[1].router_experts == E and set(moes[1].factored) == {"w_in", "w_out"}

    table = pd.read_csv(in_study(tiny_study, "report", "merging.csv"))
    assert sorted(table["merged"]) == sorted(MERGED)
    row = table.set_index("merged")
    assert row.loc["full", "accuracy_vs_full"] == 1.0 and row.loc["full", "memory_vs_full"] == 1.0
    assert row.loc["msmoe-G2-svd", "memory_vs_full"] < 1 and not pd.isna(row.loc["full", "accuracy_minus_dense"])
    assert in_study(tiny_study, "report", "merging.png").read_bytes()[:4] == b"\x89PNG"
    ranks = pd.read_csv(in_study(tiny_study, "report", "merging_ranks.csv"))  # the classification arm: accuracy only
    assert set(ranks["metric"]) == {"accuracy"} and set(ranks["experts_kept"]) == {0.5}
    assert sorted(zip(ranks["recovery"], ranks["method"])) == [
        (r, m) for r in ("kd", "none") for m in ("hcsmoe", "mcsmoe", "reap")
    ]
    statements = in_study(tiny_study, "report", "merging_flips.txt").read_text().splitlines()
    assert statements[0] == "50% of the experts kept, recovery none:" and "  no flip: one ranking" in statements

    _, children = first_invocation(tiny_study)
    runs = [r for r in children if r.data.tags["rule"] in ("usage", "merge", "compress", "evaluate_smoe", "report_merging")]
    runs += [r for r in children if r.data.tags["rule"] == "train_moe" and r.data.tags["wildcard.mode"] == "merged"]
    assert sorted(r.info.run_name for r in runs if r.data.tags["rule"] == "evaluate_smoe") == sorted(
        f"evaluate_smoe {VARIANT} {name} {m}" for m in MERGED
    )
    assert sorted(r.data.tags["rule"] for r in runs).count("train_moe") == 4  # msmoe-G2-kd(-svd-kd), hcsmoe-, reap-G2-kd
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all("bytes_on_disk" in r.data.metrics for r in runs if r.data.tags["rule"] == "evaluate_smoe")
