"""The study's summary: one table of every evaluation, and accuracy against FFN compute."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import pandas as pd

from moefy.errors import MoefyError
from moefy.files import atomic_path, read_json

EVALUATION_NAME = re.compile(r"^(?P<split>[a-z]+)-E(?P<num_experts>\d+)-(?P<selector>[a-z]+)\.json$")
COLUMNS = ["split", "num_experts", "selector", "budget", "k", "experts_per_token", "test_accuracy",
           "relative_accuracy", "ffn_flops_fraction", "dense_agreement", "dense_test_accuracy",
           "ffn_ms_dense", "ffn_ms_moe", "ffn_speedup"]
WALL_CLOCK = ("ffn_ms_dense", "ffn_ms_moe", "ffn_speedup")  # measured, so never bit-identical across runs


def reproducible(records: list[dict]) -> list[dict]:
    """An evaluation's records without the wall-clock timings: what a rerun must reproduce exactly."""
    return [{k: v for k, v in record.items() if k not in WALL_CLOCK} for record in records]


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
    return table[COLUMNS + [c for c in table.columns if c not in COLUMNS]].sort_values(
        ["split", "num_experts", "selector", "budget"], ignore_index=True
    )


def plot_accuracy_vs_flops(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """One line per (split, E, selector): test accuracy against FFN FLOPs fraction; dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    # colour = split method, line style = selector, marker = number of experts
    styles = {"groundtruth": ":", "similarity": "--", "mlp": "-"}
    colours = {split: f"C{i}" for i, split in enumerate(sorted(table["split"].unique()))}
    markers = {e: m for e, m in zip(sorted(table["num_experts"].unique()), "os^Dv<>p")}
    for (split, num_experts, selector), group in table.groupby(["split", "num_experts", "selector"], sort=True):
        group = group.sort_values("ffn_flops_fraction")
        label = f"{split} / {selector}" + (f" (E={num_experts})" if len(markers) > 1 else "")
        ax.plot(group["ffn_flops_fraction"], group["test_accuracy"], styles.get(selector, "-"), color=colours[split],
                marker=markers.get(num_experts, "o"), label=label)
    ax.axhline(table["dense_test_accuracy"].iloc[0], color="black", linewidth=1, label="dense")
    ax.set_xlabel("FFN FLOPs fraction (router included)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "Accuracy against FFN compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
