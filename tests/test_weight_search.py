"""finetune.sparsity_weight auto: the search's rule on a fake trial, its flag, and one tiny fine-tune."""

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from builders import write_toy_sentiment
from moefy.config import validate
from moefy.errors import MoefyError
from moefy.steps import data as data_step
from moefy.steps import finetune as finetune_step
from moefy.training import precision
from moefy.training.weight_search import Trial, search, warning, within
from moefy.workflow.cli import add_section_flags


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


def test_the_weight_flag_takes_a_number_or_auto():
    parser = argparse.ArgumentParser()
    add_section_flags(parser, "finetune")
    assert parser.parse_args([]).sparsity_weight == 1.0
    assert parser.parse_args(["--sparsity-weight", "auto"]).sparsity_weight == "auto"
    assert parser.parse_args(["--sparsity-weight", "0.25"]).sparsity_weight == 0.25
    with pytest.raises(SystemExit):
        parser.parse_args(["--sparsity-weight", "large"])


@pytest.mark.parametrize(("value", "valid"), [("auto", True), (0.3, True), (0, True), ("big", False), (-1.0, False)])
def test_the_config_takes_a_weight_or_auto(value, valid):
    study = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    study["finetune"]["sparsity_weight"] = value
    if valid:
        assert validate(study)["finetune"]["sparsity_search_epochs"] == 1
    else:
        with pytest.raises(MoefyError, match="finetune.sparsity_weight"):
            validate(study)


def finetune(tiny_bert, data, out, *extra):
    finetune_step.main(
        ["--model", str(tiny_bert), "--data", str(data), "--out", str(out), "--device", "cpu", "--batch-size", "16",
         "--max-length", "32", "--learning-rate", "3e-3", "--sparsity-ramp", "0.2", "--precision", "fp32", *extra]
    )  # fmt: skip
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture()
def toy_data(tmp_path):
    csv = write_toy_sentiment(tmp_path / "reviews.csv", rows=200)
    data_step.main(
        ["--path", str(csv), "--text-column", "text", "--label-column", "category", "--labels", "rotten", "fresh",
         "--out", str(tmp_path / "data")]
    )  # fmt: skip
    return tmp_path / "data"


def test_auto_trains_the_chosen_weight_as_a_fixed_weight_would(tiny_bert, toy_data, tmp_path, mlflow_store, capsys, monkeypatch):
    # precision auto's probe draws random numbers after the model is loaded (here a stand-in, without timing)
    monkeypatch.setattr(precision, "probe_seconds", lambda *shape: {"fp32": 1.0 + 0 * torch.rand(8).sum().item()})
    # tolerance 1: the largest candidate passes; 1-epoch trials, then the full 2 epochs at that weight
    search_flags = ["--precision", "auto", "--sparsity-candidates", "8", "0.5", "--sparsity-tolerance", "1"]
    search_flags += ["--sparsity-search-epochs", "1"]
    auto = finetune(tiny_bert, toy_data, tmp_path / "auto", "--penalty", "hoyer", "--epochs", "2",
                    "--sparsity-weight", "auto", *search_flags)  # fmt: skip
    searched = auto["sparsity_search"]
    assert searched["chosen"] == auto["sparsity_weight"] == 8.0 and searched["within_tolerance"] and searched["epochs"] == 1
    assert searched["reference"]["weight"] == 0.0 and [t["weight"] for t in searched["trials"]] == [8.0]
    assert searched["trials"][0]["sparsity"] > searched["reference"]["sparsity"]  # the penalty's effect, measured
    assert "sparsity weight search 2/3: weight 8" in capsys.readouterr().out
    training = json.loads((tmp_path / "auto" / "model" / "training.json").read_text())
    assert training["sparsity_weight"] == 8.0 and auto["epochs_run"] == 2
    fixed = finetune(tiny_bert, toy_data, tmp_path / "fixed", "--penalty", "hoyer", "--epochs", "2", "--sparsity-weight", "8",
                     "--precision", "auto")  # fmt: skip
    assert "sparsity_search" not in fixed
    for key in ("validation_accuracy", "test_accuracy", "sparsity_per_layer"):
        assert auto[key] == fixed[key], key  # the search leaves no trace in the final fine-tune


def test_auto_keeps_the_trial_model_when_trials_run_the_full_schedule(tiny_bert, toy_data, tmp_path, mlflow_store, capsys):
    flags = ["--epochs", "1", "--sparsity-weight", "auto", "--sparsity-candidates", "4", "--sparsity-tolerance", "1"]
    auto = finetune(tiny_bert, toy_data, tmp_path / "auto", "--penalty", "l1", *flags)
    assert auto["sparsity_weight"] == 4.0 and auto["validation_accuracy"] == auto["sparsity_search"]["trials"][0]["value"]
    assert "keeping its trial's model" in capsys.readouterr().out
    none = finetune(tiny_bert, toy_data, tmp_path / "none", "--penalty", "none", *flags)  # no penalty: no search
    assert "sparsity_search" not in none and "sparsity_weight" not in none
    assert none["validation_accuracy"] == auto["sparsity_search"]["reference"]["value"]  # the reference is that fine-tune
