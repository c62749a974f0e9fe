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
COLUMNS = ["split", "num_experts", "selector", "budget", "k", "experts_per_token"]
METRICS = ("accuracy", "perplexity")


def summarise(evaluation_files: Iterable[str | Path]) -> pd.DataFrame:
    """All evaluation records as rows, with split / num_experts / selector from the file names."""
    rows = []
    for path in map(Path, evaluation_files):
        match = EVALUATION_NAME.match(path.name)
        if match is None:
            raise MoefyError(f"{path} is not named <split>-E<num_experts>-<selector>.json as the evaluate step writes")
        for record in read_json(path):
            rows.append({"split": match["split"], "num_experts": int(match["num_experts"]), "selector": match["selector"], **record})
    if not rows:
        raise MoefyError("no evaluation records to summarise; check the grid in config.yaml")
    table = pd.DataFrame(rows)
    metric = metric_of(table)
    first = COLUMNS + [f"test_{metric}", f"relative_{metric}", "ffn_flops_fraction", "dense_agreement", f"dense_test_{metric}"]
    first = [c for c in first if c in table.columns]
    return table[first + [c for c in table.columns if c not in first]].sort_values(
        ["split", "num_experts", "selector", "budget"], ignore_index=True
    )


def metric_of(table: pd.DataFrame) -> str:
    """The task metric the evaluations recorded (accuracy or perplexity); one per study."""
    found = [m for m in METRICS if f"test_{m}" in table.columns]
    if len(found) != 1:
        raise MoefyError(f"evaluation records should hold exactly one of {', '.join('test_' + m for m in METRICS)}, "
                         f"found {found or 'none'}; rerun the evaluate jobs of one study")
    return found[0]


def plot_accuracy_vs_flops(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """One line per (split, E, selector): the test metric against FFN FLOPs fraction; dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_of(table)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    # colour = split method, line style = selector, marker = number of experts
    styles = {"groundtruth": ":", "similarity": "--", "mlp": "-"}
    colours = {split: f"C{i}" for i, split in enumerate(sorted(table["split"].unique()))}
    markers = {e: m for e, m in zip(sorted(table["num_experts"].unique()), "os^Dv<>p")}
    for (split, num_experts, selector), group in table.groupby(["split", "num_experts", "selector"], sort=True):
        group = group.sort_values("ffn_flops_fraction")
        label = f"{split} / {selector}" + (f" (E={num_experts})" if len(markers) > 1 else "")
        ax.plot(group["ffn_flops_fraction"], group[f"test_{metric}"], styles.get(selector, "-"), color=colours[split],
                marker=markers.get(num_experts, "o"), label=label)
    ax.axhline(table[f"dense_test_{metric}"].iloc[0], color="black", linewidth=1, label="dense")
    ax.set_xlabel("FFN FLOPs fraction (router included)")
    ax.set_ylabel(f"test {metric}" + (" (lower is better)" if metric == "perplexity" else ""))
    ax.set_title(title or f"{metric.capitalize()} against FFN compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
