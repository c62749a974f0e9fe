import json

import pandas as pd
import pytest

from moefy.errors import MoefyError
from moefy.report.summary import by_method, flops_at_99, flops_at_99_by_method, plot_relative_vs_flops, summarise, summary_files


def write_eval(folder, name, accuracies, penalty="none", rule="top_k", seed=0, dense=0.9, **extra):
    """Records as the evaluate step writes them: each names its place in the grid (`extra`: fields
    newer records add, e.g. test_count and stopped_at_cap)."""
    split, experts, router = name.removesuffix(".json").split("-")
    records = [
        {
            "penalty": penalty,
            "seed": seed,
            "split": split,
            "num_experts": int(experts[1:]),
            "router": router,
            "rule": rule,
            "budget": b if rule == "top_k" else None,
            "tau": None if rule == "top_k" else b,
            "k": int(b * 8) if rule == "top_k" else None,
            "experts_per_token": b * 8,
            "experts_per_token_std": 0.0,
            "test_accuracy": a,
            "relative_accuracy": a / dense,
            "ffn_flops_fraction": b,
            "model_flops_fraction": 0.4 + 0.6 * b,  # FFNs 60% of the whole model
            "dense_agreement": 1.0,
            "dense_test_accuracy": dense,
            "ffn_ms_dense": 10.0,
            "ffn_ms_moe": 5.0,
            "ffn_speedup": 2.0,
            "precision": "fp32",
            **extra,
        }
        for b, a in accuracies
    ]
    path = folder / f"{penalty}-seed{seed}" / name
    path.parent.mkdir(exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(existing + records))
    return path


def test_summary_has_one_row_per_budget_with_grid_columns(tmp_path):
    files = [
        write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.5, 0.85), (1.0, 0.9)]),
        write_eval(tmp_path, "random-E8-similarity.json", [(0.5, 0.7), (1.0, 0.9)]),
    ]
    table = summarise(files)
    assert list(table.columns[:10]) == [
        "penalty", "seed", "convert", "split", "num_experts", "shared_experts", "router", "recovery", "rule", "allocation"
    ]  # fmt: skip
    assert set(table["convert"]) == {"ffn"}, "records written before the convert axis are FFN-only"
    assert set(table["shared_experts"]) == {0} and set(table["allocation"]) == {"uniform"}, "nor shared nor per-layer"
    assert len(table) == 4 and set(table["split"]) == {"kmeans", "random"}
    assert table.loc[(table.split == "kmeans") & (table.budget == 0.5), "test_accuracy"].item() == 0.85
    assert set(table["precision"]) == {"fp32"}
    plot_relative_vs_flops(table, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_records_that_do_not_name_their_place_in_the_grid_are_rejected(tmp_path):
    path = write_eval(tmp_path, "kmeans-E8-mlp.json", [(1.0, 0.9)])
    records = json.loads(path.read_text())
    del records[0]["seed"]
    path.write_text(json.dumps(records))
    with pytest.raises(MoefyError, match="records without seed .*rerun its evaluate job"):
        summarise([path])
    path.write_text(json.dumps({"budget": 1.0}))
    with pytest.raises(MoefyError, match="not a list of evaluation records"):
        summarise([path])


def test_flops_at_99_is_the_cheapest_point_keeping_99_percent_per_rule_and_penalty(tmp_path):
    write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.2, 0.85), (0.4, 0.893), (0.6, 0.9), (1.0, 0.9)])
    write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.3, 0.895), (0.5, 0.9)], rule="dynamic")
    hoyer = write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.2, 0.7), (1.0, 0.9)], penalty="hoyer")
    table = summarise([tmp_path / "none-seed0" / "kmeans-E8-mlp.json", hoyer])
    best = flops_at_99(table).set_index(["penalty", "rule"])["flops_at_99pct"]
    assert best[("none", "top_k")] == 0.4  # 0.893 / 0.9 = 99.2%; 0.85 / 0.9 is not enough
    assert best[("none", "dynamic")] == 0.3
    assert best[("hoyer", "top_k")] == 1.0
    whole = flops_at_99(table).set_index(["penalty", "rule"])["model_flops_at_99pct"]
    assert whole[("none", "top_k")] == pytest.approx(0.4 + 0.6 * 0.4)  # at the same point, on the whole model
    plot_relative_vs_flops(table, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_seeds_of_one_method_give_mean_and_spread(tmp_path):
    files = [
        write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.2, 0.892), (0.4, 0.9), (1.0, 0.9)], seed=0),
        write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.2, 0.80), (0.4, 0.895), (1.0, 0.9)], seed=1),
        write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.2, 0.70), (0.4, 0.80), (1.0, 0.9)], seed=2),
    ]
    table = summarise(files)
    per_method = flops_at_99_by_method(table).iloc[0]
    assert per_method["seeds"] == 3 and per_method["flops_at_99pct_per_seed"] == "0.200 0.400 1.000"
    assert per_method["flops_at_99pct_mean"] == pytest.approx((0.2 + 0.4 + 1.0) / 3)
    assert per_method["flops_at_99pct_std"] == pytest.approx(0.4163, abs=1e-4)
    points = by_method(table).set_index("budget")
    assert points.loc[0.2, "seeds"] == 3
    assert points.loc[0.2, "relative_accuracy_mean"] == pytest.approx((0.892 + 0.80 + 0.70) / 3 / 0.9)
    assert points.loc[1.0, "relative_accuracy_std"] == 0.0 and points.loc[0.2, "relative_accuracy_std"] > 0.1
    files = summary_files(table, tmp_path / "report", "title")
    assert sorted(files) == ["by_method", "flops_at_99pct", "plot", "summary"] and all(p.is_file() for p in files.values())


