"""The served-models report: one row per served folder and dense model, speed relative to the dense
model of the same variant in the same GGUF type."""

import json

import pytest

from moefy.errors import MoefyError
from moefy.report.serving import decode_summary, serving_table
from moefy.steps import report_serving


def write(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def gguf(outtype, perplexity, decode, prompt=100.0):
    return {"type": outtype, "bytes": 10, "perplexity": perplexity, "prompt_tokens_per_s": prompt, "decode_tokens_per_s": decode}


@pytest.fixture
def records(tmp_path):
    serve = tmp_path / "serve" / "none-seed0"
    served = [
        write(
            serve / name / "served.json",
            {
                "architecture": "Qwen2MoeForCausalLM",
                "routed_experts": 6,
                "experts_per_token": k,
                "logit_difference": 2e-6,
                "bytes": 5,
            },
        )
        for name, k in (("a-b0.5", 3), ("a-b0.25", 1))
    ]
    measured = {"dense": (10.0, 40.0, 100.0), "a-b0.5": (12.0, 50.0, 110.0), "a-b0.25": (20.0, 80.0, 300.0)}
    ggufs = [
        write(serve / name / "gguf" / "gguf.json", {"records": [gguf("F32", p, f32), gguf("Q8_0", p + 0.1, q8)]})
        for name, (p, f32, q8) in measured.items()
    ]
    harness = [
        write(serve / name / "harness.json", {"offline": {"perplexity": p, "same_as_evaluate": True}})
        for name, (p, _, _) in measured.items()
    ]
    return served, ggufs, harness


def test_each_served_model_gets_its_measurements_and_its_speed_against_its_own_dense_model(records):
    table = serving_table(*records).set_index("served")
    assert list(table.index) == ["dense", "a-b0.25", "a-b0.5"]  # dense first
    assert table.loc["a-b0.25", "F32_decode_vs_dense"] == pytest.approx(2.0)
    assert table.loc["a-b0.25", "Q8_0_decode_vs_dense"] == pytest.approx(3.0)
    assert table.loc["a-b0.5", "Q8_0_perplexity"] == pytest.approx(12.1)
    assert table.loc["a-b0.5", "experts_per_token"] == 3
    assert table.loc["dense", "F32_decode_vs_dense"] == 1.0
    assert table.loc["a-b0.5", "harness_perplexity"] == 12.0
    assert "F32_decode_vs_dense" in decode_summary(table.reset_index()).columns


def test_the_step_writes_the_table_and_a_missing_record_is_named(records, tmp_path, capsys, mlflow_store):
    served, ggufs, harness = records
    out = tmp_path / "report"
    report_serving.main(
        ["--served", *map(str, served), "--gguf", *map(str, ggufs), "--harness", *map(str, harness), "--out", str(out)]
    )
    assert (out / "serving.csv").read_text().count("\n") == 4  # header and 3 rows
    assert "a-b0.25" in capsys.readouterr().out
    missing = served[0].parent / "gone" / "served.json"
    with pytest.raises(MoefyError, match="gone/served.json does not exist"):
        serving_table([missing])
