"""The study's summary: every evaluation in one table, each method over its seeds, and the task
metric against FFN compute.

Every record names its place in the grid (penalty, seed, split, num_experts, shared_experts, router,
recovery) and its rule and allocation, so the report reads no file names. The metric is whatever the evaluate step recorded as
test_<metric> (accuracy, or perplexity for causal language modelling), so the report needs no
task of its own. A method is a grid point without its seed: its numbers over seeds are given as
mean and spread, because one seed on a small test set cannot rank methods at the 99% line; and
each relative accuracy gets an interval from the test set's size (moefy.report.intervals), which
says whether a crossing of the 99% line is resolved and which methods by_method ranks apart.
Every record also says which of its training stages stopped at their cap while still improving
(stopped_at_cap, moefy.training.convergence), and the tables carry it beside its numbers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from moefy.config import ABLATION, PENALTIES, RECOVERIES
from moefy.errors import MoefyError
from moefy.files import atomic_path, read_json
from moefy.report.intervals import keeps_line, method_interval, relative_interval, separated_ranks
from moefy.report.tables import metric_of, spread, write_csv
from moefy.training import convergence

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
        "flops_at_99pct_supported",
        f"relative_{metric}_low",
        f"relative_{metric}_high",
        "keeps_99pct",
        "test_count",
        "model_flops_fraction",
        "model_flops_at_99pct",
        "projection_flops_fraction",
        "dense_agreement",
        f"dense_test_{metric}",
        *WALL_CLOCK,
        "precision",
        "looped_kernel",
        convergence.KEY,
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
        record.setdefault(convergence.KEY, "")  # written before convergence was recorded: not known to be capped
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


def _line(metric: str) -> tuple[float, bool]:
    """The 99% line of relative_<metric> and whether higher is better."""
    return (KEEP, True) if metric == "accuracy" else (1 / KEEP, False)


def _stages(values: pd.Series) -> str:
    """The distinct stopped-at-cap notes of a method's seeds, in one field."""
    return "; ".join(sorted({v for v in values if isinstance(v, str) and v}))


def summarise(evaluation_files: Iterable[str | Path]) -> pd.DataFrame:
    """All evaluation records as rows, and per curve (penalty, seed, split, E, router, rule) the
    smallest FFN FLOPs fraction that keeps 99% of the dense model's quality (accuracy at least
    0.99 x dense, or perplexity at most dense / 0.99; NaN if no point does), and the same for the
    whole model's FLOPs fraction. Each record's relative metric gets its interval (relative_<metric>_low,
    _high; moefy.report.intervals) and keeps_99pct says whether the interval keeps the 99% line
    (yes, no, unresolved; empty without an interval); flops_at_99pct_supported, whether the point
    at flops_at_99pct keeps it with its whole interval (empty without a crossing or an interval)."""
    rows = [record for path in map(Path, evaluation_files) for record in _records(path)]
    if not rows:
        raise MoefyError("no evaluation records to summarise; check the grid in config.yaml")
    table = pd.DataFrame(rows)
    metric = metric_of(table)
    wanted = columns(metric)
    for column in wanted:
        if column not in table:
            table[column] = float("nan")
    relative = f"relative_{metric}"
    table[f"{relative}_low"], table[f"{relative}_high"] = relative_interval(table, metric)
    table["keeps_99pct"] = keeps_line(table[f"{relative}_low"], table[f"{relative}_high"], *_line(metric))
    for fraction, smallest in (("ffn_flops_fraction", "flops_at_99pct"), ("model_flops_fraction", "model_flops_at_99pct")):
        kept = table[fraction].where(_keeps(table, metric))
        table[smallest] = kept.groupby([table[c] for c in GROUP]).transform("min")
    at_crossing = table["ffn_flops_fraction"].eq(table["flops_at_99pct"]) & table["keeps_99pct"].ne("")
    supported = table["keeps_99pct"].eq("yes").astype(float).where(at_crossing)
    supported = supported.groupby([table[c] for c in GROUP]).transform("max")
    table["flops_at_99pct_supported"] = supported.map({1.0: True, 0.0: False}).astype(object)
    return table[wanted + [c for c in table.columns if c not in wanted]].sort_values(
        GROUP + ["ffn_flops_fraction"], ignore_index=True
    )


def flops_at_99(table: pd.DataFrame) -> pd.DataFrame:
    """One row per curve of one seed: the smallest FFN and whole-model FLOPs fractions keeping 99%."""
    columns = ["flops_at_99pct", "flops_at_99pct_supported", "model_flops_at_99pct"]
    return table.groupby(GROUP, as_index=False)[columns].first()


def flops_at_99_by_method(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method: flops_at_99pct over its seeds (mean, std, and each seed's value), and
    the whole model's (model_flops_at_99pct_mean). A seed whose curve never keeps 99% makes the
    mean NaN: the method does not reliably get there. flops_at_99pct_supported: every seed's
    crossing is kept by its whole interval (False if one is not; empty where some seed has no
    crossing or no interval)."""
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
                "flops_at_99pct_supported": _all_supported(ordered["flops_at_99pct_supported"]),
                "model_flops_at_99pct_mean": float(ordered["model_flops_at_99pct"].mean(skipna=False)),
            }
        )
    return pd.DataFrame(rows)


def _all_supported(values: pd.Series):
    if values.isna().any() or not len(values):
        return None
    return bool(values.astype(bool).all())


def by_method(table: pd.DataFrame) -> pd.DataFrame:
    """One row per method and point (budget or tau): the relative metric, FLOPs fraction, experts per
    token and agreement with dense as mean (and std) over seeds; the method's interval of the
    relative metric (the union of its seeds', moefy.report.intervals) and whether it keeps the
    99% line; `rank`, among the methods at the same point, 1 + the number whose interval lies wholly
    better (overlapping intervals share a rank; none without an interval); and the training
    stages that stopped at their cap while still improving."""
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
        test_count=("test_count", "min"),
        **{convergence.KEY: (convergence.KEY, _stages)},
    ).reset_index()
    low, high = f"{relative}_low", f"{relative}_high"
    bounds = [method_interval(g[relative], g[low], g[high]) for _, g in grouped]
    out[low], out[high] = [b[0] for b in bounds], [b[1] for b in bounds]
    line, higher = _line(metric)
    out["keeps_99pct"] = keeps_line(out[low], out[high], line, higher)
    out["rank"] = float("nan")
    for _, index in out.groupby(POINT, dropna=False).groups.items():
        out.loc[index, "rank"] = separated_ranks(out.loc[index, low], out.loc[index, high], higher)
    return out.sort_values(METHOD + ["ffn_flops_fraction_mean"], ignore_index=True)


def plot_relative_vs_flops(table: pd.DataFrame, path: str | Path, title: str = "") -> None:
    """The relative metric (mean over seeds, with its interval as error bars: moefy.report.intervals;
    without intervals the seeds' spread) against the FFN FLOPs
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
            mean, low, high = group[f"{relative}_mean"], group[f"{relative}_low"], group[f"{relative}_high"]
            if low.notna().all() and high.notna().all():
                yerr = [(mean - low).clip(lower=0), (high - mean).clip(lower=0)]
            else:
                yerr = group[f"{relative}_std"] if seeds > 1 else None
            ax.errorbar(
                group[x],
                mean,
                yerr=yerr,
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
    intervals = curves[f"{relative}_low"].notna().all()
    seeds_note = f" (mean over {seeds} seeds)" if seeds > 1 else ""
    seeds_note += ", bars: 95% interval from the test set's size" if intervals else (" ± std" if seeds > 1 else "")
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
