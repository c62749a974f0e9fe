"""The second corpus (moefy.data.corpus, step second_corpus)."""

import pandas as pd
import pytest

from moefy.data.corpus import draw_texts, write_texts
from moefy.data.subsets import read_subset
from moefy.errors import MoefyError
from moefy.steps import second_corpus


def test_draws_distinct_non_blank_texts_seeded_in_file_order(tmp_path):
    texts = pd.Series(["b", " a ", None, "", "a", "c", "d", "e"])
    assert draw_texts(texts, 10, seed=0) == ["b", "a", "c", "d", "e"], "stripped, blanks and repeats dropped"
    drawn = draw_texts(texts, 3, seed=1)
    assert (
        len(drawn) == 3
        and drawn == draw_texts(texts, 3, seed=1)
        and {tuple(draw_texts(texts, 3, seed=s)) for s in range(6)} != {tuple(drawn)}
    )
    order = ["b", "a", "c", "d", "e"]
    assert drawn == sorted(drawn, key=order.index)
    write_texts(tmp_path / "second.jsonl", drawn)
    assert read_subset(tmp_path / "second.jsonl") == (drawn, None)
    with pytest.raises(MoefyError, match="no non-blank texts; check second_corpus.text_column"):
        draw_texts(pd.Series(["", None]), 3, seed=0)


def test_the_step_writes_the_draw_and_names_a_missing_file(tmp_path):
    (tmp_path / "debates.csv").write_text("statement,speaker\nhello there,A\ngood evening,B\nhello there,C\n")
    out = tmp_path / "second_test.jsonl"
    second_corpus.main(["--path", str(tmp_path / "debates.csv"), "--text-column", "statement", "--out", str(out)])
    assert read_subset(out) == (["hello there", "good evening"], None)
    with pytest.raises(MoefyError, match="missing.csv does not exist .* fix second_corpus.path"):
        second_corpus.main(["--path", str(tmp_path / "missing.csv"), "--out", str(out)])
