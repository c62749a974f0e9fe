import pytest
import torch

from moefy.ffn import find_ffns
from moefy.models import load_classifier, load_tokenizer
from moefy.moe import MoEFFN, ffn_flops_fraction, moefy_model, set_experts_per_token
from moefy.routers import GroundTruthRouter, MLPRouter, SimilarityRouter, expert_centroids, expert_mass

E = 8


def balanced_labels(d_ff: int, seed: int) -> torch.Tensor:
    return torch.randperm(d_ff, generator=torch.Generator().manual_seed(seed)) % E


def moefied(folder, selector: str):
    torch.manual_seed(0)  # the same fresh classifier head as `dense` below
    model = load_classifier(str(folder), label_names=["a", "b"], activation="relu").eval()
    ffns = find_ffns(model)
    labels = {f.index: balanced_labels(f.d_ff, f.index) for f in ffns}
    routers = {}
    for f in ffns:
        if selector == "groundtruth":
            routers[f.index] = GroundTruthRouter(labels[f.index], E)
        elif selector == "similarity":
            routers[f.index] = SimilarityRouter(expert_centroids(f.w_in.weight.detach(), labels[f.index], E))
        else:
            torch.manual_seed(f.index)
            routers[f.index] = MLPRouter(f.d_model, E)
    return model, moefy_model(model, labels, routers, E), labels


@pytest.fixture(scope="module")
def batch(tiny_bert):
    tokenizer = load_tokenizer(str(tiny_bert))
    return tokenizer(["the movie was good and funny", "bad", "a dull boring plot with its cast"], padding=True, return_tensors="pt")


@pytest.mark.parametrize("selector", ["groundtruth", "similarity", "mlp"])
def test_full_budget_gives_the_dense_logits(tiny_bert, batch, selector):
    torch.manual_seed(0)
    dense = load_classifier(str(tiny_bert), label_names=["a", "b"], activation="relu").eval()
    model, layers, _ = moefied(tiny_bert, selector)
    set_experts_per_token(layers, E)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, dense(**batch).logits)


@pytest.mark.parametrize("selector", ["groundtruth", "similarity", "mlp"])
def test_partial_budget_masks_exactly_the_unchosen_experts(tiny_bert, selector):
    model, layers, labels = moefied(tiny_bert, selector)
    moe: MoEFFN = layers[0]
    moe.k = 3
    x = torch.randn(5, 7, moe.w_in.in_features)
    with torch.no_grad():
        h = moe.act(moe.w_in(x))
        chosen = moe.router(x, h).topk(3, dim=-1).indices
        keep = torch.zeros(5, 7, E).scatter_(-1, chosen, 1.0)[..., labels[0]]
        expected = moe.w_out(h * keep)
        torch.testing.assert_close(moe(x), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(moe(x), moe.w_out(h))
    assert torch.equal(moe.experts_per_token, torch.full((5, 7), 3.0))


def test_groundtruth_picks_the_experts_with_most_activation(tiny_bert):
    model, layers, labels = moefied(tiny_bert, "groundtruth")
    moe = layers[0]
    x = torch.randn(4, moe.w_in.in_features)
    h = moe.act(moe.w_in(x))
    mass = torch.stack([h[:, labels[0] == e].clamp(min=0).sum(-1) for e in range(E)], dim=-1)
    torch.testing.assert_close(expert_mass(h, labels[0], E), mass)
    torch.testing.assert_close(moe.router(x, h), mass)


def test_a_smaller_budget_changes_predictions(tiny_bert, batch):
    model, layers, _ = moefied(tiny_bert, "similarity")
    with torch.no_grad():
        full = model(**batch).logits
        set_experts_per_token(layers, 1)
        assert not torch.allclose(model(**batch).logits, full)


def test_flops_fraction():
    # 4 of 16 experts of a 64x256 FFN, plus a 2*64*16 FLOP router
    assert ffn_flops_fraction(64, 256, 16, 4, 2 * 64 * 16) == pytest.approx(0.25 + 2048 / (4 * 64 * 256))
    assert ffn_flops_fraction(64, 256, 16, 16, 10**6) == 1.0
