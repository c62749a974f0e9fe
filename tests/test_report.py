import json

import pytest

from moefy.errors import MoefyError
from moefy.report import plot_accuracy_vs_flops, summarise


def write_eval(folder, name, accuracies):
    records = [{"budget": b, "k": int(b * 8), "experts_per_token": b * 8, "test_accuracy": a, "relative_accuracy": a / 0.9,
                "ffn_flops_fraction": b, "dense_agreement": 1.0, "dense_test_accuracy": 0.9} for b, a in accuracies]
    (folder / name).write_text(json.dumps(records))
    return folder / name


def test_summary_has_one_row_per_budget_with_grid_columns(tmp_path):
    files = [write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.5, 0.85), (1.0, 0.9)]),
             write_eval(tmp_path, "random-E8-similarity.json", [(0.5, 0.7), (1.0, 0.9)])]
    table = summarise(files)
    assert list(table.columns[:3]) == ["split", "num_experts", "selector"]
    assert len(table) == 4 and set(table["split"]) == {"kmeans", "random"}
    assert table.loc[(table.split == "kmeans") & (table.budget == 0.5), "test_accuracy"].item() == 0.85
    plot_accuracy_vs_flops(table, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_badly_named_evaluation_is_rejected(tmp_path):
    with pytest.raises(MoefyError, match="not named"):
        summarise([write_eval(tmp_path, "kmeans.json", [(1.0, 0.9)])])


def test_perplexity_evaluations_are_summarised_and_plotted(tmp_path):
    records = [{"budget": b, "k": int(b * 8), "experts_per_token": b * 8, "test_perplexity": p, "relative_perplexity": p / 20,
                "ffn_flops_fraction": b, "dense_agreement": 1.0, "dense_test_perplexity": 20.0} for b, p in [(0.5, 31.0), (1.0, 20.0)]]
    (tmp_path / "kmeans-E8-mlp.json").write_text(json.dumps(records))
    table = summarise([tmp_path / "kmeans-E8-mlp.json"])
    assert list(table.columns[6:9]) == ["test_perplexity", "relative_perplexity", "ffn_flops_fraction"]
    plot_accuracy_vs_flops(table, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_mixed_metrics_are_refused(tmp_path):
    write_eval(tmp_path, "kmeans-E8-mlp.json", [(1.0, 0.9)])
    (tmp_path / "random-E8-mlp.json").write_text(json.dumps([{"budget": 1.0, "test_perplexity": 20.0}]))
    with pytest.raises(MoefyError, match="exactly one of test_accuracy, test_perplexity"):
        summarise([tmp_path / "kmeans-E8-mlp.json", tmp_path / "random-E8-mlp.json"])
