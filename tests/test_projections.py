"""The attention-projection adapter and the distillation of a projection into a ReLU MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from builders import DECODERS, FAMILIES, build_tiny
from moefy.adapters.attention import find_projections
from moefy.adapters.ffn import ProjectionMLP
from moefy.adapters.models import load_model
from moefy.conversion.distillation import DistillSettings, distill, r_squared, svd_start, width_for
from moefy.errors import MoefyError


def _batch(config) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(5, config.vocab_size, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    if config.model_type == "t5":  # T5's classifier reads each text's <eos>
        ids[:, -1] = ids[1, 5] = config.eos_token_id
        ids[1, 6:] = config.pad_token_id
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_mlps_in_every_projection_keep_the_logits(family, tmp_path):
    folder = build_tiny(family, tmp_path / family)
    task = "causal_lm" if family in DECODERS else "classification"
    model = load_model(str(folder), task, None if task == "causal_lm" else ["a", "b"]).eval()
    batch = _batch(model.config)
    with torch.no_grad():
        before = model(**batch).logits
    found = find_projections(model)
    per_layer = 2 if family == "gpt2" else 4
    layers = len({p.layer for p in found})
    assert len(found) == per_layer * layers and layers >= 2
    assert len({id(p.linear) for p in found}) == len(found)
    for projection in found:
        d_out, d_in = projection.linear.weight.shape
        projection.replace(svd_start(projection.linear, 2 * min(d_in, d_out), min(d_in, d_out)))
    assert sum(isinstance(m, ProjectionMLP) for m in model.modules()) == len(found)
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_unknown_family_is_a_clear_error():
    model = nn.Linear(2, 2)
    model.config = type("Config", (), {"model_type": "mamba"})()
    with pytest.raises(MoefyError, match="mamba"):
        find_projections(model)


def test_a_narrow_start_is_the_truncated_svd():
    torch.manual_seed(0)
    linear = nn.Linear(12, 10)
    x = torch.randn(500, 12)
    mlp = svd_start(linear, 8, 4)  # no spare neurons
    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    truncated = x @ (u[:, :4] * s[:4] @ vh[:4]).t() + linear.bias.detach()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), truncated, atol=1e-5, rtol=1e-5)


def random_projection(train: int, heldout: int):
    """A random 16 -> 16 projection and its outputs on `train` and `heldout` random inputs."""
    target = nn.Linear(16, 16)
    with torch.no_grad():
        x, x_val = torch.randn(train, 16), torch.randn(heldout, 16)
        return target, (x, target(x)), (x_val, target(x_val))


def test_a_wide_enough_mlp_learns_a_projection_from_scratch():
    """R^2 > 0.99 on held-out inputs for a random 16 -> 16 projection, from a random start."""
    torch.manual_seed(0)
    target, (x, y), (x_val, y_val) = random_projection(4000, 1000)
    mlp = ProjectionMLP(16, 64, 16)
    result = distill(mlp, (x, y), (x_val, y_val), DistillSettings(learning_rate=3e-3, batch_size=128, max_epochs=60))
    assert result.r2 > 0.99
    assert result.mse < 0.05 * result.mse_initial
    with torch.no_grad():
        assert r_squared(mlp(x_val), y_val) == pytest.approx(result.r2)


def test_training_improves_on_the_truncated_start_and_keeps_the_best():
    torch.manual_seed(0)
    target, (x, y), (x_val, y_val) = random_projection(3000, 800)
    mlp = svd_start(target, 24)  # rank 6 of 16 to start, 12 spare neurons
    result = distill(mlp, (x, y), (x_val, y_val), DistillSettings(learning_rate=1e-3, batch_size=128, max_epochs=30, patience=2))
    assert result.mse < 0.5 * result.mse_initial
    assert result.epochs <= 30
    assert result.mse == pytest.approx(float(nn.functional.mse_loss(mlp(x_val), y_val).detach()), rel=1e-5)
    # a learning rate that only diverges: the start is kept
    diverging = svd_start(target, 24)
    bad = distill(
        diverging, (x, y), (x_val, y_val), DistillSettings(learning_rate=10.0, batch_size=128, max_epochs=3, patience=1)
    )
    assert bad.mse == pytest.approx(bad.mse_initial)
    assert bad.epochs == 1


def test_width_matches_the_projection_flops():
    assert width_for(384, 384, 1.0) == 192  # 2 x 384 x 192 = 384 x 384
    assert width_for(384, 384, 2.0) == 384
    assert width_for(576, 192, 1.0) == 144  # a grouped-query k projection
    with pytest.raises(MoefyError, match="rank 5"):
        svd_start(nn.Linear(4, 4), 8, 5)
    assert r_squared(torch.ones(3, 2), torch.ones(3, 2)) == 1.0
    with pytest.raises(MoefyError, match="training and held-out"):
        distill(ProjectionMLP(2, 4, 2), (torch.zeros(0, 2), torch.zeros(0, 2)), (torch.zeros(1, 2), torch.zeros(1, 2)))


def _distilled_llama_with_grouped_kv() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    model = LlamaForCausalLM(config).eval()
    for projection in find_projections(model):
        d_out, d_in = projection.linear.weight.shape  # k and v: 32 -> 16
        projection.replace(svd_start(projection.linear, 32, 8))
    return model


def test_distilled_projections_are_converted_like_ffns():
    """find_ffns lists the distilled MLPs after the FFNs; at budget 1.0 the MoE model (FFNs and
    projections) equals the model with distilled projections, and it runs with fewer experts."""
    from moefy.adapters.ffn import find_ffns
    from moefy.conversion.routers import MLPRouter
    from moefy.conversion.split import random_split
    from moefy.moe.layer import moefy_model, set_experts_per_token

    model = _distilled_llama_with_grouped_kv()
    ffns = find_ffns(model)
    assert [f.index for f in ffns] == list(range(2 + 8))
    assert [f.w_out.out_features for f in ffns[2:6]] == [32, 16, 16, 32]  # q, k, v, o of layer 0
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        distilled = model(input_ids=ids).logits
    E = 4
    labels = {f.index: torch.as_tensor(random_split(f.d_ff, E, seed=f.index)) for f in ffns}
    routers = {f.index: MLPRouter(f.d_model, E) for f in ffns}
    layers = moefy_model(model, labels, routers, E)
    assert len(layers) == 10 and not any(isinstance(m, ProjectionMLP) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, distilled, atol=1e-5, rtol=1e-5)
        set_experts_per_token(layers, 2)
        for kernel in ("bags", "grouped", "masked"):
            outputs = [
                layer.experts_forward(torch.randn(5, layer.d_model), torch.ones(5, E, dtype=torch.bool), kernel)
                for layer in layers[2:6]
            ]
            assert [o.shape[-1] for o in outputs] == [32, 16, 16, 32]
        halved = model(input_ids=ids).logits
    assert halved.shape == distilled.shape and not torch.allclose(halved, distilled, atol=1e-3)
    assert all(float(layer.experts_per_token.mean()) == 2 for layer in layers)


def test_a_saved_model_with_distilled_projections_loads_back_equal(tmp_path, tiny_relu_bert):
    from transformers import AutoTokenizer

    from moefy.adapters.attention import PROJECTIONS_FILE
    from moefy.adapters.models import save_model

    model = load_model(str(tiny_relu_bert), "classification", ["a", "b"]).eval()
    for projection in find_projections(model)[::3]:  # q of layer 0, o of layer 0, v of layer 1, ...
        projection.replace(svd_start(projection.linear, 16))
    batch = _batch(model.config)
    with torch.no_grad():
        expected = model(**batch).logits
    save_model(model, AutoTokenizer.from_pretrained(tiny_relu_bert), tmp_path / "distilled")
    again = load_model(str(tmp_path / "distilled"), "classification").eval()
    assert [p.key for p in find_projections(again) if p.mlp is not None] == ["0.q", "0.o", "1.v"][
        : len(find_projections(model)[::3])
    ]
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(MoefyError, match="distilled already"):
        _ = find_projections(again)[0].linear
    # a projections file of another model is refused
    other = tmp_path / "other"
    save_model(
        load_model(str(tiny_relu_bert), "classification", ["a", "b"]), AutoTokenizer.from_pretrained(tiny_relu_bert), other
    )
    from moefy.files import load_tensors, save_tensors

    tensors = load_tensors(tmp_path / "distilled" / PROJECTIONS_FILE)
    save_tensors(other / PROJECTIONS_FILE, {k.replace("0.q.", "7.q."): v for k, v in tensors.items()})
    with pytest.raises(MoefyError, match="another model"):
        load_model(str(other), "classification")


def test_the_distill_step_writes_a_model_whose_projections_are_ffns(tmp_path, tiny_relu_bert, mlflow_store):
    """The step records, distils and saves; the saved model loads with every projection an MLP,
    and distillation.json holds held-out R^2 values that beat predicting the mean."""
    import json
    import random
    import shutil

    from transformers import AutoTokenizer

    from builders import FILLER, NEGATIVE, POSITIVE
    from moefy.adapters.ffn import find_ffns
    from moefy.steps import distill_attention as step

    model_folder = tmp_path / "model"
    shutil.copytree(tiny_relu_bert, model_folder)
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(model_folder)
    rng = random.Random(0)
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "train.jsonl", "w") as f:
        for i in range(120):
            text = (
                " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 8))) + " " + rng.choice(POSITIVE if i % 2 else NEGATIVE)
            )
            f.write(json.dumps({"text": text, "label": i % 2}) + "\n")
    out = tmp_path / "distilled"
    common = ["--model", str(model_folder), "--task", "classification", "--penalty", "none", "--seed", "0", "--device", "cpu"]
    step.main(
        [
            *common,
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(out),
            "--max-tokens",
            "800",
            "--max-epochs",
            "8",
            "--flops-factor",
            "2",
        ]
    )
    summary = json.loads((out / "distillation.json").read_text())
    report = summary["projections"]
    assert sorted(report) == ["0.k", "0.o", "0.q", "0.v", "1.k", "1.o", "1.q", "1.v"]
    capped = [key for key, entry in report.items() if entry["stopped_at_cap"] == (entry["best_epoch"] == entry["epochs"])]
    assert len(capped) == len(report), "each projection's flag is the rule's"
    capped = sum(entry["stopped_at_cap"] for entry in report.values())
    assert summary["stopped_at_cap"] == capped
    training = json.loads((out / "training.json").read_text()) if (out / "training.json").exists() else {}
    assert training.get("stopped_at_cap", []) == ([f"attention distillation {capped}/8 projections"] if capped else [])
    assert all(entry["mse"] <= entry["mse_initial"] and entry["r2"] > 0 for entry in report.values())
    distilled = load_model(str(out), "classification")
    assert len(find_ffns(distilled)) == 2 + 8
    assert all(p.mlp is not None and p.mlp.width == report[p.key]["width"] for p in find_projections(distilled))


def test_the_distill_step_refuses_a_width_multiple_below_one(capsys):
    from moefy.steps import distill_attention as step

    with pytest.raises(SystemExit) as exit_info:
        step.main(["--model", "m", "--data", "d", "--out", "o", "--width-multiple", "0"])
    assert exit_info.value.code == 2 and "--width-multiple 0: must be at least 1" in capsys.readouterr().err


def test_a_distillation_whose_last_epoch_was_its_best_stopped_at_its_cap():
    torch.manual_seed(0)
    target, (x, y), (x_val, y_val) = random_projection(2000, 400)
    capped = distill(
        svd_start(target, 24), (x, y), (x_val, y_val), DistillSettings(learning_rate=1e-3, batch_size=128, max_epochs=2)
    )
    assert (capped.epochs, capped.best_epoch) == (2, 2) and capped.stopped_at_cap, "still improving at max_epochs"
    settings = DistillSettings(learning_rate=10.0, batch_size=128, max_epochs=5, patience=1)
    diverged = distill(svd_start(target, 24), (x, y), (x_val, y_val), settings)
    assert diverged.best_epoch == 0 and not diverged.stopped_at_cap, "patience ended it with the start kept"
