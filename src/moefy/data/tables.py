"""The task's data: reading the user's table (CSV, JSONL, Parquet or a Hugging Face dataset) and
dividing it into the train / validation / test subsets without leakage.

Everything downstream reads the three jsonl files that moefy.data.subsets writes from these subsets,
so label ids and the subsets are decided once, from the seed, and never recomputed by later steps.
"""

from __future__ import annotations

import lzma
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from moefy.config import section_defaults
from moefy.data.subsets import SUBSETS, Dropped
from moefy.errors import MoefyError

FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zip")
MAX_DROPPED_FRACTION = section_defaults("dataset")["max_dropped_fraction"]


def _format_of(path: Path) -> tuple[str, str | None]:
    """Return (format suffix, compression suffix or None) from names like `x.csv.bz2`."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    return (suffixes[-1] if suffixes else ""), compression


def _read(path: Path, fmt: str) -> pd.DataFrame:
    # Only empty cells are missing: a review whose text is "NA" or "null" is still a review.
    if fmt == ".csv":
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    if fmt == ".tsv":
        return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])
    # dtype=False keeps JSON's own types, so a label "1" stays a string and 1 an int.
    if fmt == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    if fmt == ".json":
        return pd.read_json(path, dtype=False)
    return pd.read_parquet(path)


def _pick_columns(df: pd.DataFrame, text_column: str, label_column: str | None, source: str) -> pd.DataFrame:
    """Columns text and label (label all missing when label_column is None: a text-only task)."""
    if label_column is None:
        if text_column not in df.columns:
            raise MoefyError(
                f"{source} has no column {text_column!r} (its columns: {', '.join(map(str, df.columns))}); "
                f"set dataset.text_column to one of them"
            )
        return pd.DataFrame({"text": df[text_column], "label": None}).reset_index(drop=True)
    if text_column == label_column:
        raise MoefyError(
            f"dataset.text_column and dataset.label_column are both {text_column!r}; they must name two different columns of {source}"
        )
    columns = [str(c) for c in df.columns]
    for key, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in df.columns:
            raise MoefyError(
                f"{source} has no column {column!r} (its columns: {', '.join(columns)}); set dataset.{key} to one of them"
            )
    return pd.DataFrame({"text": df[text_column], "label": df[label_column]}).reset_index(drop=True)


def _integral_floats_to_int(labels: pd.Series) -> pd.Series:
    """A CSV integer column with a blank cell comes back as float; give back the ints the user wrote."""
    if pd.api.types.is_float_dtype(labels):
        present = labels.dropna()
        if len(present) and (present == present.round()).all():
            return labels.astype("Int64")
    return labels


def load_table(path: str | Path, text_column: str, label_column: str | None) -> pd.DataFrame:
    """Read a local CSV/TSV/JSONL/JSON/Parquet file (optionally .gz/.bz2/.xz/.zip) into columns text, label
    (label_column None: texts only, for causal language modelling)."""
    path = Path(path)
    if not path.is_file():
        raise MoefyError(f"data file {path} does not exist (or is not a file); fix dataset.path in the config")
    fmt, compression = _format_of(path)
    if fmt not in FORMATS or (fmt == ".parquet" and compression):
        raise MoefyError(
            f"cannot tell the format of {path} from its name; supported: "
            f"{', '.join(FORMATS)}, the text formats optionally followed by {', '.join(COMPRESSIONS)} "
            f"(e.g. reviews.csv.bz2); rename the file or convert it"
        )
    try:
        df = _read(path, fmt)
    except UnicodeDecodeError as err:  # a ValueError, but "check the format" would not say what to do
        raise MoefyError(
            f"data file {path} is not UTF-8 text ({err}); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8), "
            "or convert it to Parquet"
        ) from None
    except (ValueError, OSError, EOFError, ImportError, zipfile.BadZipFile, lzma.LZMAError) as err:
        raise MoefyError(
            f"could not read {path} as {fmt[1:]} ({type(err).__name__}: {err}); check that the file is complete and in that format"
        ) from None
    df = _pick_columns(df, text_column, label_column, f"data file {path}")
    if df.empty:  # a header alone: without this, "dataset.labels never occur" would be the message
        raise MoefyError(f"data file {path} has no rows, only its header; fix dataset.path or the file")
    df["label"] = _integral_floats_to_int(df["label"])
    return df


def load_hub(name: str, config: str | None, text_column: str, label_column: str | None) -> pd.DataFrame:
    """Pool every split of a Hugging Face dataset into columns text, label (moefy divides them into its own subsets)."""
    try:
        import datasets
    except ImportError:
        raise MoefyError(
            "dataset.hub needs the Hugging Face `datasets` package, which is not installed; "
            "run `pip install 'moefy[hub]'`, or point dataset.path at a local file instead"
        ) from None
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as err:  # the hub stack raises many unrelated types (requests, httpx, hub, datasets)
        raise MoefyError(
            f"could not load Hugging Face dataset {name!r} (config {config!r}): {type(err).__name__}: {err}. "
            f"The hub may be unreachable from this machine, or the name/config may be wrong; check them, "
            f"or download the data elsewhere and point dataset.path at a local CSV/JSONL/Parquet file"
        ) from None
    parts = loaded.items() if hasattr(loaded, "items") else [("all", loaded)]
    frames = []
    for split, ds in parts:
        source = f"Hugging Face dataset {name!r} split {split!r}"
        wanted = [c for c in (text_column, label_column) if c is not None]
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            raise MoefyError(
                f"{source} has no column {missing[0]!r} (its columns: {', '.join(ds.column_names)}); "
                f"set dataset.text_column / dataset.label_column to one of them"
            )
        frame = _pick_columns(ds.select_columns(wanted).to_pandas(), text_column, label_column, source)
        feature = ds.features[label_column] if label_column is not None else None
        if isinstance(feature, datasets.ClassLabel):
            # -1 marks unlabeled rows (e.g. GLUE test sets); they become missing and are dropped later.
            frame["label"] = frame["label"].map(dict(enumerate(feature.names)))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _label_str(value) -> str:
    """Compare labels as strings so YAML `1` and a CSV "1" (or 1.0) are the same class."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _sorted_names(values) -> list[str]:
    try:
        ordered = sorted(values)  # numeric labels in numeric order (2 before 10)
    except TypeError:
        ordered = sorted(values, key=_label_str)
    return list(dict.fromkeys(_label_str(v) for v in ordered))


