"""The tiny study's ffn+attention arm end to end: distill, then the conversion chain of
<variant>-attention, evaluated against the fine-tuned model, and the report's whole-model column."""

import json

import pandas as pd
import pytest

from moefy.adapters.models import load_model
from moefy.files import read_json
from studies import ATTENTION, LAYERS, E, in_study

CONVERSION = f"kmeans-E{E}-norm"


@pytest.fixture(scope="module")
def records(tiny_study):
    def of(variant):
        return {
            (r["rule"], r["budget"] or r["tau"]): r
            for r in json.loads(in_study(tiny_study, "evaluate", f"{CONVERSION}.json", variant=variant).read_text())
        }

    return of(ATTENTION), of("hoyer-seed0")


def test_the_distilled_model_has_every_projection_as_an_mlp_that_splits_into_the_grids_experts(tiny_study):
    report = read_json(in_study(tiny_study, "distill_attention", "model", "distillation.json"))["projections"]
    assert sorted(report) == sorted(f"{layer}.{p}" for layer in range(LAYERS) for p in "qkvo")
    assert all(entry["width"] % E == 0 and entry["mse"] <= entry["mse_initial"] for entry in report.values())
    assert all(entry["r2"] > 0.8 for key, entry in report.items() if not key.endswith(".o")), report
    for step in ("activations", "split", "balance", "router"):
        assert in_study(tiny_study, step, variant=ATTENTION).is_dir(), step


def test_attention_evaluations_are_against_the_fine_tuned_model_and_count_the_whole_model(tiny_study, records):
    attention, ffn_only = records
    model = load_model(str(in_study(tiny_study, "finetune", "model")))
    hidden = model.config.hidden_size
    for key, record in attention.items():
        assert record["convert"] == "ffn+attention" and ffn_only[key]["convert"] == "ffn"
        # relative to the fine-tuned model, with the same dense FLOPs: not to the distilled one
        assert record["dense_test_accuracy"] == ffn_only[key]["dense_test_accuracy"]
        assert record["dense_model_flops_per_token"] == pytest.approx(ffn_only[key]["dense_model_flops_per_token"])
        if key[0] == "top_k":  # the same k of the same FFN shapes, the same kind of router
            assert record["ffn_flops_fraction"] == pytest.approx(ffn_only[key]["ffn_flops_fraction"])
    # every expert: the distilled model, whose 2 x 4 MLPs of width w cost 2 x (hidden x w + w x hidden)
    # where their projections cost 2 x hidden x hidden
    report = read_json(in_study(tiny_study, "distill_attention", "model", "distillation.json"))["projections"]
    (width,) = {entry["width"] for entry in report.values()}
    full = attention[("top_k", 1.0)]
    extra = LAYERS * 4 * (4 * hidden * width - 2 * hidden * hidden)
    assert full["projection_flops_fraction"] == pytest.approx(2 * width / hidden)
    assert full["model_flops_fraction"] == pytest.approx(1 + extra / full["dense_model_flops_per_token"])
    quarter = attention[("top_k", 0.25)]
    norm_router = 2 * (hidden * 16 + 16 * E)  # router.norm_hidden 16 in the tiny study
    assert quarter["projection_flops_fraction"] == pytest.approx(0.25 * 2 * width / hidden + norm_router / (2 * hidden * hidden))
    assert (
        quarter["model_flops_fraction"] < full["model_flops_fraction"]
        and "projection_flops_fraction" not in ffn_only[("top_k", 0.25)]
    )


def test_the_report_has_the_attention_curves_and_their_whole_model_flops_at_99pct(tiny_study):
    table = pd.read_csv(in_study(tiny_study, "report", "flops_at_99pct.csv"))
    rows = table[(table["convert"] == "ffn+attention") & (table["router"] == "norm")]
    assert set(rows["rule"]) == {"top_k", "dynamic"} and "model_flops_at_99pct_mean" in table
    summary = pd.read_csv(in_study(tiny_study, "report", "summary.csv"))
    assert summary[summary["convert"] == "ffn+attention"]["projection_flops_fraction"].notna().all()
    assert summary[summary["convert"] == "ffn"]["projection_flops_fraction"].isna().all()
