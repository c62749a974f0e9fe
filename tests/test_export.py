"""Export round trip: the folder restores the same MoE model, outside the workflow."""

import pytest
import torch

from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import load_classifier, load_tokenizer, save_classifier
from moefy.conversion.routers import MLPRouter, SimilarityRouter, budget_to_k, expert_centroids
from moefy.errors import MoefyError
from moefy.files import save_tensors
from moefy.moe.checkpoints import MOE_FILE, load_moe, save_moe
from moefy.moe.layer import moefy_model, set_experts_per_token

E = 8


@pytest.fixture(scope="module")
def finetuned(tiny_bert, tmp_path_factory):
    torch.manual_seed(0)
    model = load_classifier(str(tiny_bert), label_names=["rotten", "fresh"], activation="relu")
    folder = tmp_path_factory.mktemp("finetuned") / "model"
    save_classifier(model, load_tokenizer(str(tiny_bert)), folder)
    return folder


def parts(model, router: str):
    labels, routers = {}, {}
    for ffn in find_ffns(model):
        labels[ffn.index] = torch.randperm(ffn.d_ff, generator=torch.Generator().manual_seed(ffn.index)) % E
        if router == "similarity":
            routers[ffn.index] = SimilarityRouter(expert_centroids(ffn.w_in.weight.detach(), labels[ffn.index], E))
        else:
            torch.manual_seed(10 + ffn.index)
            routers[ffn.index] = MLPRouter(ffn.d_model, E)
    return labels, routers


@pytest.mark.parametrize("router,budget", [("mlp", 0.25), ("similarity", 0.5), ("mlp", 1.0)])
def test_round_trip_gives_identical_logits(finetuned, tmp_path, router, budget):
    model = load_classifier(str(finetuned)).eval()
    labels, routers = parts(model, router)
    out = save_moe(finetuned, labels, routers, router, E, budget, tmp_path / "exported")
    layers = moefy_model(model, labels, routers, E)
    set_experts_per_token(layers, budget_to_k(budget, E))

    loaded, tokenizer = load_moe(out)
    batch = tokenizer(["the movie was good", "a dull boring plot with its cast", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected, got = model(**batch).logits, loaded(**batch).logits
    assert torch.equal(got, expected)
    assert not loaded.training and all(layer.k == budget_to_k(budget, E) for layer in find_moe_layers(loaded))


def find_moe_layers(model):
    from moefy.moe.layer import MoEFFN

    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def test_groundtruth_is_not_exported(finetuned, tmp_path):
    model = load_classifier(str(finetuned))
    labels, _ = parts(model, "mlp")
    with pytest.raises(MoefyError, match="oracle"):
        save_moe(finetuned, labels, {}, "groundtruth", E, 0.5, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_loading_a_plain_or_foreign_folder_says_what_it_is(finetuned, tmp_path):
    with pytest.raises(MoefyError, match="not a model exported by moefy"):
        load_moe(finetuned)
    folder = tmp_path / "other"
    folder.mkdir()
    save_tensors(folder / MOE_FILE, {"x": torch.zeros(1)}, {"format": "something-else"})
    with pytest.raises(MoefyError, match="Export it again"):
        load_moe(folder)
