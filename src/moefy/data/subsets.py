"""The data step's files: train/validation/test.jsonl and labels.json.

They are written once by the data step and read by every later step, so reading them needs
nothing heavier than json (no pandas in the steps that only read texts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moefy.errors import MoefyError
from moefy.files import atomic_path, read_json, write_json

SUBSETS = ("train", "validation", "test")
# Why the data step leaves a row out, and how its warning says so (a row is counted once, first reason first).
DROP_REASONS = {
    "blank_text": "with a blank text",
    "missing_label": "with no label",
    "unlisted_label": "with a label not in dataset.labels",
}


@dataclass(frozen=True)
class Dropped:
    """The rows the data step read and those it left out, by reason: a study must never train on
    a fraction of its data without saying so."""

    rows: int
    counts: Mapping[str, int] = field(default_factory=dict)  # reason (DROP_REASONS) -> rows
    unlisted: Sequence[str] = ()  # the labels dropped as not in dataset.labels, most rows first

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def fraction(self) -> float:
        return self.total / self.rows if self.rows else 0.0

    def describe(self) -> str:
        """One line: 'dropped 1,111 of 13,905 rows (8.0%): 14 with a blank text, 1,097 with a label ...'."""
        reasons = []
        for reason, words in DROP_REASONS.items():
            if self.counts.get(reason):
                named = f" ({', '.join(map(repr, self.unlisted[:5]))}{', ...' if len(self.unlisted) > 5 else ''})"
                reasons.append(f"{self.counts[reason]:,} {words}" + (named if reason == "unlisted_label" else ""))
        return f"dropped {self.total:,} of {self.rows:,} rows ({self.fraction:.1%})" + (
            f": {', '.join(reasons)}" if reasons else ""
        )

    def check(self, max_fraction: float) -> None:
        """Refuse data that loses more than `max_fraction` of its rows (dataset.max_dropped_fraction)."""
        if self.fraction > max_fraction:
            raise MoefyError(
                f"config key dataset.max_dropped_fraction: the data loses more rows than {max_fraction} allows "
                f"({self.describe()}); check dataset.text_column, dataset.label_column and dataset.labels, or, if "
                "these rows are meant to go (a hub dataset's unlabelled split, say), set dataset.max_dropped_fraction "
                f"to at least {math.ceil(self.fraction * 1000) / 1000}"
            )

    def record(self) -> dict[str, Any]:
        """What labels.json and MLflow keep: rows read, and rows dropped by every reason (0 included)."""
        return {"rows": self.rows, "dropped": {reason: int(self.counts.get(reason, 0)) for reason in DROP_REASONS}}


def _rerun_hint(path: Path) -> str:
    return f"delete it and rerun the data step (`snakemake --cores all {path}`)"


def write_subsets(
    out_dir: str | Path, subsets: Mapping[str, Mapping[str, Any]], label_names: Sequence[str], dropped: Dropped
) -> None:
    """Write train/validation/test.jsonl and labels.json, each appearing only once complete.

    Each subset is a table with columns text and, for classification, label (label ids); without a
    label column (causal LM) rows are {"text"} and there are no label names. labels.json also
    holds the rows read and those dropped, by reason."""
    out_dir = Path(out_dir)
    for subset in SUBSETS:
        frame = subsets[subset]
        with atomic_path(out_dir / f"{subset}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            labels = frame["label"] if "label" in frame else [None] * len(frame["text"])
            for text, label in zip(frame["text"], labels):
                row = {"text": str(text)} if label is None else {"text": str(text), "label": int(label)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_json(
        out_dir / "labels.json",
        {
            "names": [str(n) for n in label_names],
            "sizes": {subset: len(subsets[subset]["text"]) for subset in SUBSETS},
            **dropped.record(),
        },
    )


def read_subset(path: str | Path) -> tuple[list[str], list[int] | None]:
    """Read one subset written by write_subsets: (texts, labels), labels None for a text-only subset.

    A damaged file is an error, never a silently shorter subset."""
    path = Path(path)
    if not path.is_file():
        raise MoefyError(f"{path} does not exist; run the data step first (`snakemake --cores all {path}`)")
    texts: list[str] = []
    labels: list[int] = []
    labelled = None
    lineno = 0
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007 (the error below names the line)
                if not line.endswith("\n"):
                    raise ValueError("last line is cut off")
                row = json.loads(line)
                if labelled is None:
                    labelled = isinstance(row, dict) and "label" in row
                if not isinstance(row.get("text"), str):
                    raise ValueError('expected {"text": string} or {"text": string, "label": integer}')
                if labelled:
                    if isinstance(row.get("label"), bool) or not isinstance(row.get("label"), int):
                        raise ValueError('expected {"text": string, "label": integer}')
                    labels.append(row["label"])
                elif "label" in row:
                    raise ValueError("a label in a subset whose first row has none")
                texts.append(row["text"])
    except (UnicodeDecodeError, ValueError, AttributeError) as err:
        raise MoefyError(f"{path} is damaged at line {lineno} ({err}); {_rerun_hint(path)}") from None
    return texts, (labels if labelled else None)


def read_label_names(data_dir: str | Path) -> list[str]:
    path = Path(data_dir) / "labels.json"
    obj = read_json(path)
    names = obj.get("names") if isinstance(obj, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise MoefyError(f"{path} has no list of label names under 'names'; {_rerun_hint(path)}")
    return names
