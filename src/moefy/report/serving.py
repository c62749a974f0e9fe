"""The served models side by side: what each runtime measured of every served folder and of the dense
model it came from, with decode and prompt speed relative to that dense model in the same runtime.

A served model is worth its export only where it runs: the row puts the export's own check (logits
against moefy's), llama.cpp's perplexity and tokens/s per GGUF type, and lm-eval's perplexity in one
place, so the report answers "does it load, is it the same model, is it faster" without opening
three JSON files per folder. Speed ratios compare a model only with the dense model of its own
variant in the same GGUF type: llama.cpp's F32 and Q8_0 are different runtimes as far as speed goes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from moefy.errors import MoefyError
from moefy.files import read_json

DENSE = "dense"  # the served folder name of the dense model each variant's served models came from
SERVED_FIELDS = ("architecture", "routed_experts", "experts_per_token", "duplicated_experts", "logit_difference", "bytes")
GGUF_FIELDS = ("bytes", "perplexity", "prompt_tokens_per_s", "decode_tokens_per_s")


def _key(path: Path, depth: int) -> tuple[str, str]:
    """(variant, served folder) of a record `depth` folders below serve/<variant>/<served>/."""
    folder = path.parents[depth - 1]
    return folder.parent.name, folder.name


def serving_table(
    served: Iterable[str | Path], gguf: Iterable[str | Path] = (), harness: Iterable[str | Path] = ()
) -> pd.DataFrame:
    """One row per served folder (serve/<variant>/<served>/served.json) and per dense model measured
    beside them: the export's record, then per GGUF type T the columns T_bytes, T_perplexity,
    T_prompt_tokens_per_s, T_decode_tokens_per_s, T_prompt_vs_dense, T_decode_vs_dense, then lm-eval's
    offline perplexity (harness_perplexity; harness_same_as_evaluate says whether it is moefy's)."""
    rows: dict[tuple[str, str], dict] = {}

    def row(key: tuple[str, str]) -> dict:
        return rows.setdefault(key, {"variant": key[0], "served": key[1]})

    for path in map(Path, served):
        record = read_json(path)
        row(_key(path, 1)).update({field: record.get(field) for field in SERVED_FIELDS})
    types: list[str] = []
    for path in map(Path, gguf):
        for record in read_json(path).get("records", []):
            outtype = record["type"]
            types += [outtype] if outtype not in types else []
            row(_key(path, 2)).update({f"{outtype}_{field}": record[field] for field in GGUF_FIELDS})
    for path in map(Path, harness):
        offline = read_json(path)["offline"]
        row(_key(path, 1)).update(
            {"harness_perplexity": offline["perplexity"], "harness_same_as_evaluate": offline["same_as_evaluate"]}
        )
    if not rows:
        raise MoefyError("no served records to report: ask for serve/<variant>/<served>/served.json files")
    table = pd.DataFrame(list(rows.values()))
    for outtype in types:
        for speed in ("prompt", "decode"):
            column = f"{outtype}_{speed}_tokens_per_s"
            dense = table[table["served"] == DENSE].set_index("variant")[column]
            table[f"{outtype}_{speed}_vs_dense"] = table[column] / table["variant"].map(dense)
    # the dense model first in each variant, then the served folders by name
    order = table.assign(_dense=table["served"] != DENSE).sort_values(["variant", "_dense", "served"]).index
    return table.loc[order].reset_index(drop=True)


def decode_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The log's short form: per model, perplexity and decode tokens/s with the ratio to dense per GGUF type."""
    keep = ["variant", "served", "logit_difference", "harness_perplexity"]
    keep += [c for c in table.columns if c.endswith(("_perplexity", "_decode_tokens_per_s", "_decode_vs_dense"))]
    return table[[c for c in dict.fromkeys(keep) if c in table.columns]]
