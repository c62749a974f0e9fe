"""The study's summary: every evaluation in one table, each method over its seeds, and the task
metric against FFN compute.

Every record names its place in the grid (penalty, seed, split, num_experts, selector, recovery) and its
rule, so the report reads no file names. The metric is whatever the evaluate step recorded as
test_<metric> (accuracy, or perplexity for causal language modelling), so the report needs no
task of its own. A method is a grid point without its seed: its numbers over seeds are given as
mean and spread, because one seed on a small test set cannot rank methods at the 99% line.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from moefy.cli import ABLATION
from moefy.config import PENALTIES, RECOVERIES
from moefy.errors import MoefyError
from moefy.files import atomic_path, read_json

IDENTITY = ABLATION
METRICS = ("accuracy", "perplexity")
GROUP = [*IDENTITY, "rule"]  # one curve of one seed
METHOD = [key for key in GROUP if key != "seed"]  # one curve over seeds
POINT = ["budget", "tau"]  # one point of a curve
# measured, so never bit-identical across runs
WALL_CLOCK = ("ffn_ms_dense", "ffn_ms_moe", "ffn_speedup", "model_ms_dense", "model_ms_moe", "model_speedup")
KEEP = 0.99  # flops_at_99pct: the smallest FLOPs fraction keeping 99% of the dense model's quality


def reproducible(records: list[dict]) -> list[dict]:
    """An evaluation's records without the wall-clock timings: what a rerun must reproduce exactly."""
    return [{k: v for k, v in record.items() if k not in WALL_CLOCK} for record in records]


def metric_of(table: pd.DataFrame) -> str:
    """The task metric the evaluations recorded (accuracy or perplexity); one per study."""
    found = [m for m in METRICS if f"test_{m}" in table.columns]
    if len(found) != 1:
        raise MoefyError(
            f"evaluation records should hold exactly one of {', '.join('test_' + m for m in METRICS)}, "
            f"found {found or 'none'}; rerun the evaluate jobs of one study"
        )
    return found[0]


def columns(metric: str) -> list[str]:
    return GROUP + [
        "budget",
        "tau",
        "k",
        "experts_per_token",
        "experts_per_token_std",
        f"test_{metric}",
        f"relative_{metric}",
        "ffn_flops_fraction",
        "flops_at_99pct",
        "model_flops_fraction",
        "model_flops_at_99pct",
        "projection_flops_fraction",
        "dense_agreement",
        f"dense_test_{metric}",
        *WALL_CLOCK,
        "precision",
        "looped_kernel",
    ]


def _records(path: Path) -> list[dict]:
    records = read_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise MoefyError(f"{path} is not a list of evaluation records; delete it and rerun its evaluate job")
    for record in records:
        record.setdefault("recovery", "none")  # written before recovery existed: unrecovered
        record.setdefault("convert", "ffn")  # written before attention conversion existed: FFNs only
        missing = [key for key in (*IDENTITY, "rule", "ffn_flops_fraction") if key not in record]
        if missing:
            raise MoefyError(
                f"{path} has records without {', '.join(missing)} (written by an older moefy?); "
                "delete it and rerun its evaluate job"
            )
    return records


def _keeps(table: pd.DataFrame, metric: str) -> pd.Series:
    relative = table[f"relative_{metric}"]
    return relative >= KEEP if metric == "accuracy" else relative <= 1 / KEEP


def summarise(evaluation_files: Iterable[str | Path]) -> pd.DataFrame:
    """All evaluation records as rows, and per curve (penalty, seed, split, E, selector, rule) the
    smallest FFN FLOPs fraction that keeps 99% of the dense model's quality (accuracy at least
    0.99 x dense, or perplexity at most dense / 0.99; NaN if no point does), and the same for the
    whole model's FLOPs fraction."""
    rows = [record for path in map(Path, evaluation_files) for record in _records(path)]
    if not rows:
        raise MoefyError("no evaluation records to summarise; check the grid in config.yaml")
    table = pd.DataFrame(rows)
    metric = metric_of(table)
    wanted = columns(metric)
    for column in wanted:
        if column not in table:
            table[column] = float("nan")
    for fraction, smallest in (("ffn_flops_fraction", "flops_at_99pct"), ("model_flops_fraction", "model_flops_at_99pct")):
        kept = table[fraction].where(_keeps(table, metric))
        table[smallest] = kept.groupby([table[c] for c in GROUP]).transform("min")
    return table[wanted + [c for c in table.columns if c not in wanted]].sort_values(
        GROUP + ["ffn_flops_fraction"], ignore_index=True
    )


