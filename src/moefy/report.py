"""The study's summary: one table of every evaluation, and the task metric against FFN compute.

The metric is whatever the evaluate step recorded as test_<metric> (accuracy, or perplexity for
causal language modelling), so the report needs no task of its own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import pandas as pd

from moefy.errors import MoefyError
from moefy.files import atomic_path, read_json

EVALUATION_NAME = re.compile(r"^(?P<split>[a-z]+)-E(?P<num_experts>\d+)-(?P<selector>[a-z]+)\.json$")
PENALTIES = ("none", "l1", "hoyer")
METRICS = ("accuracy", "perplexity")
GROUP = ["penalty", "split", "num_experts", "selector", "rule"]
WALL_CLOCK = ("ffn_ms_dense", "ffn_ms_moe", "ffn_speedup")  # measured, so never bit-identical across runs
KEEP = 0.99  # flops_at_99pct: the smallest FLOPs fraction keeping 99% of the dense model's quality


def reproducible(records: list[dict]) -> list[dict]:
    """An evaluation's records without the wall-clock timings: what a rerun must reproduce exactly."""
    return [{k: v for k, v in record.items() if k not in WALL_CLOCK} for record in records]


def metric_of(table: pd.DataFrame) -> str:
    """The task metric the evaluations recorded (accuracy or perplexity); one per study."""
    found = [m for m in METRICS if f"test_{m}" in table.columns]
    if len(found) != 1:
        raise MoefyError(f"evaluation records should hold exactly one of {', '.join('test_' + m for m in METRICS)}, "
                         f"found {found or 'none'}; rerun the evaluate jobs of one study")
    return found[0]


def columns(metric: str) -> list[str]:
    return GROUP + ["budget", "tau", "k", "experts_per_token", "experts_per_token_std", f"test_{metric}",
                    f"relative_{metric}", "ffn_flops_fraction", "flops_at_99pct", "dense_agreement", f"dense_test_{metric}",
                    *WALL_CLOCK]


def summarise(evaluation_files: Iterable[str | Path]) -> pd.DataFrame:
    """All evaluation records as rows, with the grid's wildcards from the paths
    (evaluate/<penalty>/<split>-E<E>-<selector>.json), and per (penalty, split, E, selector, rule)
    the smallest FFN FLOPs fraction that keeps 99% of the dense model's quality (accuracy at least
    0.99 x dense, or perplexity at most dense / 0.99; NaN if no point does)."""
    rows = []
    for path in map(Path, evaluation_files):
        match = EVALUATION_NAME.match(path.name)
        if match is None or path.parent.name not in PENALTIES:
            raise MoefyError(f"{path} is not named evaluate/<penalty>/<split>-E<num_experts>-<selector>.json as the evaluate step writes")
        for record in read_json(path):
            rows.append({"penalty": path.parent.name, "split": match["split"], "num_experts": int(match["num_experts"]),
                         "selector": match["selector"], "rule": "top_k", "tau": None, **record})
    if not rows:
        raise MoefyError("no evaluation records to summarise; check the grid in config.yaml")
    table = pd.DataFrame(rows)
    metric = metric_of(table)
    wanted = columns(metric)
    for column in wanted:
        if column not in table:
            table[column] = float("nan")
    relative = table[f"relative_{metric}"]
    keeps = relative >= KEEP if metric == "accuracy" else relative <= 1 / KEEP
    table["flops_at_99pct"] = table["ffn_flops_fraction"].where(keeps).groupby([table[c] for c in GROUP]).transform("min")
    return table[wanted + [c for c in table.columns if c not in wanted]].sort_values(
        GROUP + ["ffn_flops_fraction"], ignore_index=True
    )


def flops_at_99(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (penalty, split, E, selector, rule): the smallest FLOPs fraction keeping 99%."""
    return table.groupby(GROUP, as_index=False)["flops_at_99pct"].first()


def plot_accuracy_vs_flops(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """The test metric against FFN FLOPs fraction, one panel per fine-tuning penalty: colour =
    split / selector, solid = top-k, dashed = dynamic-k; the dense model as a black line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_of(table)
    penalties = sorted(table["penalty"].unique(), key=PENALTIES.index)
    fig, axes = plt.subplots(1, len(penalties), figsize=(7.5 * len(penalties), 5.5), squeeze=False, sharey=True)
    pairs = sorted({(r.split, r.selector) for r in table.itertuples()})
    colours = {pair: plt.get_cmap("tab20")(i % 20) for i, pair in enumerate(pairs)}
    styles = {"top_k": "-", "dynamic": "--"}
    markers = {e: m for e, m in zip(sorted(table["num_experts"].unique()), "os^Dv<>p")}
    for ax, penalty in zip(axes[0], penalties):
        part = table[table["penalty"] == penalty]
        for (split, num_experts, selector, rule), group in part.groupby(["split", "num_experts", "selector", "rule"], sort=True):
            group = group.sort_values("ffn_flops_fraction")
            label = f"{split} / {selector}" + (f" E={num_experts}" if len(markers) > 1 else "") + (" dynamic-k" if rule == "dynamic" else "")
            ax.plot(group["ffn_flops_fraction"], group[f"test_{metric}"], styles.get(rule, "-"), color=colours[(split, selector)],
                    marker=markers.get(num_experts, "o"), markersize=3, label=label)
        ax.axhline(part[f"dense_test_{metric}"].iloc[0], color="black", linewidth=1, label="dense")
        ax.set_xlabel("FFN FLOPs fraction (router included)")
        ax.set_title(f"fine-tuning penalty: {penalty}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    axes[0][0].set_ylabel(f"test {metric}" + (" (lower is better)" if metric == "perplexity" else ""))
    fig.suptitle(title or f"{metric.capitalize()} against FFN compute")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
