"""finetune.sparsity_weight auto: the search's rule on a fake trial, its flag, and tiny fine-tunes."""

import json

import pytest

from moefy.errors import MoefyError
from moefy.training.weight_search import Trial, search, warning, within


def fake(values: dict[float, float]):
    """A trial function reading the metric from `values` by weight, and the weights it was asked for."""
    asked = []

    def trial(weight):
        asked.append(weight)
        return Trial(weight, values[weight], sparsity=weight / 10)

    return trial, asked


def test_the_largest_weight_within_the_tolerance_is_chosen_and_smaller_ones_are_not_tried():
    trial, asked = fake({0.0: 0.80, 4.0: 0.70, 2.0: 0.785, 1.0: 0.795, 0.5: 0.80})
    lines = []
    found = search([1.0, 4.0, 0.5, 2.0, 2.0], 0.01, "accuracy", True, trial, lines.append)
    assert asked == [0.0, 4.0, 2.0, 1.0]  # the reference, then the ladder from the top, stopping at the first pass
    assert found.chosen == 1.0 and found.within_tolerance
    assert [t.within_tolerance for t in found.trials] == [False, False, True]
    assert len(lines) == 4 and lines[0].startswith("sparsity weight search 1/5: weight 0")
    assert "3/5: weight 2" in lines[2] and "outside" in lines[2] and "chosen" in lines[3]
    record = json.loads(json.dumps(found.record()))
    assert record["reference"]["value"] == 0.80 and [t["weight"] for t in record["trials"]] == [4.0, 2.0, 1.0]
    assert record["rule"] == "validation accuracy >= reference - 0.01"


def test_perplexity_is_held_within_a_relative_tolerance():
    assert within(20.19, 20.0, 0.01, higher_is_better=False) and not within(20.21, 20.0, 0.01, higher_is_better=False)
    assert within(0.795, 0.80, 0.01, higher_is_better=True) and not within(0.785, 0.80, 0.01, higher_is_better=True)
    trial, _ = fake({0.0: 20.0, 2.0: 25.0, 1.0: 20.1})
    found = search([2.0, 1.0], 0.01, "perplexity", False, trial, lambda line: None)
    assert found.chosen == 1.0 and "reference * (1 + 0.01)" in found.record()["rule"]


def test_when_no_candidate_is_within_the_tolerance_the_smallest_is_taken_with_a_warning():
    trial, asked = fake({0.0: 0.80, 1.0: 0.70, 0.5: 0.75})
    found = search([1.0, 0.5], 0.01, "accuracy", True, trial, lambda line: None)
    assert asked == [0.0, 1.0, 0.5] and found.chosen == 0.5 and not found.within_tolerance
    message = warning(found)
    assert "finetune.sparsity_candidates" in message and "finetune.sparsity_tolerance" in message


@pytest.mark.parametrize(
    ("candidates", "tolerance", "named"),
    [
        ([], 0.01, "finetune.sparsity_candidates"),
        ([1.0, 0.0], 0.01, "finetune.sparsity_candidates"),
        ([1.0], -0.1, "finetune.sparsity_tolerance"),
    ],
)
def test_bad_search_settings_are_refused_naming_the_key(candidates, tolerance, named):
    trial, asked = fake({})
    with pytest.raises(MoefyError, match=named):
        search(candidates, tolerance, "accuracy", True, trial)
    assert asked == []  # refused before any training
