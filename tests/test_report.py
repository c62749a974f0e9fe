import json

import pytest

from moefy.errors import MoefyError
from moefy.report import flops_at_99, plot_accuracy_vs_flops, summarise


def write_eval(folder, name, accuracies, penalty="none", rule="top_k"):
    records = [{"rule": rule, "budget": b if rule == "top_k" else None, "tau": None if rule == "top_k" else b,
                "k": int(b * 8), "experts_per_token": b * 8, "test_accuracy": a, "relative_accuracy": a / 0.9,
                "ffn_flops_fraction": b, "dense_agreement": 1.0, "dense_test_accuracy": 0.9,
                "ffn_ms_dense": 10.0, "ffn_ms_moe": 5.0, "ffn_speedup": 2.0} for b, a in accuracies]
    (folder / penalty).mkdir(exist_ok=True)
    path = folder / penalty / name
    existing = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(existing + records))
    return path


def test_summary_has_one_row_per_budget_with_grid_columns(tmp_path):
    files = [write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.5, 0.85), (1.0, 0.9)]),
             write_eval(tmp_path, "random-E8-similarity.json", [(0.5, 0.7), (1.0, 0.9)])]
    table = summarise(files)
    assert list(table.columns[:5]) == ["penalty", "split", "num_experts", "selector", "rule"]
    assert len(table) == 4 and set(table["split"]) == {"kmeans", "random"}
    assert table.loc[(table.split == "kmeans") & (table.budget == 0.5), "test_accuracy"].item() == 0.85
    plot_accuracy_vs_flops(table, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_badly_named_evaluation_is_rejected(tmp_path):
    with pytest.raises(MoefyError, match="not named"):
        summarise([write_eval(tmp_path, "kmeans.json", [(1.0, 0.9)])])


def test_flops_at_99_is_the_cheapest_point_keeping_99_percent_per_rule_and_penalty(tmp_path):
    write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.2, 0.85), (0.4, 0.893), (0.6, 0.9), (1.0, 0.9)])
    write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.3, 0.895), (0.5, 0.9)], rule="dynamic")
    hoyer = write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.2, 0.7), (1.0, 0.9)], penalty="hoyer")
    table = summarise([tmp_path / "none" / "kmeans-E8-mlp.json", hoyer])
    best = flops_at_99(table).set_index(["penalty", "rule"])["flops_at_99pct"]
    assert best[("none", "top_k")] == 0.4  # 0.893 / 0.9 = 99.2%; 0.85 / 0.9 is not enough
    assert best[("none", "dynamic")] == 0.3
    assert best[("hoyer", "top_k")] == 1.0
    plot_accuracy_vs_flops(table, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_perplexity_evaluations_are_summarised_and_plotted(tmp_path):
    records = [{"budget": b, "k": int(b * 8), "experts_per_token": b * 8, "test_perplexity": p, "relative_perplexity": p / 20,
                "ffn_flops_fraction": b, "dense_agreement": 1.0, "dense_test_perplexity": 20.0}
               for b, p in [(0.3, 25.0), (0.5, 20.1), (1.0, 20.0)]]
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "kmeans-E8-mlp.json").write_text(json.dumps(records))
    table = summarise([tmp_path / "none" / "kmeans-E8-mlp.json"])
    assert list(table.columns[10:13]) == ["test_perplexity", "relative_perplexity", "ffn_flops_fraction"]
    assert flops_at_99(table)["flops_at_99pct"].item() == 0.5  # 20.1 <= 20 / 0.99; 25 is not
    plot_accuracy_vs_flops(table, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_an_evaluation_outside_a_penalty_folder_is_rejected(tmp_path):
    (tmp_path / "kmeans-E8-mlp.json").write_text("[]")
    with pytest.raises(MoefyError, match="evaluate/<penalty>/"):
        summarise([tmp_path / "kmeans-E8-mlp.json"])


def test_mixed_metrics_are_refused(tmp_path):
    path = write_eval(tmp_path, "kmeans-E8-mlp.json", [(1.0, 0.9)])
    (tmp_path / "none" / "random-E8-mlp.json").write_text(json.dumps([{"budget": 1.0, "test_perplexity": 20.0}]))
    with pytest.raises(MoefyError, match="exactly one of test_accuracy, test_perplexity"):
        summarise([path, tmp_path / "none" / "random-E8-mlp.json"])
