"""Activation-sparsity penalties (D2DMoE fine-tuning) and their effect on a real fine-tune."""

import json

import pytest
import torch

from builders import write_toy_sentiment
from moefy.steps import data as data_step
from moefy.steps import finetune as finetune_step
from moefy.training.sparsity import layers_penalty, ramped_weight, token_penalty


def test_hoyer_is_the_share_of_effectively_active_neurons():
    one_hot = torch.zeros(1, 64)
    one_hot[0, 5] = 3.0
    assert token_penalty(one_hot, "hoyer").item() == pytest.approx(1 / 64)
    assert token_penalty(torch.full((1, 64), 0.2), "hoyer").item() == pytest.approx(1.0)
    h = torch.randn(10, 64).relu()
    torch.testing.assert_close(token_penalty(7 * h, "hoyer"), token_penalty(h, "hoyer"))  # scale-invariant


def test_l1_is_the_mean_absolute_activation():
    h = torch.tensor([[1.0, -3.0, 0.0, 0.0]])
    assert token_penalty(h, "l1").item() == 1.0
    with pytest.raises(ValueError, match="unknown sparsity penalty"):
        token_penalty(h, "l2")


def test_padding_tokens_do_not_count_and_layers_are_averaged():
    dense, sparse = torch.ones(1, 1, 8), torch.zeros(1, 1, 8)
    sparse[..., 0] = 1.0
    a = torch.cat([dense, sparse], dim=1)  # token 0 dense, token 1 sparse
    mask = torch.tensor([[False, True]])
    assert layers_penalty([a], mask, "hoyer").item() == pytest.approx(1 / 8)
    assert layers_penalty([a, a], torch.tensor([[True, True]]), "hoyer").item() == pytest.approx((1 + 1 / 8) / 2)


def test_gradient_descent_on_hoyer_makes_activations_sparser():
    h = torch.rand(4, 32, requires_grad=True)
    before = token_penalty(h, "hoyer").mean()
    before.backward()
    with torch.no_grad():
        after = token_penalty((h - 0.05 * h.grad / h.grad.abs().max()).relu(), "hoyer").mean()
    assert after < before


def test_weight_ramps_in_linearly():
    assert [ramped_weight(2.0, s, 100, 0.5) for s in (0, 25, 50, 90)] == [0.0, 1.0, 2.0, 2.0]
    assert ramped_weight(2.0, 0, 100, 0.0) == 2.0


def test_hoyer_fine_tuning_gives_sparser_activations(tiny_bert, tmp_path, mlflow_store):
    csv = write_toy_sentiment(tmp_path / "reviews.csv", rows=300)
    data_step.main(
        [
            "--path",
            str(csv),
            "--text-column",
            "text",
            "--label-column",
            "category",
            "--labels",
            "rotten",
            "fresh",
            "--out",
            str(tmp_path / "data"),
        ]
    )
    sparsity = {}
    for penalty in ("none", "hoyer"):
        out = tmp_path / penalty
        finetune_step.main(
            [
                "--model",
                str(tiny_bert),
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(out),
                "--device",
                "cpu",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--max-length",
                "32",
                "--learning-rate",
                "3e-3",
                "--penalty",
                penalty,
                "--sparsity-weight",
                "5",
                "--sparsity-ramp",
                "0.2",
                "--precision",
                "fp32",
            ]
        )
        metrics = json.loads((out / "metrics.json").read_text())
        training = json.loads((out / "model" / "training.json").read_text())
        assert metrics["penalty"] == training["penalty"] == penalty and training["precision"] == "fp32"
        sparsity[penalty] = metrics["sparsity_mean"]
    assert sparsity["hoyer"] > sparsity["none"] + 0.05, sparsity
