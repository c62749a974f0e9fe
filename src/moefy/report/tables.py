"""What the three reports (summary, upcycling, merging) share: the task metric their records hold,
the spread over seeds, and their CSV files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from moefy.errors import MoefyError
from moefy.files import atomic_path

METRICS = ("accuracy", "perplexity")


def metric_of(table: pd.DataFrame) -> str:
    """The task metric the evaluations recorded (accuracy or perplexity); one per study."""
    found = [m for m in METRICS if f"test_{m}" in table.columns]
    if len(found) != 1:
        raise MoefyError(
            f"evaluation records should hold exactly one of {', '.join('test_' + m for m in METRICS)}, "
            f"found {found or 'none'}; rerun the evaluate jobs of one study"
        )
    return found[0]


def spread(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def write_csv(table: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
