"""Stopped at its cap while still improving (moefy.training.convergence): the rule every loop
applies, how training.json carries the stages to the evaluate step's records, and how the router
step's count travels in the router file's metadata."""

from __future__ import annotations

import torch

from moefy.files import save_tensors
from moefy.steps.evaluate import router_stopped_at_cap
from moefy.steps.router import capped_layers
from moefy.training import convergence


def test_a_run_whose_last_epoch_was_best_stopped_at_its_cap():
    assert convergence.stopped_at_cap(best_epoch=30, epochs_run=30)
    assert not convergence.stopped_at_cap(best_epoch=27, epochs_run=30), "patience ended it after its best"
    assert not convergence.stopped_at_cap(best_epoch=0, epochs_run=3), "nothing beat the start"
    assert not convergence.stopped_at_cap(best_epoch=0, epochs_run=0), "no epoch ran"


def test_the_warning_names_the_stage_the_cap_and_the_key_to_raise():
    line = convergence.warning("the norm router of 6 of 6 layers", "router.mlp_epochs 30")
    assert line.startswith("WARNING: the norm router of 6 of 6 layers stopped at its cap (router.mlp_epochs 30)")
    assert "raise router.mlp_epochs" in line and "\n" not in line


def test_training_json_collects_each_stage_once_and_records_join_them():
    training = convergence.note({"precision": "fp32"}, "finetune")
    training = convergence.note(training, "recovery kd")
    assert convergence.note(training, "finetune")[convergence.KEY] == ["recovery kd", "finetune"], "once, the latest last"
    assert training["precision"] == "fp32"
    assert convergence.stages(training, "norm router 3/6 layers") == "finetune; recovery kd; norm router 3/6 layers"
    assert convergence.stages({}) == "" and convergence.stages({}, None) == ""


def test_the_router_files_count_reaches_the_evaluate_records(tmp_path):
    per_layer = {"recall@0.5": [0.9, 0.8, 0.7], convergence.KEY: [True, False, True]}
    capped = capped_layers(per_layer, [0, 1, 2])
    assert capped == [0, 2] and capped_layers({"recall@0.5": [1.0]}, [0]) == [], "untrained routers have no flag"
    path = tmp_path / "router.safetensors"
    save_tensors(path, {"layer.0.w": torch.zeros(1)}, {"router": "norm", "layers": "3", convergence.KEY: str(len(capped))})
    assert router_stopped_at_cap(path, "norm") == "norm router 2/3 layers"
    save_tensors(path, {"layer.0.w": torch.zeros(1)}, {"router": "norm", "layers": "3", convergence.KEY: "0"})
    assert router_stopped_at_cap(path, "norm") is None
    save_tensors(path, {"layer.0.w": torch.zeros(1)}, {"router": "mlp", "layers": "3"})  # written before the key
    assert router_stopped_at_cap(path, "mlp") is None
