"""The grid of arms: which variants and evaluations a study runs, and at which rules."""

import copy

import pytest

from moefy.config import validate
from moefy.errors import MoefyError
from moefy.workflow.study import Evaluation, Rules, Study, Variant

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
            "moefication": {"split": ["random", "kmeans"], "num_experts": [8], "router": ["mlp", "groundtruth"]},
            "d2dmoe": {"penalty": ["hoyer"], "seed": [0, 1], "split": ["kmeans"], "num_experts": [8], "router": ["norm"]},
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
            "a": {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"]},
            "b": {
                "split": ["kmeans"],
                "num_experts": [8],
                "router": ["mlp", "norm"],
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
    grid = study({"a": {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"], "thresholds": [0.5]}})
    outside = Evaluation(Variant("hoyer", 3), "coact", 384, "norm")
    assert grid.rules(outside) == Rules(budgets=(0.1, 0.5, 1.0), thresholds=())


@pytest.mark.parametrize("key", ["penalty", "seed", "split", "num_experts", "router"])
def test_an_empty_list_is_refused(key):
    arm = {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"], key: []}
    with pytest.raises(MoefyError, match=f"grid.a.{key}"):
        study({"a": arm})


def test_recovery_is_an_axis_whose_evaluations_get_their_own_files():
    grid = study({"a": {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"], "recovery": ["none", "kd"]}})
    by_recovery = {e.recovery: e for e in grid.evaluations}
    assert sorted(by_recovery) == ["kd", "none"]
    plain, recovered = by_recovery["none"], by_recovery["kd"]
    assert plain.name == "kmeans-E8-mlp" and recovered.name == "kmeans-E8-mlp-kd" and recovered.conversion == plain.name
    assert grid.rules(recovered) == grid.rules(plain)


def test_upcycled_models_come_with_a_dense_continuation_and_their_variant():
    config = copy.deepcopy(BASE) | {
        "grid": {"a": {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"]}},
        "upcycling": {"penalty": "hoyer", "seeds": [0, 2], "models": {"top2": {}, "ec": {"routing": "expert_choice"}}},
    }
    grid = Study(validate(config))
    assert [(u.variant.name, u.name) for u in grid.upcycled] == [
        ("hoyer-seed0", "ec"), ("hoyer-seed0", "top2"), ("hoyer-seed0", "dense"),
        ("hoyer-seed2", "ec"), ("hoyer-seed2", "top2"), ("hoyer-seed2", "dense"),
    ]  # fmt: skip
    assert Variant("hoyer", 2) in grid.variants and Variant("none", 0) in grid.variants
    # each model is the upcycle section's defaults with its own keys over them
    assert grid.upcycle_settings("ec")["routing"] == "expert_choice" and grid.upcycle_settings("ec")["experts"] == 8
    assert grid.upcycle_settings("top2") == {**grid.upcycle_settings("ec"), "routing": "top_k"}
    assert Study(validate(copy.deepcopy(BASE) | {"grid": config["grid"]})).upcycled == [], "no models: no upcycling"


@pytest.mark.parametrize(
    ("models", "fragment"),
    [({"dense": {}}, "dense"), ({"top2": {"experts": 0}}, "upcycling.models.top2.experts"), ({"x": {"kind": 1}}, "kind")],
)
def test_bad_upcycling_models_are_refused(models, fragment):
    config = copy.deepcopy(BASE) | {
        "grid": {"a": {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"]}},
        "upcycling": {"models": models},
    }
    with pytest.raises(MoefyError, match=fragment):
        validate(config)


def test_merged_models_are_named_by_their_chain_of_steps():
    config = copy.deepcopy(BASE) | {
        "grid": {"a": {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"]}},
        "upcycling": {"seeds": [0, 1], "models": {"top2": {}, "ec": {"routing": "expert_choice"}}},
        "merging": {"models": ["top2"], "groups": [4, 2.5], "methods": ["prune", "mcsmoe"]},
    }
    grid = Study(validate(config))
    names = [m.name for m in grid.merged if m.upcycled.variant.seed == 0]
    assert names == [
        "full", "prune-G4", "prune-G4-kd", "msmoe-G4-svd", "msmoe-G4-kd-svd-kd",
        "prune-G2.5", "prune-G2.5-kd", "msmoe-G2.5-svd", "msmoe-G2.5-kd-svd-kd",
    ]  # fmt: skip
    assert {m.upcycled.name for m in grid.merged} == {"top2"} and len(grid.merged) == 2 * len(names)
    from moefy.training.merging import chain_of

    assert [chain_of(n)["method"] for n in names[:5]] == ["full", "prune", "prune", "mcsmoe", "mcsmoe"]
    config["merging"]["models"] = ["nope"]
    with pytest.raises(MoefyError, match="merging.models names nope, not in upcycling.models"):
        Study(validate(config))
    config["merging"]["models"] = ["dense"]
    with pytest.raises(MoefyError, match="merging.models"):
        Study(validate(config))


def test_attention_is_an_axis_whose_chains_start_from_the_distilled_model():
    grid = study({"a": {"penalty": ["hoyer"], "split": ["kmeans"], "num_experts": [8, 12], "router": ["norm"],
                        "convert": ["ffn", "ffn+attention"]}})  # fmt: skip
    by_convert = {(e.convert, e.num_experts): e for e in grid.evaluations}
    assert (
        by_convert[("ffn", 8)].converted == "hoyer-seed0"
        and by_convert[("ffn+attention", 8)].converted == "hoyer-seed0-attention"
    )
    assert by_convert[("ffn+attention", 12)].name == "kmeans-E12-norm"
    assert grid.distilled == [Variant("hoyer", 0)] and grid.width_multiple == 24  # both expert counts divide the widths
    assert study({"a": {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"]}}).width_multiple == 1


def test_recovery_of_converted_attention_is_refused_by_name():
    arm = {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"], "convert": ["ffn+attention"], "recovery": ["none", "kd"]}
    with pytest.raises(MoefyError, match="grid.a: recovery kd of converted attention projections is not supported"):
        study({"a": arm})


def test_shared_experts_and_allocations_are_axes_named_in_the_files_and_rules():
    arm = {"split": ["coact"], "num_experts": [8], "router": ["mlp"], "budgets": [0.5, 1.0]}
    arms = {
        "plain": arm,
        "shared": arm | {"shared_experts": [2], "allocation": ["uniform", "sensitivity"], "recovery": ["none", "kd"]},
    }
    grid = Study(validate(copy.deepcopy(BASE) | {"grid": arms, "recover": {"budget": 0.5}}))
    plain, shared = (
        Evaluation(Variant("none", 0), "coact", 8, "mlp"),
        Evaluation(Variant("none", 0), "coact", 8, "mlp", shared_experts=2),
    )
    assert plain.name == "coact-E8-mlp" and shared.name == "coact-E8-S2-mlp"
    assert grid.rules(shared) == Rules((0.5, 1.0), (), ("uniform", "sensitivity"))
    assert grid.rules(plain).allocations == ("uniform",)
    assert grid.expert_shapes == [(8, 0), (8, 2)]


@pytest.mark.parametrize(
    "arm,fragment",
    [
        ({"shared_experts": [8]}, "shared_experts 8 must be below num_experts 8"),
        ({"shared_experts": [2], "budgets": [0.25, 0.5]}, "budget 0.25 activates no more than its 2 shared experts of 8"),
        ({"shared_experts": [4], "recovery": ["kd"], "budgets": [0.75]}, r"grid.a \(recover.budget\): budget 0.2 activates"),
    ],
)
def test_budgets_the_shared_experts_alone_fill_are_refused(arm, fragment):
    with pytest.raises(MoefyError, match=fragment):
        study({"a": {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"]} | arm})


def test_a_second_corpus_is_refused_for_classification():
    config = copy.deepcopy(BASE) | {"grid": {"a": {"split": ["kmeans"], "num_experts": [8], "router": ["mlp"]}}}
    config["second_corpus"] = {"path": "other.csv"}
    with pytest.raises(MoefyError, match="second_corpus: .* needs task causal_lm, not classification"):
        Study(validate(config))
    assert Study(validate(config | {"task": "causal_lm"})).config["second_corpus"]["max_texts"] == 200


def test_served_folders_are_the_softmax_gated_recoveries_at_each_budget_and_the_upcycled_models():
    grid = {
        "gated": {
            "split": ["kmeans"],
            "num_experts": [8],
            "shared_experts": [2],
            "router": ["linear"],
            "recovery": ["kd", "kd-softmax"],
            "budgets": [0.5, 1.0],
        },
        "plain": {"split": ["coact"], "num_experts": [8], "router": ["mlp"]},
    }
    config = copy.deepcopy(BASE) | {"task": "causal_lm", "grid": grid, "serve": {"budgets": [0.75, 0.5], "upcycled": True}}
    config["recover"] = {"budget": 0.5}
    config["upcycling"] = {"models": {"top2": {"experts": 4}}}
    assert Study(validate(config)).served == [
        "none-seed0/kmeans-E8-S2-linear-kd-softmax-b0.5",
        "none-seed0/kmeans-E8-S2-linear-kd-softmax-b0.75",
        "none-seed0/top2",
    ]
    with pytest.raises(MoefyError, match=r"serve.budgets.*budget 0.25 activates no more than its 2 shared"):
        _ = Study(validate(config | {"serve": {"budgets": [0.25]}})).served
    with pytest.raises(MoefyError, match="serve: .* needs task causal_lm, not classification"):
        _ = Study(validate(config | {"task": "classification"})).served