def _listing(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    for key, fraction in (("validation_fraction", validation_fraction), ("test_fraction", test_fraction)):
        if not 0 < fraction < 1:
            raise MoefyError(f"dataset.{key} is {fraction}; it must be between 0 and 1 (exclusive)")
    if validation_fraction + test_fraction >= 1:
        raise MoefyError(
            f"dataset.validation_fraction + dataset.test_fraction = {validation_fraction + test_fraction} "
            f"leaves nothing for training; make their sum smaller than 1"
        )


def _subset_rows(texts: pd.Series, validation_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """The subset of every row, decided per distinct text so no text is in two subsets."""
    codes, unique_texts = pd.factorize(texts)
    n = len(unique_texts)
    n_test = round(test_fraction * n)
    n_val = round(validation_fraction * n)
    sizes = {"test": n_test, "validation": n_val, "train": n - n_test - n_val}
    for subset, size in sizes.items():
        if size <= 0:
            raise MoefyError(
                f"the {subset} subset would be empty: there are only {n} distinct texts, and with "
                f"dataset.validation_fraction={validation_fraction}, dataset.test_fraction={test_fraction} "
                f"none of them goes to {subset}; use more data or adjust the fractions"
            )
    order = np.random.default_rng(seed).permutation(n)
    subset_of_text = np.empty(n, dtype=object)
    subset_of_text[order[:n_test]] = "test"
    subset_of_text[order[n_test : n_test + n_val]] = "validation"
    subset_of_text[order[n_test + n_val :]] = "train"
    return subset_of_text[codes]


def _stripped_texts(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(texts stripped of surrounding whitespace, which of them are blank: missing or empty)."""
    texts = df["text"].where(df["text"].isna(), df["text"].astype(str).str.strip())
    return texts, texts.isna() | (texts == "")


def prepare_texts(
    df: pd.DataFrame,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    max_dropped_fraction: float = MAX_DROPPED_FRACTION,
) -> tuple[dict[str, pd.DataFrame], Dropped]:
    """Texts only (causal language modelling): clean and divide into subsets by distinct text, like
    prepare_subsets. Returns the subsets and the blank texts dropped."""
    _check_fractions(validation_fraction, test_fraction)
    texts, blank = _stripped_texts(df)
    texts = texts[~blank].reset_index(drop=True)
    if texts.empty:
        raise MoefyError("the text column has no non-blank texts; check dataset.text_column")
    dropped = Dropped(len(df), {"blank_text": int(blank.sum())})
    dropped.check(max_dropped_fraction)
    subset_of_row = _subset_rows(texts, validation_fraction, test_fraction, seed)
    values = texts.to_numpy()
    return {subset: pd.DataFrame({"text": values[subset_of_row == subset]}) for subset in SUBSETS}, dropped


def prepare_subsets(
    df: pd.DataFrame,
    labels: list | None,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    max_dropped_fraction: float = MAX_DROPPED_FRACTION,
) -> tuple[dict[str, pd.DataFrame], list[str], Dropped]:
    """Clean, filter and divide into subsets by distinct text, so no text is both trained on and evaluated on.

    Rows with a blank text, no label or a label not in `labels` are dropped and counted; more than
    `max_dropped_fraction` of the rows dropped is an error. Returns ({"train", "validation",
    "test"} -> DataFrame(text, label id int64), label names, what was dropped).
    """
    _check_fractions(validation_fraction, test_fraction)
    texts, blank = _stripped_texts(df)
    no_label = ~blank & df["label"].isna()
    rows = pd.DataFrame({"text": texts, "raw": df["label"]})[~blank & ~no_label]
    rows["name"] = rows["raw"].map(_label_str)
    occurring = _sorted_names(rows["raw"].unique())
    unlisted = pd.Series([], dtype=object)

    if labels is None:
        names = occurring
    else:
        names = [_label_str(v) for v in labels]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise MoefyError(f"dataset.labels lists {_listing(twice)} more than once; list each class once")
        absent = [n for n in names if n not in set(occurring)]
        if absent:
            raise MoefyError(
                f"dataset.labels asks for {_listing(absent)}, which never occurs in the label column "
                f"(labels that occur: {_listing(occurring)}); fix dataset.labels or dataset.label_column"
            )
        listed = rows["name"].isin(names)
        unlisted = rows["name"][~listed]
        rows = rows[listed]
    if not names:
        raise MoefyError(
            "no row of the data has both a non-blank text and a label; check dataset.text_column and dataset.label_column"
        )
    if len(names) < 2:
        raise MoefyError(
            f"only {len(names)} class ({_listing(names)}) has rows with a non-blank text; "
            f"classification needs at least 2 — check dataset.label_column and dataset.labels"
        )
    counts = {"blank_text": int(blank.sum()), "missing_label": int(no_label.sum()), "unlisted_label": len(unlisted)}
    dropped = Dropped(len(df), counts, tuple(unlisted.value_counts().index))
    dropped.check(max_dropped_fraction)

    subset_of_row = _subset_rows(rows["text"], validation_fraction, test_fraction, seed)
    label_id = rows["name"].map({name: i for i, name in enumerate(names)}).astype("int64").to_numpy()
    texts = rows["text"].to_numpy()
    subsets = {
        subset: pd.DataFrame({"text": texts[subset_of_row == subset], "label": label_id[subset_of_row == subset]})
        for subset in SUBSETS
    }
    return subsets, names, dropped
