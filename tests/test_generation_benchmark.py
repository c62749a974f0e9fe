"""benchmarks/generation_speed.py runs end to end on a tiny LLaMA, and its exported MoE is the dense
model at budget 1.0 (the full run on SmolLM2 takes minutes; this takes seconds)."""

import json

import pytest
from test_benchmarks import load_benchmark

from builders import build_tiny, build_tiny_bert
from moefy.errors import MoefyError


@pytest.fixture(scope="module")
def generation_speed():
    return load_benchmark("generation_speed")


def llama_whose_ffns_decide(folder):
    """builders.py's tiny random LLaMA (hidden 32, 2 layers, d_ff 64, the toy tokenizer) with its FFN
    outputs scaled up: at random init they barely move the residual stream, so an export that broke
    the FFNs would still generate the dense tokens."""
    from transformers import LlamaForCausalLM

    build_tiny("llama", folder)
    model = LlamaForCausalLM.from_pretrained(folder)
    for layer in model.model.layers:
        layer.mlp.down_proj.weight.data.mul_(10)
    model.save_pretrained(folder)
    return folder


def test_quick_run_reports_each_row_and_budget_one_generates_the_dense_tokens(generation_speed, tmp_path, mlflow_store):
    model = llama_whose_ffns_decide(tmp_path / "llama")
    out = tmp_path / "generation.json"
    generation_speed.main(
        ["--model", str(model), "--num-experts", "8", "--quick", "--budgets", "0.25", "1.0", "--json", str(out)]
    )
    result = json.loads(out.read_text())
    rows = {row["case"]: row for row in result["rows"]}
    assert list(rows) == ["dense", "b=0.25", "b=1"] and result["quick"]
    assert all(r["tokens_per_s"] > 0 and r["prefill_ms"] > 0 and len(r["tokens"]) == r["new_tokens"] == 8 for r in rows.values())
    assert rows["b=0.25"]["k"] == 2 and rows["b=1"]["k"] == 8
    assert sum(rows["b=0.25"]["kernel_calls"].values()) > 0, "the MoE's own kernels ran at budget 0.25"
    assert rows["b=1"]["kernel_calls"] == {}, "every expert: the dense matmuls, no kernel"
    assert rows["b=1"]["tokens"] == rows["dense"]["tokens"] and rows["b=1"]["same_tokens_as_dense"]
    assert rows["b=0.25"]["tokens"] != rows["dense"]["tokens"], "the FFNs decide the tokens, so the check above means something"
    assert rows["b=0.25"]["matmul_bound"] > 1 == rows["b=1"]["matmul_bound"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.rule = 'generation_speed'")[0]
    assert run.data.metrics["b_0.25/tokens_per_s"] == pytest.approx(rows["b=0.25"]["tokens_per_s"])


def test_a_model_without_a_next_token_head_or_an_expert_count_that_does_not_divide_d_ff_is_refused(generation_speed, tmp_path):
    with pytest.raises(MoefyError, match="causal_lm"):
        generation_speed.main(["--model", str(build_tiny_bert(tmp_path / "bert")), "--quick", "--no-mlflow"])
    with pytest.raises(MoefyError, match="cannot split d_ff=64"):
        generation_speed.main(
            ["--model", str(build_tiny("llama", tmp_path / "llama")), "--num-experts", "5", "--quick", "--no-mlflow"]
        )
