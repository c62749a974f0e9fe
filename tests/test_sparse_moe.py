"""The trainable MoE layer: routing rules, the auxiliary losses against hand counts, gradients only
to the experts a token used, upcycled models equal to the dense ones at initialisation (every family),
Drop-Upcycling's redrawn share, and a split FFN as a trainable MoE equal to the inference layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from builders import DECODERS, FAMILIES, build_tiny
from moefy.adapters.ffn import FFN, find_ffns
from moefy.adapters.models import load_model, load_tokenizer
from moefy.conversion.routers import MLPRouter
from moefy.errors import MoefyError
from moefy.moe.layer import MoEFFN
from moefy.moe.sparse import Dispatch, Routing, SparseMoE, expert_capacity, from_split, load_loss, route, z_loss
from moefy.training.upcycling import upcycle, upcycle_model, upcycled_layers

TEXTS = ["the movie was good and funny", "bad", "a dull boring plot with its cast"]


def plain_ffn(d=16, d_ff=32, gated=False, seed=0) -> FFN:
    torch.manual_seed(seed)
    w_in, w_out = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
    w_gate = nn.Linear(d, d_ff) if gated else None
    return FFN(0, w_in, nn.SiLU() if gated else nn.ReLU(), w_out, lambda module: None, w_gate)


def dense_out(ffn: FFN, x: torch.Tensor) -> torch.Tensor:
    return ffn.w_out(ffn.activations(x))


class FixedLogits(nn.Module):
    """A router that returns given logits for the first T tokens."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits[: x.shape[0]] + 0 * x.sum(-1, keepdim=True)


# -- routing ---------------------------------------------------------------------------------------


def test_top_k_gates_renormalised_or_not():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 0.0]])
    probs = logits.softmax(-1)
    for renormalize in (True, False):
        d = route(logits, Routing("top_k", k=2, renormalize=renormalize))
        assert torch.equal(d.expert, d.expert.sort().values)  # sorted by expert for grouped_mm
        pairs = {(int(t), int(e)): float(g) for t, e, g in zip(d.token, d.expert, d.gate)}
        assert set(pairs) == {(0, 0), (0, 1), (1, 1), (1, 2)}
        top0 = probs[0, :2]
        expected = top0 / top0.sum() if renormalize else top0
        assert pairs[(0, 0)] == pytest.approx(float(expected[0]))
        assert pairs[(0, 1)] == pytest.approx(float(expected[1]))
        assert d.counts.sum() == 4


def test_unweighted_top_k_is_moefications_rule():
    logits = torch.tensor([[5.0, 1.0, 3.0], [0.0, 2.0, 1.0]])
    d = route(logits, Routing("unweighted_top_k", k=2))
    assert sorted(zip(d.token.tolist(), d.expert.tolist())) == [(0, 0), (0, 2), (1, 1), (1, 2)]
    assert torch.equal(d.gate, torch.ones(4))


@pytest.mark.parametrize("tokens,experts,factor", [(10, 4, 2.0), (7, 3, 1.0), (64, 8, 0.5), (5, 8, 2.0)])
def test_expert_choice_never_exceeds_capacity(tokens, experts, factor):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens))
    d = route(logits, Routing("expert_choice", capacity_factor=factor))
    capacity = expert_capacity(tokens, experts, factor)
    assert capacity == min(tokens, math.ceil(factor * tokens / experts))
    assert int(d.counts.max()) <= capacity
    # each expert's tokens are the ones it scores highest
    probs = logits.softmax(-1)
    for e in range(experts):
        taken = d.token[d.expert == e]
        assert set(taken.tolist()) == set(probs[:, e].topk(capacity).indices.tolist())


def test_a_token_no_expert_takes_passes_through_the_residual_only():
    ffn = plain_ffn()
    # expert choice, capacity 1 of 4 tokens per expert, two experts: at most two tokens are taken
    logits = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 2.0]])
    moe = SparseMoE(
        w_in=ffn.w_in.weight.detach().t().unsqueeze(0).repeat(2, 1, 1),
        w_out=ffn.w_out.weight.detach().t().unsqueeze(0).repeat(2, 1, 1),
        act=ffn.act,
        router=FixedLogits(logits),
        routing=Routing("expert_choice", capacity_factor=0.5),
        b_in=ffn.w_in.bias.detach().unsqueeze(0).repeat(2, 1),
        expert_bias=ffn.w_out.bias.detach().unsqueeze(0).repeat(2, 1),
    )
    x = torch.randn(4, 16)
    y = moe(x)
    assert torch.equal(y[1], torch.zeros(16)) and torch.equal(y[3], torch.zeros(16))
    gates = logits.softmax(-1)
    torch.testing.assert_close(y[0], gates[0, 0] * dense_out(ffn, x[:1])[0])
    assert moe.tokens_dropped == 2 and moe.tokens_seen == 4
    # in a block, an output of 0 leaves the residual: BERT's LayerNorm(0 + residual) is LayerNorm(residual)


