"""The merging methods ranked per metric, and where the rankings disagree.

REAP (Lasby et al., 2026) found that merging looks as good as pruning on multiple-choice scores
and collapses on generation; one ranking by classification accuracy would hide that. So every
metric the merging arms measure ranks the methods on its own: accuracy relative to the full SMoE
(a classification arm), perplexity relative to the full SMoE and greedy-generation agreement with
it (a causal-LM arm, moefy.measure.generation). Arms of different models meet at the same share
of the full SMoE's experts kept (50%, 25%) and the same recovery.

Ranks only separate what the intervals separate (moefy.report.intervals.separated_ranks): a
method's interval at a point is the union of its seeds' per-record intervals (generation
agreement: the prompts' 95% interval) or, without them, its seeds' range; a single seed without
an interval is a point, so two methods with one seed each are ordered by their values and share a
rank only when equal. A flip is a pair of methods that one metric ranks strictly one way and
another metric strictly the other way at the same point.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pandas as pd

from moefy.report.intervals import method_interval, separated_ranks
from moefy.report.tables import metric_of

# metric: (column of merging_table, higher is better, how statements call it)
RANKED = {
    "accuracy": ("accuracy_vs_full", True, "accuracy"),
    "perplexity": ("perplexity_vs_full", False, "perplexity"),
    "generation_agreement": ("generation_agreement", True, "generation agreement"),
}
PRUNING = ("prune", "reap")  # methods that drop experts; the others merge them
RANK_COLUMNS = ["experts_kept", "recovery", "metric", "upcycled", "method", "value", "low", "high", "seeds", "rank"]


def metric_ranks(tables: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """One row per point (share of experts kept, recovery), metric, upcycled model and method: the
    value (mean over seeds), its interval and its rank among the methods on that model at that point
    (1 best). `tables`: merging_table's tables, one per arm; the full SMoE is left out."""
    rows = []
    for table in tables:
        metrics = [metric_of(table)] + (["generation_agreement"] if "generation_agreement" in table else [])
        merged = table[table["method"] != "full"]
        for metric in metrics:
            column = RANKED[metric][0]
            lows, highs = (f"{column}_low", f"{column}_high") if f"{column}_low" in merged else (None, None)
            key = ["experts_kept", "recovery", "upcycled", "method"]
            for (kept, recovery, upcycled, method), seeds in merged.groupby(key, sort=False):
                values = seeds[column].astype(float)
                nan = pd.Series(float("nan"), index=seeds.index)
                low, high = method_interval(values, seeds[lows] if lows else nan, seeds[highs] if highs else nan)
                if pd.isna(low) and values.notna().sum() == 1:  # one seed, no interval: the point itself
                    low = high = float(values.dropna().iloc[0])
                rows.append(
                    {
                        "experts_kept": round(float(kept), 4),
                        "recovery": recovery,
                        "metric": metric,
                        "upcycled": upcycled,
                        "method": method,
                        "value": float(values.mean()),
                        "low": low,
                        "high": high,
                        "seeds": int(values.notna().sum()),
                    }
                )
    ranks = pd.DataFrame(rows, columns=RANK_COLUMNS[:-1])
    ranks["rank"] = float("nan")
    for (*_, metric), point in ranks.groupby(["experts_kept", "recovery", "upcycled", "metric"], sort=False):
        ranks.loc[point.index, "rank"] = separated_ranks(point["low"], point["high"], RANKED[metric][1])
    order = {m: i for i, m in enumerate(RANKED)}
    ranks["_order"], ranks["_recovered"] = ranks["metric"].map(order), ranks["recovery"] != "none"  # as merged first
    keys = ["experts_kept", "_recovered", "recovery", "_order", "upcycled", "rank", "method"]
    ranks = ranks.sort_values(keys, ascending=[False, True, True, True, True, True, True])
    return ranks.drop(columns=["_order", "_recovered"]).reset_index(drop=True)


def _pruning_line(rows: pd.DataFrame, label: str) -> str:
    pruning, merging = rows[rows["method"].isin(PRUNING)], rows[~rows["method"].isin(PRUNING)]
    if pruning.empty or merging.empty:
        return ""
    best_pruning, best_merging = pruning["rank"].min(), merging["rank"].min()
    verdict = (
        "pruning ranks first" if best_pruning < best_merging else "merging ranks first" if best_merging < best_pruning else "tied"
    )
    return f"{label}: {verdict} (best pruning rank {best_pruning:g}, best merging rank {best_merging:g})"


def flips(ranks: pd.DataFrame) -> list[str]:
    """Per point: each ranking's order (a metric on one upcycled model, named after the metric, and
    after the model too where a metric has several), whether pruning (prune, reap) or merging ranks
    first, and every pair of methods two rankings order strictly opposite ways (or that none does)."""
    lines = []
    for (kept, recovery), point in ranks.groupby(["experts_kept", "recovery"], sort=False):
        point = point[point["rank"].notna()]
        several = point.groupby("metric")["upcycled"].nunique() > 1
        rankings = {}  # label: {method: rank}
        for (metric, upcycled), rows in point.groupby(["metric", "upcycled"], sort=False):
            label = RANKED[metric][2] + (f" ({upcycled})" if several[metric] else "")
            rankings[label] = rows.sort_values(["rank", "method"])
        lines.append(f"{kept:.0%} of the experts kept, recovery {recovery}:")
        lines += [
            f"  {label}: " + ", ".join(f"{r.method} ({r.rank:g})" for r in rows.itertuples()) for label, rows in rankings.items()
        ]
        lines += [f"  {line}" for line in (_pruning_line(rows, label) for label, rows in rankings.items()) if line]
        found = False
        for a, b in itertools.combinations(rankings, 2):
            rank_a, rank_b = (rankings[x].set_index("method")["rank"] for x in (a, b))
            for x, y in itertools.permutations(sorted(set(rank_a.index) & set(rank_b.index)), 2):
                if rank_a[x] < rank_a[y] and rank_b[x] > rank_b[y]:
                    found = True
                    lines.append(
                        f"  flip: {a} ranks {x} ({rank_a[x]:g}) above {y} ({rank_a[y]:g}), "
                        f"{b} ranks {y} ({rank_b[y]:g}) above {x} ({rank_b[x]:g})"
                    )
        if not found:
            lines.append(
                "  no flip: " + ("no two rankings order two methods opposite ways" if len(rankings) > 1 else "one ranking")
            )
    return lines
