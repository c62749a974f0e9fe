"""A second corpus: texts of another domain that evaluations measure perplexity on too.

A conversion is calibrated (co-activations, routers, error curves) on the task's own texts; its
perplexity on the test subset of those texts says nothing about whether it holds on others. The
second corpus is drawn once, seeded, and written like a data subset ({"text"} per line).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from moefy.errors import MoefyError
from moefy.files import atomic_path


def draw_texts(texts: pd.Series, max_texts: int, seed: int) -> list[str]:
    """Up to max_texts distinct non-blank texts, drawn at random (seeded), in their file order."""
    cleaned = texts[texts.notna()].astype(str).str.strip()
    distinct = cleaned[cleaned != ""].drop_duplicates()
    if distinct.empty:
        raise MoefyError("the second corpus has no non-blank texts; check second_corpus.text_column")
    if len(distinct) > max_texts:
        distinct = distinct.sample(n=max_texts, random_state=seed).sort_index()
    return distinct.tolist()


def write_texts(path: str | Path, texts: Sequence[str]) -> None:
    """Write texts as a subset file (read back by moefy.data.subsets.read_subset)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