def test_a_seed_that_never_keeps_99_percent_makes_the_method_mean_nan(tmp_path):
    files = [
        write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.2, 0.9)], seed=0),
        write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.2, 0.5)], seed=1),
    ]  # no budget 1.0: no point keeps 99%
    per_method = flops_at_99_by_method(summarise(files)).iloc[0]
    assert per_method["flops_at_99pct_per_seed"] == "0.200 nan"
    assert per_method["flops_at_99pct_mean"] != per_method["flops_at_99pct_mean"]  # NaN, not 0.2


def test_perplexity_evaluations_are_summarised_and_plotted(tmp_path):
    records = [
        {
            "penalty": "none",
            "seed": 0,
            "split": "kmeans",
            "num_experts": 8,
            "router": "mlp",
            "rule": "top_k",
            "budget": b,
            "k": int(b * 8),
            "experts_per_token": b * 8,
            "test_perplexity": p,
            "relative_perplexity": p / 20,
            "ffn_flops_fraction": b,
            "dense_agreement": 1.0,
            "dense_test_perplexity": 20.0,
            "ffn_speedup": 1.0,
        }
        for b, p in [(0.3, 25.0), (0.5, 20.1), (1.0, 20.0)]
    ]
    (tmp_path / "kmeans-E8-mlp.json").write_text(json.dumps(records))
    table = summarise([tmp_path / "kmeans-E8-mlp.json"])
    assert list(table.columns[15:18]) == ["test_perplexity", "relative_perplexity", "ffn_flops_fraction"]
    assert flops_at_99(table)["flops_at_99pct"].item() == 0.5  # 20.1 <= 20 / 0.99; 25 is not
    plot_relative_vs_flops(table, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_mixed_metrics_are_refused(tmp_path):
    path = write_eval(tmp_path, "kmeans-E8-mlp.json", [(1.0, 0.9)])
    other = json.loads(path.read_text())[0]
    other = {k: v for k, v in other.items() if "accuracy" not in k} | {"split": "random", "test_perplexity": 20.0}
    (tmp_path / "random.json").write_text(json.dumps([other]))
    with pytest.raises(MoefyError, match="exactly one of test_accuracy, test_perplexity"):
        summarise([path, tmp_path / "random.json"])


def test_upcycling_table_compares_each_model_with_the_dense_continuation_of_its_seed(tmp_path):
    from moefy.files import write_json
    from moefy.report.upcycling import upcycling_by_model, upcycling_table

    def trained(name, seed, accuracy, routing=None):
        spec = {} if routing is None else {"upcycling": {"layers": [1, 3], "experts": 8, "routing": routing, "drop_ratio": 0.0}}
        spec["stopped_at_cap"] = (name, seed) == ("top2", 0)
        path = tmp_path / f"{name}-{seed}.json"
        write_json(path, {"penalty": "none", "seed": seed, "mode": "dense" if routing is None else "moe", "upcycled": name,
                          "test_accuracy": accuracy, "total_parameters": 10, "active_parameters": 8, **spec})  # fmt: skip
        return path

    top2 = {"kind": "top_k", "k": 2, "renormalize": True, "capacity_factor": 2.0}
    files = [trained("dense", 0, 0.80), trained("dense", 1, 0.70), trained("top2", 0, 0.85, top2), trained("top2", 1, 0.71, top2)]
    table = upcycling_table(files)
    rows = table.set_index(["upcycled", "seed"])
    assert rows.loc[("top2", 0), "accuracy_minus_dense"] == pytest.approx(0.05)
    assert rows.loc[("top2", 1), "accuracy_minus_dense"] == pytest.approx(0.01)
    assert (
        rows.loc[("top2", 0), "routing"] == "top_k"
        and rows.loc[("top2", 0), "k"] == 2
        and rows.loc[("top2", 0), "layers"] == "1,3"
    )
    assert rows.loc[("dense", 0), "routing"] == "dense" and rows.loc[("dense", 1), "accuracy_minus_dense"] == 0
    models = upcycling_by_model(table).set_index("upcycled")
    assert models.loc["top2", "accuracy_minus_dense_mean"] == pytest.approx(0.03)
    assert models.loc["top2", "accuracy_minus_dense_std"] == pytest.approx(0.04 / 2**0.5) and models.loc["top2", "seeds"] == 2
    assert rows.loc[("top2", 0), "stopped_at_cap"] and not rows.loc[("top2", 1), "stopped_at_cap"]
    assert models.loc["top2", "seeds_stopped_at_cap"] == 1 and models.loc["dense", "seeds_stopped_at_cap"] == 0
    write_json(tmp_path / "bad.json", {"test_accuracy": 1.0})
    with pytest.raises(MoefyError, match="not a metrics file of the train_moe step"):
        upcycling_table([tmp_path / "bad.json"])


def test_merging_table_is_relative_to_the_full_smoe_of_its_seed_and_ranks_the_methods(tmp_path):
    from moefy.files import write_json
    from moefy.report.merging import merging_by_method, merging_table, plot_merging
    from moefy.training.merging import chain_of

    def evaluated(name, seed, accuracy, size, flops):
        path = tmp_path / f"{name}-{seed}.json"
        write_json(path, {"penalty": "none", "seed": seed, "upcycled": "top2", **chain_of(name), "test_accuracy": accuracy,
                          "bytes_on_disk": size, "ffn_flops_per_token": flops, "experts_per_layer": {"1": 8}})  # fmt: skip
        return path

    files = [evaluated("full", 0, 0.80, 100, 10.0), evaluated("full", 1, 0.60, 100, 10.0)]
    files += [evaluated("prune-G4", 0, 0.40, 50, 10.0), evaluated("prune-G4", 1, 0.30, 50, 10.0)]
    files += [evaluated("msmoe-G4-kd-svd-kd", 0, 0.76, 20, 8.0), evaluated("msmoe-G4-kd-svd-kd", 1, 0.60, 20, 8.0)]
    dense = tmp_path / "dense.json"
    write_json(dense, {"penalty": "none", "seed": 0, "test_accuracy": 0.75})
    table = merging_table(files, [dense])
    rows = table.set_index(["merged", "seed"])
    assert rows.loc[("msmoe-G4-kd-svd-kd", 0), "accuracy_vs_full"] == pytest.approx(0.95)
    assert rows.loc[("msmoe-G4-kd-svd-kd", 1), "accuracy_vs_full"] == pytest.approx(1.0)
    assert rows.loc[("prune-G4", 0), "memory_vs_full"] == 0.5 and rows.loc[("msmoe-G4-kd-svd-kd", 0), "ffn_flops_vs_full"] == 0.8
    assert rows.loc[("full", 0), "accuracy_minus_dense"] == pytest.approx(0.05)
    assert pd.isna(rows.loc[("full", 1), "accuracy_minus_dense"]), "no dense record for seed 1"
    ranking = merging_by_method(table)
    ranked = ranking[ranking.groups == 4]["method"].tolist()
    assert ranked == ["mcsmoe", "prune"] and ranking.iloc[0]["method"] == "full"
    plot_merging(table, tmp_path / "merging.png")
    assert (tmp_path / "merging.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(MoefyError, match="no full SMoE"):
        merging_table(files[2:])


def test_intervals_mark_unresolved_crossings_and_rank_only_what_they_separate(tmp_path):
    """500 texts (0.2 points a text): 89.6% against a dense 90% keeps the 99% line by its point, not
    by its paired interval when 10% of predictions differ; 10,000 texts resolve it. Ranks at a
    budget separate only what the intervals separate, and each record carries the stages that
    stopped at their cap."""
    files = [
        write_eval(tmp_path, "kmeans-E8-mlp.json", [(0.5, 0.896)], test_count=500, dense_agreement=0.9, stopped_at_cap=""),
        write_eval(tmp_path, "random-E8-mlp.json", [(0.5, 0.89)], test_count=500, dense_agreement=0.9, stopped_at_cap="finetune"),
        write_eval(tmp_path, "coact-E8-mlp.json", [(0.5, 0.896)], test_count=10_000, dense_agreement=0.99, stopped_at_cap=""),
        write_eval(
            tmp_path,
            "kmeans-E8-norm.json",
            [(0.5, 0.6)],
            test_count=500,
            dense_agreement=0.6,
            stopped_at_cap="norm router 2/2 layers",
        ),
    ]
    for name in ("kmeans-E8-mlp.json", "random-E8-mlp.json", "coact-E8-mlp.json", "kmeans-E8-norm.json"):  # budget 1: dense
        write_eval(tmp_path, name, [(1.0, 0.9)], test_count=500, dense_agreement=1.0, stopped_at_cap="")  # appended
    table = summarise(files).set_index(["split", "router", "budget"])
    assert (
        table.loc[("kmeans", "mlp", 0.5), "relative_accuracy_low"] < 0.99 < table.loc[("kmeans", "mlp", 0.5), "relative_accuracy"]
    )
    assert table.loc[("kmeans", "mlp", 0.5), "keeps_99pct"] == "unresolved"
    assert table.loc[("coact", "mlp", 0.5), "keeps_99pct"] == "yes" and table.loc[("kmeans", "norm", 0.5), "keeps_99pct"] == "no"
    assert table.loc[("kmeans", "norm", 1.0), "keeps_99pct"] == "yes", "the dense model itself: no prediction differs"
    assert table.loc[("kmeans", "mlp", 0.5), "flops_at_99pct"] == 0.5
    assert table.loc[("kmeans", "mlp", 0.5), "flops_at_99pct_supported"] is False, "the crossing the interval does not support"
    assert table.loc[("coact", "mlp", 0.5), "flops_at_99pct_supported"] is True
    assert table.loc[("kmeans", "norm", 1.0), "flops_at_99pct_supported"] is True
    assert table.loc[("random", "mlp", 0.5), "stopped_at_cap"] == "finetune"
    per_seed = flops_at_99_by_method(summarise(files)).set_index(["split", "router"])["flops_at_99pct_supported"]
    assert per_seed[("coact", "mlp")] and not per_seed[("kmeans", "mlp")]

    points = by_method(summarise(files)).set_index(["split", "router", "budget"])
    at_half = points.xs(0.5, level="budget")
    assert (
        at_half.loc[("kmeans", "mlp"), "rank"]
        == at_half.loc[("random", "mlp"), "rank"]
        == at_half.loc[("coact", "mlp"), "rank"]
        == 1
    )
    assert at_half.loc[("kmeans", "norm"), "rank"] == 4, "separated from the three above it"
    assert at_half.loc[("kmeans", "norm"), "stopped_at_cap"] == "norm router 2/2 layers"
    assert at_half.loc[("random", "mlp"), "stopped_at_cap"] == "finetune"
    assert at_half.loc[("kmeans", "mlp"), "test_count"] == 500 and at_half.loc[("kmeans", "mlp"), "keeps_99pct"] == "unresolved"
    assert set(points.xs(1.0, level="budget")["rank"]) == {1}
    (tmp_path / "old").mkdir()
    older = summarise([write_eval(tmp_path / "old", "kmeans-E8-mlp.json", [(0.5, 0.9)])])
    assert older["stopped_at_cap"].tolist() == [""] and older["keeps_99pct"].tolist() == [""], "records before both fields"
    assert by_method(older)["rank"].isna().all()


def test_methods_ranked_per_metric_across_arms_and_where_the_ranking_flips(tmp_path):
    """A classification arm (8 experts) and a causal-LM arm (4 experts), both at half their experts,
    one seed: accuracy and perplexity rank by value, generation agreement by its prompts' intervals,
    so hcsmoe and frequency, overlapping there, share a rank. Accuracy and perplexity put hcsmoe above
    reap, generation agreement reap above both: two flips, and pruning first on generation only."""
    from moefy.files import write_json
    from moefy.report.merging import merging_table
    from moefy.report.ranking import flips, metric_ranks
    from moefy.training.merging import chain_of

    def evaluated(arm, name, experts, metric, value, agreement=None):
        record = {"penalty": "none", "seed": 0, "upcycled": arm, **chain_of(name), f"test_{metric}": value,
                  "bytes_on_disk": 100, "ffn_flops_per_token": 1.0, "experts_per_layer": {"1": experts, "3": experts}}  # fmt: skip
        if agreement is not None:
            mean, half = agreement
            record |= {"generation_agreement": mean, "generation_agreement_low": mean - half,
                       "generation_agreement_high": mean + half, "generation_identical": 0.0}  # fmt: skip
        write_json(path := tmp_path / f"{arm}-{name}.json", record)
        return path

    classification = [evaluated("cls", "full", 8, "accuracy", 0.80)] + [
        evaluated("cls", f"{m}-G4", 4, "accuracy", a) for m, a in (("reap", 0.78), ("hcsmoe", 0.79), ("frequency", 0.70))
    ]
    decoder = [evaluated("dec", "full", 4, "perplexity", 10.0, (1.0, 0.0))] + [
        evaluated("dec", f"{m}-G2", 2, "perplexity", p, g)
        for m, p, g in (("reap", 11.0, (0.6, 0.1)), ("hcsmoe", 10.5, (0.3, 0.1)), ("frequency", 13.0, (0.35, 0.1)))
    ]
    ranks = metric_ranks([merging_table(classification), merging_table(decoder)])
    assert set(ranks["experts_kept"]) == {0.5} and set(ranks["recovery"]) == {"none"}
    by = ranks.set_index(["metric", "method"])["rank"]
    assert [by[("accuracy", m)] for m in ("hcsmoe", "reap", "frequency")] == [1, 2, 3]
    assert [by[("perplexity", m)] for m in ("hcsmoe", "reap", "frequency")] == [1, 2, 3]
    assert [by[("generation_agreement", m)] for m in ("reap", "hcsmoe", "frequency")] == [1, 2, 2]
    values = ranks.set_index(["metric", "method"])
    assert values.loc[("perplexity", "reap"), "value"] == pytest.approx(1.1), "perplexity relative to the full SMoE"
    assert values.loc[("accuracy", "reap"), ["low", "high"]].tolist() == [0.78 / 0.8] * 2, "one seed: a point"
    lines = flips(ranks)
    assert lines[0] == "50% of the experts kept, recovery none:"
    assert "  generation agreement: reap (1), frequency (2), hcsmoe (2)" in lines
    assert "  accuracy: merging ranks first (best pruning rank 2, best merging rank 1)" in lines
    assert "  generation agreement: pruning ranks first (best pruning rank 1, best merging rank 2)" in lines
    flipped = [line for line in lines if line.startswith("  flip:")]
    assert flipped == [
        "  flip: accuracy ranks hcsmoe (1) above reap (2), generation agreement ranks reap (1) above hcsmoe (2)",
        "  flip: perplexity ranks hcsmoe (1) above reap (2), generation agreement ranks reap (1) above hcsmoe (2)",
    ], "hcsmoe against frequency is a tie under agreement, not a flip"
    same = metric_ranks([merging_table(classification)])
    assert flips(same)[-1] == "  no flip: one ranking"
    # a second upcycled model in the same arm is ranked on its own, and named where a metric has two
    other = [evaluated("cls2", "full", 8, "accuracy", 0.8), evaluated("cls2", "reap-G4", 4, "accuracy", 0.8)]
    other.append(evaluated("cls2", "hcsmoe-G4", 4, "accuracy", 0.7))
    two = flips(metric_ranks([merging_table(classification + other)]))
    assert "  accuracy (cls2): reap (1), hcsmoe (2)" in two
    assert "  flip: accuracy (cls) ranks hcsmoe (1) above reap (2), accuracy (cls2) ranks reap (1) above hcsmoe (2)" in two