def flops_at_99(table: pd.DataFrame) -> pd.DataFrame:
    """One row per curve of one seed: the smallest FFN and whole-model FLOPs fractions keeping 99%."""
    return table.groupby(GROUP, as_index=False)[["flops_at_99pct", "model_flops_at_99pct"]].first()


def _spread(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def flops_at_99_by_method(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method: flops_at_99pct over its seeds (mean, std, and each seed's value), and
    the whole model's (model_flops_at_99pct_mean). A seed whose curve never keeps 99% makes the
    mean NaN: the method does not reliably get there."""
    per_seed = flops_at_99(table)
    rows = []
    for key, group in per_seed.groupby(METHOD, sort=True):
        ordered = group.sort_values("seed")
        values = ordered["flops_at_99pct"]
        rows.append(
            {
                **dict(zip(METHOD, key)),
                "seeds": len(values),
                "flops_at_99pct_mean": float(values.mean(skipna=False)),
                "flops_at_99pct_std": _spread(values),
                "flops_at_99pct_per_seed": " ".join(f"{v:.3f}" for v in values),
                "model_flops_at_99pct_mean": float(ordered["model_flops_at_99pct"].mean(skipna=False)),
            }
        )
    return pd.DataFrame(rows)


def by_method(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method and point (budget or tau): the relative metric, FLOPs fraction, experts per
    token and agreement with dense as mean (and std) over seeds."""
    metric = metric_of(table)
    relative = f"relative_{metric}"
    keys = METHOD + POINT
    grouped = table.groupby(keys, sort=True, dropna=False)  # a top-k point has no tau, a dynamic one no budget
    out = grouped.agg(
        seeds=("seed", "nunique"),
        **{f"{relative}_mean": (relative, "mean")},
        **{f"{relative}_std": (relative, _spread)},
        ffn_flops_fraction_mean=("ffn_flops_fraction", "mean"),
        model_flops_fraction_mean=("model_flops_fraction", "mean"),
        experts_per_token_mean=("experts_per_token", "mean"),
        dense_agreement_mean=("dense_agreement", "mean"),
        ffn_speedup_mean=("ffn_speedup", "mean"),
    ).reset_index()
    return out.sort_values(METHOD + ["ffn_flops_fraction_mean"], ignore_index=True)


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def plot_relative_vs_flops(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """The relative metric (mean over seeds, with their spread as error bars) against the FFN FLOPs
    fraction, or the whole model's when some conversion converts attention too (its FFN fraction
    would hide what the projections save), one panel per fine-tuning penalty: colour = split /
    selector, solid = top-k, dashed = dynamic-k, thick = after recovery (a darker shade per
    recovery), dotted = FFNs and attention converted; the 99% line dotted grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_of(table)
    curves = by_method(table)
    relative = f"relative_{metric}"
    penalties = sorted(curves["penalty"].unique(), key=PENALTIES.index)
    fig, axes = plt.subplots(1, len(penalties), figsize=(7.5 * len(penalties), 5.5), squeeze=False, sharey=True)
    pairs = sorted({(r.split, r.selector) for r in curves.itertuples()})
    colours = {pair: plt.get_cmap("tab20")(i % 20) for i, pair in enumerate(pairs)}
    styles = {"top_k": "-", "dynamic": "--"}
    markers = {e: m for e, m in zip(sorted(curves["num_experts"].unique()), "os^Dv<>p")}
    seeds = int(table["seed"].nunique())
    whole = bool((curves["convert"] == "ffn+attention").any())
    x = "model_flops_fraction_mean" if whole else "ffn_flops_fraction_mean"
    for ax, penalty in zip(axes[0], penalties):
        part = curves[curves["penalty"] == penalty]
        for (convert, split, num_experts, selector, recovery, rule), group in part.groupby(
            ["convert", "split", "num_experts", "selector", "recovery", "rule"], sort=True
        ):
            label = (
                f"{split} / {selector}"
                + (f" E={num_experts}" if len(markers) > 1 else "")
                + (" dynamic-k" if rule == "dynamic" else "")
                + ("" if recovery == "none" else f" + {recovery}")
                + (" (FFN + attention)" if convert == "ffn+attention" else "")
            )
            shade = 1 - 0.25 * RECOVERIES.index(recovery)
            ax.errorbar(
                group[x],
                group[f"{relative}_mean"],
                yerr=group[f"{relative}_std"] if seeds > 1 else None,
                fmt=":" if convert == "ffn+attention" else styles.get(rule, "-"),
                color=tuple(shade * c for c in colours[(split, selector)][:3]),
                marker=markers.get(num_experts, "o"),
                markersize=3,
                capsize=2,
                linewidth=1.2 if recovery == "none" else 2.4,
                label=label,
            )
        ax.axhline(1.0, color="black", linewidth=1, label="dense")
        ax.axhline(KEEP if metric == "accuracy" else 1 / KEEP, color="grey", linestyle=":", linewidth=1, label="99% of dense")
        ax.set_xlabel("whole-model FLOPs fraction (routers included)" if whole else "FFN FLOPs fraction (router included)")
        ax.set_title(f"fine-tuning penalty: {penalty}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    spread = f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
    axes[0][0].set_ylabel(f"{metric} relative to dense{spread}" + (" (lower is better)" if metric == "perplexity" else ""))
    fig.suptitle(title or f"{metric.capitalize()} against {'whole-model' if whole else 'FFN'} compute")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def summary_files(table: pd.DataFrame, folder: str | Path, title: str = "") -> dict[str, Path]:
    """Write every report file into `folder`; returns them by name."""
    folder = Path(folder)
    files = {
        "summary": folder / "summary.csv",
        "by_method": folder / "by_method.csv",
        "flops_at_99pct": folder / "flops_at_99pct.csv",
        "plot": folder / "accuracy_vs_flops.png",
    }
    write_csv(table, files["summary"])
    write_csv(by_method(table), files["by_method"])
    write_csv(flops_at_99_by_method(table), files["flops_at_99pct"])
    plot_relative_vs_flops(table, files["plot"], title)
    return files


# -- Sparse Upcycling ------------------------------------------------------------------------------

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
    spread = grouped[[f"test_{metric}", f"{metric}_minus_dense"]].agg(_spread).add_suffix("_std")
    return out.join(spread).join(grouped.size().rename("seeds")).reset_index()


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


# -- MC-SMoE: merged and compressed SMoEs -----------------------------------------------------------

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


def merging_table(evaluation_files: Iterable[str | Path], dense_files: Iterable[str | Path] = ()) -> pd.DataFrame:
    """One row per merged model (and the full SMoE) and seed: the task metric, relative to the full
    SMoE of the same upcycled model and seed, minus the dense continuation's; memory, parameters and
    FFN FLOPs relative to the full SMoE; experts per layer."""
    rows = []
    for path in map(Path, evaluation_files):
        record = read_json(path)
        if not isinstance(record, dict) or "merged" not in record or "bytes_on_disk" not in record:
            raise MoefyError(f"{path} is not a record of the evaluate_smoe step; delete it and rerun its job")
        rows.append(
            {
                **{k: record.get(k) for k in MERGING_COLUMNS},
                **{f"test_{m}": record[f"test_{m}"] for m in METRICS if f"test_{m}" in record},
                "experts_per_layer": "/".join(str(n) for n in record.get("experts_per_layer", {}).values()),
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
    for column, name in (("bytes_on_disk", "memory_vs_full"), ("ffn_flops_per_token", "ffn_flops_vs_full")):
        table[name] = [row[column] / of_full(row, column) for _, row in table.iterrows()]
    dense = {}
    for path in map(Path, dense_files):
        record = read_json(path)
        dense[(record.get("penalty"), record.get("seed"))] = record.get(f"test_{metric}")
    table[f"{metric}_minus_dense"] = [
        row[f"test_{metric}"] - (dense.get((row["penalty"], row["seed"])) or float("nan")) for _, row in table.iterrows()
    ]
    order = {"full": 0, "average": 1, "frequency": 2, "prune": 3, "msmoe": 4, "mcsmoe": 5}
    table["_order"] = table["method"].map(lambda m: order.get(m, 9))
    table = table.sort_values(["upcycled", "groups", "_order", "recovery", "seed"], ignore_index=True, na_position="first")
    return table.drop(columns="_order")


def merging_by_method(table: pd.DataFrame) -> pd.DataFrame:
    """Each merged model over its seeds (mean, and std of the task metric), best first within each
    group count: the ranking of the baselines."""
    metric = metric_of(table)
    numbers = [f"test_{metric}", f"{metric}_vs_full", f"{metric}_minus_dense", "memory_vs_full", "ffn_flops_vs_full"]
    grouped = table.fillna({"groups": 0}).groupby(["upcycled", "merged", "method", "groups", "recovery"], sort=False)
    out = grouped[numbers].mean().add_suffix("_mean")
    out = out.join(grouped[[f"test_{metric}"]].agg(_spread).add_suffix("_std")).join(grouped.size().rename("seeds"))
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
    methods = [m for m in ("average", "frequency", "prune", "msmoe", "mcsmoe") if m in set(models["method"])]
    methods += sorted(set(models["method"]) - set(methods) - {"full"})
    markers = dict(zip(methods, "ovs^D<>p"))
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