def test_padding_tokens_go_to_no_expert_and_count_nowhere():
    ffn = plain_ffn()
    moe = upcycle(ffn, 4, Routing("top_k", k=2), generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 16)
    moe.token_mask = torch.tensor([[True, True, False], [True, False, False]])
    y = moe(x)
    assert torch.equal(y[0, 2], torch.zeros(16)) and torch.equal(y[1, 1:], torch.zeros(2, 16))
    torch.testing.assert_close(y[0, 0], dense_out(ffn, x[0, :1])[0], atol=1e-5, rtol=1e-5)
    assert int(moe.load.sum()) == 3 * 2 and moe.tokens_seen == 3 and moe.tokens_dropped == 0
    moe.token_mask = torch.tensor([[True, False], [True, False]])  # another shape: not this input's mask
    assert moe(x).abs().sum(-1).ne(0).all()


def test_bad_routing_is_a_clear_error():
    with pytest.raises(MoefyError, match="routing 'top2' is not one of"):
        Routing("top2")
    with pytest.raises(MoefyError, match="k >= 1"):
        Routing("top_k", k=0)


# -- auxiliary losses --------------------------------------------------------------------------------


def test_load_loss_is_the_switch_formula_on_a_hand_count():
    # 4 tokens, 2 experts, top-1: tokens 0, 1, 2 go to expert 0, token 3 to expert 1
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]]))
    d = route(logits, Routing("top_k", k=1))
    assert d.counts.tolist() == [3, 1]
    # f = (3/4, 1/4); P = mean probs = (0.6, 0.4); loss = 2 * (0.75 * 0.6 + 0.25 * 0.4) = 1.1
    assert float(load_loss(logits, d)) == pytest.approx(1.1, rel=1e-6)
    uniform = torch.zeros(6, 3)
    assert float(
        load_loss(uniform, Dispatch(torch.arange(6), torch.arange(6) % 3, torch.ones(6), torch.tensor([2, 2, 2])))
    ) == pytest.approx(1.0)
    logits.requires_grad_(True)
    load_loss(logits, route(logits, Routing("top_k", k=1))).backward()
    assert logits.grad.abs().sum() > 0  # through P: the router learns to balance


def test_z_loss_is_the_mean_squared_log_partition():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert float(z_loss(logits)) == pytest.approx(expected, rel=1e-6)
    assert float(z_loss(logits, torch.tensor([True, False]))) == pytest.approx(math.log(2.0) ** 2, rel=1e-6)


# -- gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_reach_only_the_experts_a_token_used(gated):
    ffn = plain_ffn(gated=gated)
    # top-1 as in Switch: the gate is the raw probability (renormalised over one expert it would be 1,
    # and the router would get no gradient from the task loss)
    moe = upcycle(ffn, 4, Routing("top_k", k=1, renormalize=False), generator=torch.Generator().manual_seed(0))
    logits = torch.full((6, 4), -5.0)
    logits[:, 0], logits[3:, 2] = 1.0, 2.0  # tokens 0-2 -> expert 0, tokens 3-5 -> expert 2
    moe.router = FixedLogits(logits)
    x = torch.randn(6, 16)
    moe(x).pow(2).sum().backward()
    for p in (moe.w_in, moe.w_gate, moe.w_out, moe.b_in, moe.expert_bias):
        if p is None:
            continue
        used = p.grad.flatten(1).abs().sum(-1)
        assert used[0] > 0 and used[2] > 0, "the experts that were used get gradients"
        assert used[1] == 0 and used[3] == 0, "the experts no token used get none"
    assert moe.router.logits.grad[:, [0, 2]].abs().sum() > 0  # the gates carry the router's gradient
    loss = moe(x).sum()  # a broadcast incoming gradient, which grouped_mm's backward needs contiguous
    loss.backward()


# -- upcycling ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: build_tiny(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_upcycled_model_at_initialisation_is_the_dense_model(folders, family):
    task = "causal_lm" if family in DECODERS else "classification"
    labels = None if task == "causal_lm" else ["a", "b"]

    def load():
        torch.manual_seed(0)
        return load_model(str(folders[family]), task, label_names=labels).eval()

    inputs = load_tokenizer(str(folders[family]))(TEXTS, padding=True, return_tensors="pt")
    dense, model = load(), load()
    moes = upcycle_model(model, "all", 4, Routing("top_k", k=2, renormalize=True), seed=1)
    assert sorted(moes) == [f.index for f in find_ffns(dense)]
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, dense(**inputs).logits, atol=1e-5, rtol=1e-5)
        # unnormalised, each FFN's output is scaled by the token's two largest router probabilities
        seen = {}
        for index, moe in moes.items():
            moe.routing = Routing("top_k", k=2, renormalize=False)
            moe.register_forward_hook(lambda m, args, out, i=index: seen.__setitem__(i, (args[0], out)))
        model(**inputs)
        dense_ffns = {f.index: f for f in find_ffns(dense)}
        for index, (x, y) in seen.items():
            x = x.reshape(-1, x.shape[-1])
            top2 = moes[index].router(x).softmax(-1).topk(2).values.sum(-1, keepdim=True)
            expected = top2 * dense_ffns[index].w_out(dense_ffns[index].activations(x))
            torch.testing.assert_close(y.reshape(expected.shape), expected, atol=1e-5, rtol=1e-5)
            assert float(top2.max()) < 0.9, "so the unnormalised model is not the dense one"


