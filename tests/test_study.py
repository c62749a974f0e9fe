"""The grid of arms: which variants and evaluations a study runs, and at which rules."""

import copy

import pytest

from moefy.config import validate
from moefy.errors import MoefyError
from moefy.study import Evaluation, Rules, Study, Variant

BASE = {
    "study": "s",
    "model": {"name_or_path": "m"},
    "dataset": {"path": "d.csv"},
    "evaluate": {"budgets": [0.5, 0.1, 1.0]},
}


def study(grid: dict) -> Study:
    return Study(validate(copy.deepcopy(BASE) | {"grid": grid}))


def test_each_arm_is_a_cross_product_and_the_study_their_union():
    grid = study(
        {
            "moefication": {"split": ["random", "kmeans"], "num_experts": [8], "selector": ["mlp", "groundtruth"]},
            "d2dmoe": {"penalty": ["hoyer"], "seed": [0, 1], "split": ["kmeans"], "num_experts": [8], "selector": ["norm"]},
        }
    )
    none, hoyer0, hoyer1 = Variant("none", 0), Variant("hoyer", 0), Variant("hoyer", 1)
    assert grid.variants == [hoyer0, hoyer1, none]
    assert len(grid.evaluations) == 4 + 2
    assert Evaluation(hoyer1, "kmeans", 8, "norm") in grid.evaluations
    assert Evaluation(hoyer1, "random", 8, "norm") not in grid.evaluations
    assert hoyer1.name == "hoyer-seed1" and Evaluation(none, "kmeans", 8, "mlp").name == "kmeans-E8-mlp"


def test_an_evaluation_two_arms_share_runs_once_with_both_arms_rules():
    grid = study(
        {
            "a": {"split": ["kmeans"], "num_experts": [8], "selector": ["mlp"]},
            "b": {
                "split": ["kmeans"],
                "num_experts": [8],
                "selector": ["mlp", "norm"],
                "budgets": [0.3],
                "thresholds": [0.5, 0.2],
            },
        }
    )
    shared = Evaluation(Variant("none", 0), "kmeans", 8, "mlp")
    assert grid.evaluations.count(shared) == 1
    assert grid.rules(shared) == Rules(budgets=(0.1, 0.3, 0.5, 1.0), thresholds=(0.2, 0.5))
    assert grid.rules(Evaluation(Variant("none", 0), "kmeans", 8, "norm")) == Rules((0.3,), (0.2, 0.5))


def test_an_evaluation_outside_the_grid_gets_the_evaluate_section_s_rules():
    grid = study({"a": {"split": ["kmeans"], "num_experts": [8], "selector": ["mlp"], "thresholds": [0.5]}})
    outside = Evaluation(Variant("hoyer", 3), "coact", 384, "norm")
    assert grid.rules(outside) == Rules(budgets=(0.1, 0.5, 1.0), thresholds=())


@pytest.mark.parametrize("key", ["penalty", "seed", "split", "num_experts", "selector"])
def test_an_empty_list_is_refused(key):
    arm = {"split": ["kmeans"], "num_experts": [8], "selector": ["mlp"], key: []}
    with pytest.raises(MoefyError, match=f"grid.a.{key}"):
        study({"a": arm})
