"""Per-layer budgets (moefy.conversion.budgets): error curves and their exact allocation."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from builders import synthetic_ffn
from moefy.conversion.budgets import allocate, error_curve, spread
from moefy.conversion.routers import GroundTruthRouter, MLPRouter
from moefy.errors import MoefyError
from moefy.measure.evaluation import selection_rules
from moefy.moe.layer import MoEFFN

E = 8


def test_allocation_is_the_exact_optimum_and_spends_the_budget():
    rng = np.random.default_rng(0)
    curves = [np.sort(rng.random(5))[::-1] * rng.random() for _ in range(4)]  # 4 layers, 4 experts each
    for total in range(4, 17):
        ks = allocate(curves, total)
        assert sum(ks) == total and min(ks) >= 1
        best = min(
            sum(c[k] for c, k in zip(curves, combo)) for combo in itertools.product(range(1, 5), repeat=4) if sum(combo) == total
        )
        assert sum(c[k] for c, k in zip(curves, ks)) == pytest.approx(best)


def test_allocation_refuses_a_budget_it_cannot_spend():
    with pytest.raises(MoefyError, match="cannot spread 3 experts over 4 layers"):
        allocate([[1, 0.5, 0]] * 4, 3)


def test_error_curves_fall_to_zero_and_an_insensitive_layer_gets_the_least():
    x = torch.randn(200, 16)
    curves, layers = [], []
    labels = torch.randperm(64, generator=torch.Generator().manual_seed(0)) % E
    for index in range(3):
        ffn = synthetic_ffn(16, 64, gated=True, bias=False, act=nn.SiLU())
        ffn.index = index
        if index == 1:
            with torch.no_grad():
                ffn.w_out.weight.zero_()  # this layer's FFN adds nothing: skipping its experts costs nothing
        router = GroundTruthRouter(labels, E)
        curve = error_curve(ffn, labels, E, 0, router, x, chunk_tokens=64)
        assert curve.shape == (E + 1,) and curve[-1].item() == pytest.approx(0.0, abs=1e-9)
        if index != 1:
            assert (curve[:-1] > 0).all() and (curve.diff() <= 1e-9).all(), "the oracle's top k: each expert helps"
            with torch.no_grad():
                assert curve[0].item() == pytest.approx(
                    ffn.w_out(ffn.activations(x)).double().square().sum(-1).mean().item(), rel=1e-5
                )
        curves.append(curve)
        layers.append(MoEFFN(ffn, labels, router, E))
    ks = spread(3, curves, [(8, 1)] * 3)
    assert sum(ks) == 9 and ks[1] == 1, "the zeroed layer keeps one expert, the others share the rest"
    rules = selection_rules([0.375, 1.0], [], layers, E, ["uniform", "sensitivity"], dict(enumerate(curves)))
    uniform, sensitivity = rules[0], rules[1]
    assert (uniform.k, uniform.layer_k, sensitivity.allocation) == (3, None, "sensitivity")
    assert sensitivity.layer_k == tuple(ks)
    flops = [layer.flops_per_token(k, router_runs=False) for layer, k in zip(layers, sensitivity.layer_k)]
    assert sum(flops) == sum(layer.flops_per_token(3, router_runs=False) for layer in layers), "the uniform budget's FLOPs"
    assert rules[2].runs_dense(E) and rules[2].layer_k is None, "budget 1.0: every expert everywhere, nothing to spread"
    sensitivity.apply(layers)
    assert [layer.k for layer in layers] == ks


def test_error_curves_follow_the_router_given():
    """A router that ranks experts badly loses more at every k below E than the oracle."""
    ffn = synthetic_ffn(16, 64, gated=False, bias=True, act=nn.ReLU())
    labels = torch.randperm(64, generator=torch.Generator().manual_seed(1)) % E
    x = torch.randn(300, 16)
    oracle = error_curve(ffn, labels, E, 0, GroundTruthRouter(labels, E), x)
    torch.manual_seed(0)
    random = error_curve(ffn, labels, E, 0, MLPRouter(16, E), x)
    assert (oracle[1:-1] < random[1:-1]).all() and oracle[0].item() == pytest.approx(random[0].item()) and random[-1] < 1e-9


def test_a_pass_counts_the_experts_of_a_layer_given_every_one_beside_a_layer_given_one(tmp_path):
    """Per-layer budgets can give a layer all its routed experts: it runs dense and has no picks."""
    from builders import build_tiny
    from moefy import dist
    from moefy.adapters.ffn import find_ffns
    from moefy.adapters.models import load_model, load_tokenizer
    from moefy.adapters.tasks import get_task
    from moefy.data.batches import Encoded, eval_batches
    from moefy.measure.evaluation import SelectionRule, run_pass
    from moefy.moe.layer import moefy_model

    folder = build_tiny("llama", tmp_path / "llama")
    model = load_model(str(folder), "causal_lm").eval()
    labels = {f.index: torch.arange(f.d_ff) % E for f in find_ffns(model)}
    routers = {i: GroundTruthRouter(t, E) for i, t in labels.items()}
    layers = moefy_model(model, labels, routers, E)
    encoded = Encoded(load_tokenizer(str(folder)), ["the movie was good", "bad plot", "a dull and boring film"], max_length=16)
    ctx = dist.setup("cpu")
    rule = SelectionRule("top_k", budget=0.5625, k=4, allocation="sensitivity", layer_k=(E, 1))
    rule.apply(layers)
    totals = run_pass(model, layers, encoded, eval_batches(encoded, 2, ctx), get_task("causal_lm"), None, ctx, "test")[1]
    assert totals.layer_experts_mean == [E, 1] and totals.experts_mean == (E + 1) / 2


def test_layers_are_compared_by_relative_error_not_by_the_scale_of_their_outputs():
    """Two layers that lose the same share of their output per expert skipped get the same experts,
    whatever their outputs' scale (the residual stream grows with depth)."""
    curve = np.array([1.0, 0.5, 0.25, 0.1, 0.0])
    assert spread(2, [curve, 100 * curve], [0, 0]) == [2, 2]
    assert spread(2, [curve, np.zeros(5)], [0, 0]) == [3, 1], "a layer whose FFN adds nothing keeps one expert"
