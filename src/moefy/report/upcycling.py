"""The Sparse Upcycling report: each trained upcycled model against the dense continuation of the
same seed and steps, its parameters, compute and load balance."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from moefy.errors import MoefyError
from moefy.files import atomic_path, read_json
from moefy.report.tables import METRICS, metric_of, spread

UPCYCLING_COLUMNS = [
    "upcycled",
    "penalty",
    "seed",
    "routing",
    "experts",
    "k",
    "capacity_factor",
    "drop_ratio",
    "layers",
    "total_parameters",
    "active_parameters",
    "ffn_flops_fraction",
    "train_steps",
    "train_tokens",
    "train_flops",
    "train_seconds",
    "test_load_max_over_mean",
    "test_dropped_share",
    "stopped_at_cap",  # its training ended at its cap while still improving (moefy.training.convergence)
]


def upcycling_table(metrics_files: Iterable[str | Path]) -> pd.DataFrame:
    """One row per trained model (upcycled, or `dense`: the dense continuation) and seed, with its
    task metric and its difference to the dense continuation of the same seed and steps."""
    rows = []
    for path in map(Path, metrics_files):
        record = read_json(path)
        if not isinstance(record, dict) or "upcycled" not in record or "mode" not in record:
            raise MoefyError(
                f"{path} is not a metrics file of the train_moe step (moe or dense mode); delete it and rerun its job"
            )
        spec = record.get("upcycling", {})
        routing = spec.get("routing", {})
        rows.append(
            {
                **{k: record.get(k) for k in UPCYCLING_COLUMNS},
                **{f"test_{m}": record[f"test_{m}"] for m in METRICS if f"test_{m}" in record},
                "routing": routing.get("kind", "dense"),
                "experts": spec.get("experts", 1),
                "k": routing.get("k") if routing.get("kind") == "top_k" else None,
                "capacity_factor": routing.get("capacity_factor") if routing.get("kind") == "expert_choice" else None,
                "drop_ratio": spec.get("drop_ratio", 0.0),
                "layers": ",".join(map(str, spec.get("layers", []))),
            }
        )
    if not rows:
        raise MoefyError("no upcycled models to report; add some to upcycling.models in the config")
    table = pd.DataFrame(rows)
    metric = metric_of(table)
    dense = table[table["upcycled"] == "dense"].set_index(["penalty", "seed"])[f"test_{metric}"]
    table[f"{metric}_minus_dense"] = [
        row[f"test_{metric}"] - dense.get((row["penalty"], row["seed"]), float("nan")) for _, row in table.iterrows()
    ]
    return table.sort_values(["upcycled", "penalty", "seed"], ignore_index=True)


def upcycling_by_model(table: pd.DataFrame) -> pd.DataFrame:
    """Each model over its seeds: the task metric and its difference to dense as mean and std."""
    metric = metric_of(table)
    numbers = [
        f"test_{metric}",
        f"{metric}_minus_dense",
        "active_parameters",
        "total_parameters",
        "ffn_flops_fraction",
        "train_seconds",
    ]
    grouped = table.groupby(["upcycled", "penalty"], sort=True)
    out = grouped[numbers].mean().add_suffix("_mean")
    spreads = grouped[[f"test_{metric}", f"{metric}_minus_dense"]].agg(spread).add_suffix("_std")
    capped = grouped["stopped_at_cap"].agg(lambda v: int(v.map(bool).sum())).rename("seeds_stopped_at_cap")
    return out.join(spreads).join(grouped.size().rename("seeds")).join(capped).reset_index()


def plot_upcycling(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """The task metric (mean and spread over seeds) against active FFN FLOPs per token (relative
    to dense) and against total parameters, one point per model, the dense continuation in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_of(table)
    models = upcycling_by_model(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, x, label in (
        (axes[0], "ffn_flops_fraction_mean", "active FFN FLOPs per token (dense = 1)"),
        (axes[1], "total_parameters_mean", "total parameters"),
    ):
        for i, row in models.iterrows():
            dense = row["upcycled"] == "dense"
            ax.errorbar(
                row[x],
                row[f"test_{metric}_mean"],
                yerr=row[f"test_{metric}_std"] if row["seeds"] > 1 else None,
                fmt="s" if dense else "o",
                color="black" if dense else plt.get_cmap("tab10")(i % 10),
                capsize=3,
                label=f"{row['upcycled']} ({int(row['seeds'])} seed{'s' if row['seeds'] > 1 else ''})",
            )
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test {metric}")
    axes[1].legend(fontsize=7)
    fig.suptitle(title or "Sparse Upcycling against dense continuation")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
