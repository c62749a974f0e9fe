"""The study's summary: every evaluation in one table, each method over its seeds, and the task
metric against FFN compute.

Every record names its place in the grid (penalty, seed, split, num_experts, shared_experts, router,
recovery) and its rule and allocation, so the report reads no file names. The metric is whatever the evaluate step recorded as
test_<metric> (accuracy, or perplexity for causal language modelling), so the report needs no
task of its own. A method is a grid point without its seed: its numbers over seeds are given as
mean and spread, because one seed on a small test set cannot rank methods at the 99% line.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from moefy.config import ABLATION, PENALTIES, RECOVERIES
from moefy.errors import MoefyError
from moefy.files import atomic_path, read_json
from moefy.report.tables import metric_of, spread, write_csv

IDENTITY = ABLATION
GROUP = [*IDENTITY, "rule", "allocation"]  # one curve of one seed
METHOD = [key for key in GROUP if key != "seed"]  # one curve over seeds
POINT = ["budget", "tau"]  # one point of a curve
# measured, so never bit-identical across runs
WALL_CLOCK = ("ffn_ms_dense", "ffn_ms_moe", "ffn_speedup", "model_ms_dense", "model_ms_moe", "model_speedup")
KEEP = 0.99  # flops_at_99pct: the smallest FLOPs fraction keeping 99% of the dense model's quality


def reproducible(records: list[dict]) -> list[dict]:
    """An evaluation's records without the wall-clock timings: what a rerun must reproduce exactly."""
    return [{k: v for k, v in record.items() if k not in WALL_CLOCK} for record in records]


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
        record.setdefault("shared_experts", 0)  # written before shared experts existed: none
        record.setdefault("allocation", "uniform")  # written before per-layer budgets existed: uniform
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
    """All evaluation records as rows, and per curve (penalty, seed, split, E, router, rule) the
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
                "flops_at_99pct_std": spread(values),
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
    second = "second_relative_perplexity" in table  # measured on a second corpus too (config second_corpus)
    grouped = table.groupby(keys, sort=True, dropna=False)  # a top-k point has no tau, a dynamic one no budget
    out = grouped.agg(
        seeds=("seed", "nunique"),
        **{f"{relative}_mean": (relative, "mean")},
        **{f"{relative}_std": (relative, spread)},
        ffn_flops_fraction_mean=("ffn_flops_fraction", "mean"),
        model_flops_fraction_mean=("model_flops_fraction", "mean"),
        experts_per_token_mean=("experts_per_token", "mean"),
        dense_agreement_mean=("dense_agreement", "mean"),
        ffn_speedup_mean=("ffn_speedup", "mean"),
        **({"second_relative_perplexity_mean": ("second_relative_perplexity", "mean")} if second else {}),
    ).reset_index()
    return out.sort_values(METHOD + ["ffn_flops_fraction_mean"], ignore_index=True)


def plot_relative_vs_flops(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """The relative metric (mean over seeds, with their spread as error bars) against the FFN FLOPs
    fraction, or the whole model's when some conversion converts attention too (its FFN fraction
    would hide what the projections save), one panel per fine-tuning penalty: colour = split /
    router, solid = top-k, dashed = dynamic-k, thick = after recovery (a darker shade per
    recovery), dotted = FFNs and attention converted; the 99% line dotted grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_of(table)
    curves = by_method(table)
    relative = f"relative_{metric}"
    penalties = sorted(curves["penalty"].unique(), key=PENALTIES.index)
    fig, axes = plt.subplots(1, len(penalties), figsize=(7.5 * len(penalties), 5.5), squeeze=False, sharey=True)
    pairs = sorted({(r.split, r.router, r.shared_experts, r.allocation) for r in curves.itertuples()})
    colours = {pair: plt.get_cmap("tab20")(i % 20) for i, pair in enumerate(pairs)}
    styles = {"top_k": "-", "dynamic": "--"}
    markers = {e: m for e, m in zip(sorted(curves["num_experts"].unique()), "os^Dv<>p")}
    seeds = int(table["seed"].nunique())
    whole = bool((curves["convert"] == "ffn+attention").any())
    x = "model_flops_fraction_mean" if whole else "ffn_flops_fraction_mean"
    for ax, penalty in zip(axes[0], penalties):
        part = curves[curves["penalty"] == penalty]
        for (convert, split, num_experts, shared, router, recovery, rule, allocation), group in part.groupby(
            ["convert", "split", "num_experts", "shared_experts", "router", "recovery", "rule", "allocation"], sort=True
        ):
            label = (
                f"{split} / {router}"
                + (f" E={num_experts}" if len(markers) > 1 else "")
                + (f" S={shared}" if shared else "")
                + ("" if allocation == "uniform" else f" {allocation}")
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
                color=tuple(shade * c for c in colours[(split, router, shared, allocation)][:3]),
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
    seeds_note = f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
    axes[0][0].set_ylabel(f"{metric} relative to dense{seeds_note}" + (" (lower is better)" if metric == "perplexity" else ""))
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