@pytest.mark.parametrize("gated", [False, True])
def test_unnormalised_gates_scale_the_ffn_as_the_formula_says(gated):
    ffn = plain_ffn(gated=gated)
    moe = upcycle(ffn, 8, Routing("top_k", k=2, renormalize=False), generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 16)
    with torch.no_grad():
        top2 = moe.router(x).softmax(-1).topk(2).values.sum(-1, keepdim=True)
        torch.testing.assert_close(moe(x), top2 * dense_out(ffn, x), atol=1e-5, rtol=1e-5)


def test_new_router_is_drawn_from_n_0_002():
    ffn = plain_ffn(d=256, d_ff=64)
    moe = upcycle(ffn, 32, Routing(), generator=torch.Generator().manual_seed(0))
    w = moe.router.weight.detach()
    assert w.shape == (32, 256) and moe.router.bias is None
    assert abs(float(w.std()) - 0.02) < 0.001 and abs(float(w.mean())) < 0.001, (float(w.std()), float(w.mean()))


@pytest.mark.parametrize("gated", [False, True])
def test_drop_upcycling_redraws_the_given_share_of_each_experts_neurons(gated):
    ffn = plain_ffn(d=16, d_ff=64, gated=gated)
    moe = upcycle(ffn, 4, Routing(), drop_ratio=0.5, generator=torch.Generator().manual_seed(0))
    original_in = ffn.w_in.weight.detach().t()  # [d, d_ff]
    kept = []
    for e in range(4):
        same_in = (moe.w_in[e] == original_in).all(0)
        same_out = (moe.w_out[e] == ffn.w_out.weight.detach().t()).all(1)
        assert torch.equal(same_in, same_out), "a neuron is redrawn in its input row and output column together"
        assert int((~same_in).sum()) == 32
        if gated:
            assert torch.equal((moe.w_gate[e] == ffn.w_gate.weight.detach().t()).all(0), same_in)
        assert torch.equal(moe.b_in[e][~same_in], torch.zeros(32))
        kept.append(same_in)
    assert len({tuple(k.tolist()) for k in kept}) == 4, "each expert redraws its own neurons"
    redrawn = moe.w_in[0][:, ~kept[0]].detach()
    assert abs(float(redrawn.std()) - float(original_in.std())) < 0.2 * float(original_in.std())
    with pytest.raises(MoefyError, match="drop_ratio"):
        upcycle(ffn, 4, Routing(), drop_ratio=1.5)


def test_upcycled_layers_choices():
    assert upcycled_layers("every_other", 6) == [1, 3, 5]
    assert upcycled_layers("all", 3) == [0, 1, 2]
    assert upcycled_layers([2, 0, 2], 4) == [0, 2] == upcycled_layers("2,0", 4)
    with pytest.raises(MoefyError, match="FFNs 0-3"):
        upcycled_layers([4], 4)
    with pytest.raises(MoefyError, match="every_other, all"):
        upcycled_layers("odd", 4)


def test_misaligned_experts_are_a_clear_error():
    with pytest.raises(MoefyError, match="16-byte aligned"):
        SparseMoE(torch.zeros(2, 16, 6), torch.zeros(2, 6, 16), nn.ReLU(), nn.Linear(16, 2), Routing())


# -- a conversion as a trainable MoE ---------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
def test_a_split_ffn_as_a_trainable_moe_equals_the_inference_layer(gated):
    ffn = plain_ffn(d=16, d_ff=64, gated=gated)
    labels = torch.randperm(64, generator=torch.Generator().manual_seed(1)) % 8
    torch.manual_seed(2)
    router = MLPRouter(16, 8)
    inference = MoEFFN(ffn, labels, router, 8)
    inference.k = 3
    trainable = from_split(ffn, labels, 8, router, k=3)
    x = torch.randn(20, 16)
    with torch.no_grad():
        torch.testing.assert_close(trainable(x), inference(x), atol=1e-5, rtol=1e-5)
        trainable.routing = Routing("unweighted_top_k", k=8)
        torch.testing.assert_close(trainable(x), dense_out(ffn, x), atol=1e-5, rtol=1e-5)
    assert trainable.active_parameters() == 8 * ((3 if gated else 2) * 16 * 8 + (16 if gated else 8))
