"""The merging report (MC-SMoE): each merged and compressed SMoE against the full SMoE it came from
and the dense continuation, in task metric, memory, parameters and FFN FLOPs; a causal LM's also in
greedy-generation agreement with the full SMoE (moefy.measure.generation)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from moefy.errors import MoefyError
from moefy.files import atomic_path, read_json
from moefy.report.tables import METRICS, metric_of, spread

METHOD_ORDER = ("average", "frequency", "prune", "msmoe", "mcsmoe", "hcsmoe", "reap")  # the table's and plot's order
MERGING_COLUMNS = [
    "upcycled",
    "penalty",
    "seed",
    "merged",
    "method",
    "groups",
    "recovery",
    "compressed",
    "total_parameters",
    "expert_parameters",
    "bytes_on_disk",
    "ffn_flops_per_token",
    "computed_experts_per_token",
    "recovery_steps",
]
# a causal LM's records only: agreement of its greedy tokens with the full SMoE's, and its interval
GENERATION_COLUMNS = ["generation_agreement", "generation_agreement_low", "generation_agreement_high", "generation_identical"]


def merging_table(evaluation_files: Iterable[str | Path], dense_files: Iterable[str | Path] = ()) -> pd.DataFrame:
    """One row per merged model (and the full SMoE) and seed: the task metric, relative to the full
    SMoE of the same upcycled model and seed, minus the dense continuation's; memory, parameters,
    FFN FLOPs and experts relative to the full SMoE; experts per layer; a causal LM's generation
    agreement with the full SMoE."""
    rows = []
    for path in map(Path, evaluation_files):
        record = read_json(path)
        if not isinstance(record, dict) or "merged" not in record or "bytes_on_disk" not in record:
            raise MoefyError(f"{path} is not a record of the evaluate_smoe step; delete it and rerun its job")
        rows.append(
            {
                **{k: record.get(k) for k in MERGING_COLUMNS},
                **{f"test_{m}": record[f"test_{m}"] for m in METRICS if f"test_{m}" in record},
                **{k: record[k] for k in GENERATION_COLUMNS if k in record},
                "experts_per_layer": "/".join(str(n) for n in record.get("experts_per_layer", {}).values()),
                "experts": sum(record.get("experts_per_layer", {}).values()),
            }
        )
    if not rows:
        raise MoefyError("no merged models to report; name upcycled models in merging.models in the config")
    table = pd.DataFrame(rows)
    metric = metric_of(table)
    key = ["upcycled", "penalty", "seed"]
    full = table[table["merged"] == "full"].set_index(key)
    if full.empty:
        raise MoefyError("the merged models' records have no full SMoE (merge name `full`) to compare with")

    def of_full(row, column):
        return full[column].get(tuple(row[k] for k in key), float("nan"))

    table[f"{metric}_vs_full"] = [row[f"test_{metric}"] / of_full(row, f"test_{metric}") for _, row in table.iterrows()]
    # the share of the full SMoE's experts kept: where arms of different models meet (moefy.report.ranking)
    for column, name in (
        ("bytes_on_disk", "memory_vs_full"),
        ("ffn_flops_per_token", "ffn_flops_vs_full"),
        ("experts", "experts_kept"),
    ):
        table[name] = [row[column] / of_full(row, column) for _, row in table.iterrows()]
    dense = {}
    for path in map(Path, dense_files):
        record = read_json(path)
        dense[(record.get("penalty"), record.get("seed"))] = record.get(f"test_{metric}")
    table[f"{metric}_minus_dense"] = [
        row[f"test_{metric}"] - (dense.get((row["penalty"], row["seed"])) or float("nan")) for _, row in table.iterrows()
    ]
    order = {m: i for i, m in enumerate(("full",) + METHOD_ORDER)}
    table["_order"] = table["method"].map(lambda m: order.get(m, 9))
    table = table.sort_values(["upcycled", "groups", "_order", "recovery", "seed"], ignore_index=True, na_position="first")
    return table.drop(columns="_order")


def merging_by_method(table: pd.DataFrame) -> pd.DataFrame:
    """Each merged model over its seeds (mean, and std of the task metric), best first within each
    group count: the ranking of the baselines."""
    metric = metric_of(table)
    numbers = [f"test_{metric}", f"{metric}_vs_full", f"{metric}_minus_dense", "memory_vs_full", "ffn_flops_vs_full"]
    numbers += ["generation_agreement"] if "generation_agreement" in table else []
    grouped = table.fillna({"groups": 0}).groupby(["upcycled", "merged", "method", "groups", "recovery"], sort=False)
    out = grouped[numbers].mean().add_suffix("_mean")
    out = out.join(grouped[[f"test_{metric}"]].agg(spread).add_suffix("_std")).join(grouped.size().rename("seeds"))
    out = out.reset_index()
    better = task_better_is_higher(metric)
    return out.sort_values(["upcycled", "groups", f"test_{metric}_mean"], ascending=[True, True, not better], ignore_index=True)


def task_better_is_higher(metric: str) -> bool:
    return metric != "perplexity"


def plot_merging(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """The task metric (mean over seeds) against memory (bytes on disk relative to the full SMoE),
    one marker per method, filled after distillation, hollow without; the full SMoE a black star,
    the dense continuation a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_of(table)
    models = merging_by_method(table)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = [m for m in METHOD_ORDER if m in set(models["method"])]
    methods += sorted(set(models["method"]) - set(methods) - {"full"})
    markers = dict(zip(methods, "ovs^D<>pPXhHd8"))
    for i, method in enumerate(methods):
        color = plt.get_cmap("tab10")(i % 10)
        for recovery, filled in (("none", False), ("kd", True)):
            rows = models[(models["method"] == method) & (models["recovery"] == recovery)]
            if rows.empty:
                continue
            ax.plot(
                rows["memory_vs_full_mean"],
                rows[f"test_{metric}_mean"],
                linestyle="none",
                marker=markers[method],
                markersize=8,
                color=color,
                markerfacecolor=color if filled else "none",
                label=f"{method} ({'distilled' if filled else 'no distillation'})",
            )
            for _, row in rows.iterrows():
                ax.annotate(f"G{row['groups']:g}", (row["memory_vs_full_mean"], row[f"test_{metric}_mean"]), fontsize=6)
    full = models[models["method"] == "full"]
    if not full.empty:
        ax.plot(1.0, full[f"test_{metric}_mean"].mean(), "*", color="black", markersize=14, label="full SMoE")
    dense = table[f"test_{metric}"] - table[f"{metric}_minus_dense"]
    if dense.notna().any():
        ax.axhline(dense.mean(), color="black", linestyle="--", linewidth=1, label="dense, trained on as long")
    ax.set_xlabel("memory: bytes on disk relative to the full SMoE")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "Merged and compressed SMoEs against the full SMoE", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
