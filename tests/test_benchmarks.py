"""The benchmark scripts still run (their full runs are minutes long; these are seconds)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from moefy import native
from moefy.moe.layer import KERNELS
from studies import TINY, VARIANT, E

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def split_speed():
    return load_benchmark("split_speed")


def test_split_speed_cases_run_and_report(split_speed):
    row = split_speed.kmeans_case("small", [split_speed.gaussian(192, 16)], 6, compare=False)
    assert row["equal_sizes"] and row["moefy_s"] > 0
    coact, counts = split_speed.coactivation_case(96, 3000, batch=512)
    assert coact["seconds"] > 0 and counts.shape == (96, 96) and counts.diagonal().max() <= 3000
    assert coact["kernel"] in ("int8", "float32") and "float32" in coact["kernel_probe_seconds"]
    kept = split_speed.weight_kept_case(d_ff=96, num_experts=6)
    assert kept["kept"] == pytest.approx(15 / 95, rel=0.1) and kept["seconds"] > 0
    rows = split_speed.metis_case(counts, 3000, 6, "small")
    assert [r["target_size"] for r in rows[:2]] == [16, 16]
    assert rows[0]["excess_coact_kept"] > rows[1]["excess_coact_kept"], "phi weighting keeps more than raw counts"
    assert rows[2]["moved_neurons"] > 0
    assert rows[2]["excess_coact_kept_least_loss"] >= rows[2]["excess_coact_kept_random_moves"], "least-loss moves keep more"


@pytest.fixture(scope="module")
def moe_speed():
    return load_benchmark("moe_speed")


def test_moe_speed_cases_run_and_check_the_moe_output(moe_speed):
    flush = moe_speed.CacheFlusher(torch.device("cpu"), megabytes=1)
    rows = moe_speed.shape_cases(16, 64, 8, [1, 32], [0.25, 1.0], torch.device("cpu"), flush, calls=2)
    assert [(r["tokens"], r["budget"], r["k"]) for r in rows] == [(1, 0.25, 2), (1, 1.0, 8), (32, 0.25, 2), (32, 1.0, 8)]
    assert all(r["dense_ms"] > 0 and r["moe_ms"] > 0 and r["max_abs_error"] < 1e-5 for r in rows)
    assert [r["kernel"] for r in rows if r["budget"] == 1.0] == ["dense", "dense"]  # every expert: the dense matmuls
    assert all(set(r["kernel"].split(", ")) <= set(KERNELS) and r["calibrated"] for r in rows if r["budget"] == 0.25)
    # FLOPs per token: dense 2 * 2 * 16 * 64; at k 2 of 8, a quarter of that plus the router's
    assert rows[0]["dense_gflops_per_s"] == pytest.approx(4096 / rows[0]["dense_ms"] / 1e6)
    assert 1024 / rows[0]["moe_ms"] / 1e6 < rows[0]["moe_gflops_per_s"] < 2 * 1024 / rows[0]["moe_ms"] / 1e6


def test_moe_speed_times_bf16_dense_against_bf16_moe(moe_speed):
    flush = moe_speed.CacheFlusher(torch.device("cpu"), megabytes=1)
    rows = moe_speed.shape_cases(16, 64, 8, [32], [0.25, 1.0], torch.device("cpu"), flush, calls=2, dtype="bf16")
    assert [r["dtype"] for r in rows] == ["bf16", "bf16"] and rows[0]["case"].endswith("bf16")
    assert all(r["max_abs_error"] < 0.05 for r in rows)  # bf16 rounding of outputs near 1 (8 bits of mantissa)


def test_moe_train_speed_cases_run_and_report(tmp_path, capsys):
    bench = load_benchmark("moe_train_speed")
    rows = bench.shape_cases(32, 64, 4, 16, calls=2)
    assert [r["layer"] for r in rows] == ["upcycled top-2 of 8", "recovery b=0.2"]
    assert all(r["dense_ms"] > 0 and r["moe_ms"] > 0 and r["dense_steps"] == r["moe_ms"] / r["dense_ms"] for r in rows)
    assert rows[0]["num_experts"] == 8 and rows[0]["expert_size"] == 64 and rows[1]["expert_size"] == 16
    bench.print_table(rows)
    assert "| 32x64 | 16 | recovery b=0.2 |" in capsys.readouterr().out


def test_study_layer_speed_times_a_finished_arm_three_ways(tiny_study, tmp_path, capsys):
    bench = load_benchmark("study_layer_speed")
    study = tiny_study / "results" / TINY
    out = tmp_path / "layer_speed.json"
    bench.main(
        ["--study", str(study), "--variant", VARIANT, "--split", "coact", "--num-experts", str(E), "--router", "mlp"]
        + ["--budgets", "0.5", "--batches", "2", "--repeats", "1", "--batch-size", "16", "--json", str(out), "--no-mlflow"]
    )
    document = json.loads(out.read_text())
    (row,) = document["rows"]
    assert document["machine"]["looped_kernel"] == native.implementation(torch.device("cpu"))  # which loop the timings are of
    assert row["budget"] == 0.5 and row["dense_ms"] > 0 and row["moe_ms"] > 0 and row["gathered_ms"] > 0
    assert row["speedup"] == pytest.approx(row["dense_ms"] / row["moe_ms"])
    assert sum(row["kernels"].values()) == sum(row["gathered_kernels"].values()) > 0, "one kernel call per MoE call"
    p10, p50, p90 = row["expert_share_p10_p50_p90"]
    assert 0 <= p10 <= p50 <= p90 <= 1 and p50 > 0
    printed = capsys.readouterr().out
    assert "coact-E" in printed and f"looped kernel: {native.implementation(torch.device('cpu'))}" in printed
    with pytest.raises(SystemExit):
        bench.main(["--study", str(study), "--variant", VARIANT, "--split", "nosuch", "--no-mlflow"])
    assert "run the study's arm first" in capsys.readouterr().err
