"""M-SMoE merging, its baselines, and MC-SMoE's low-rank + sparse compression (moefy.training.merging,
moefy.moe.compression), on tiny SparseMoE layers and a tiny upcycled BERT."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from builders import build_tiny
from moefy.adapters.models import load_model, load_tokenizer
from moefy.errors import MoefyError
from moefy.moe.checkpoints import load_sparse_moe, save_sparse_moe
from moefy.moe.compression import LowRankSparse, compress_experts, rank_for
from moefy.moe.sparse import Routing, SparseMoE, mask_padding
from moefy.training.merging import (
    Usage,
    alignment,
    group_experts,
    layer_budgets,
    merge_layer,
    merge_model,
    neuron_features,
    ranked,
    record_usage,
    similarity,
    swap_layers,
)
from moefy.training.upcycling import upcycle_model

D, S = 8, 12


def layer(experts: int = 4, gated: bool = False, k: int = 2, seed: int = 0, biases: bool = True) -> SparseMoE:
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g)

    return SparseMoE(
        w_in=w(experts, D, S),
        w_out=w(experts, S, D),
        act=nn.ReLU() if not gated else nn.SiLU(),
        router=nn.Linear(D, experts, bias=False),
        routing=Routing("top_k", k=k),
        w_gate=w(experts, D, S) if gated else None,
        b_in=w(experts, S) if biases else None,
        b_gate=w(experts, S) if gated and biases else None,
        expert_bias=w(experts, D) if biases else None,
    )


def usage_of(counts: list[int]) -> Usage:
    return Usage(torch.tensor(counts), torch.eye(len(counts), dtype=torch.float64))


def permuted_copy(moe: SparseMoE, source: int, target: int, perm: torch.Tensor) -> None:
    """Expert `target` becomes expert `source` with its neurons reordered by perm (same function)."""
    with torch.no_grad():
        for name in ("w_in", "w_gate"):
            t = getattr(moe, name)
            if t is not None:
                t[target] = t[source][:, perm]
        moe.w_out[target] = moe.w_out[source][perm]
        for name in ("b_in", "b_gate"):
            t = getattr(moe, name)
            if t is not None:
                t[target] = t[source][perm]
        if moe.expert_bias is not None:
            moe.expert_bias[target] = moe.expert_bias[source]


@pytest.mark.parametrize("gated", [False, True])
def test_alignment_recovers_a_planted_permutation(gated):
    moe = layer(gated=gated)
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(1))
    permuted_copy(moe, 0, 1, perm)
    tensors = {n: t.detach() for n, t in moe.state_dict().items() if not n.startswith("router")}
    found = alignment(neuron_features(tensors, 0), neuron_features(tensors, 1))
    # reference neuron i is member neuron found[i]: the member holds source neuron perm[j] at j
    assert torch.equal(perm[found], torch.arange(S))


@pytest.mark.parametrize("method", ["average", "frequency", "msmoe"])
@pytest.mark.parametrize("gated", [False, True])
def test_merging_identical_experts_returns_that_expert(method, gated):
    moe = layer(gated=gated)
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(2))
    permuted_copy(moe, 0, 1, torch.arange(S) if method != "msmoe" else perm)  # alignment undoes the permutation
    merged = merge_layer(moe, [[0, 1], [2], [3]], usage_of([5, 3, 1, 1]), method)
    assert merged.num_experts == 3 and merged.router_experts == 4
    assert torch.equal(merged.expert_map, torch.tensor([0, 0, 1, 2]))
    torch.testing.assert_close(merged.w_in[0], moe.w_in[0])
    torch.testing.assert_close(merged.w_out[0], moe.w_out[0])
    torch.testing.assert_close(merged.w_in[1:], moe.w_in[2:])
    x = torch.randn(20, D)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), moe(x), atol=1e-5, rtol=1e-5)


def test_frequency_weights_and_plain_average_differ_as_they_should():
    moe = layer(biases=False)
    freq = merge_layer(moe, [[0, 1], [2, 3]], usage_of([3, 1, 0, 0]), "frequency")
    plain = merge_layer(moe, [[0, 1], [2, 3]], usage_of([3, 1, 0, 0]), "average")
    torch.testing.assert_close(freq.w_in[0], 0.75 * moe.w_in[0] + 0.25 * moe.w_in[1])
    torch.testing.assert_close(plain.w_in[0], 0.5 * (moe.w_in[0] + moe.w_in[1]))
    torch.testing.assert_close(freq.w_in[1], 0.5 * (moe.w_in[2] + moe.w_in[3]))  # an unused group: plain mean


def test_singleton_groups_change_nothing():
    moe = layer()
    merged = merge_layer(moe, [[2], [0], [3], [1]], usage_of([4, 3, 2, 1]), "msmoe")
    x = torch.randn(30, D)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), moe(x), atol=1e-6, rtol=1e-6)


def test_a_token_sent_to_two_members_is_computed_once_with_the_gates_summed():
    moe = layer(biases=False)
    permuted_copy(moe, 0, 1, torch.arange(S))
    with torch.no_grad():  # every token picks experts 0 and 1
        moe.router.weight.zero_()
        moe.router.weight[:2] = 1.0
    merged = merge_layer(moe, [[0, 1], [2], [3]], usage_of([1, 1, 1, 1]), "average")
    x = torch.rand(10, D)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), moe(x), atol=1e-5, rtol=1e-5)
    assert merged.computed == 10 and moe.computed == 20  # one pair per token instead of two
    assert merged.flops_per_token() < merged.flops_per_token(measured=False)


def test_prune_keeps_the_dominant_experts_and_renormalises_the_router():
    moe = layer(k=1)
    pruned = merge_layer(moe, [[3], [1]], usage_of([1, 5, 0, 9]), "prune")
    assert pruned.num_experts == 2 and pruned.router_experts == 2 and pruned.expert_map is None
    torch.testing.assert_close(pruned.w_in, moe.w_in[[3, 1]])
    x = torch.randn(5, D)
    probs = moe.router(x)[:, [3, 1]].softmax(-1)
    torch.testing.assert_close(pruned.router(x).softmax(-1), probs)


def test_global_grouping_keeps_the_average_and_every_layer_at_least_one_group():
    usage = {
        1: usage_of([97, 1, 1, 1, 0, 0, 0, 0]),  # peaked: few groups
        3: usage_of([10, 10, 10, 10, 10, 10, 10, 10]),  # flat: many
        5: usage_of([30, 30, 20, 20, 0, 0, 0, 0]),
    }
    for groups in (1, 2, 4, 2.5):
        budgets = layer_budgets(usage, groups)
        assert sum(budgets.values()) == round(groups * 3)
        assert all(n >= 1 for n in budgets.values())
    assert layer_budgets(usage, 3) == {1: 1, 3: 4, 5: 4}  # the layers whose usage is spread keep more groups
    assert {i: ranked(u)[:2] for i, u in usage.items()} == {1: [0, 1], 3: [0, 1], 5: [0, 1]}
    assert layer_budgets(usage, 2, "layer") == {1: 2, 3: 2, 5: 2}
    with pytest.raises(MoefyError, match="groups per layer must be in 1-8"):
        layer_budgets(usage, 9)
    with pytest.raises(MoefyError, match="whole number"):
        layer_budgets(usage, 2.5, "layer")


def test_experts_join_the_dominant_expert_they_are_most_similar_to():
    sim = torch.tensor([[1.0, 0.9, 0.1, 0.2], [0.9, 1.0, 0.0, 0.3], [0.1, 0.0, 1.0, 0.8], [0.2, 0.3, 0.8, 1.0]])
    assert group_experts([0, 2], sim) == [[0, 1], [2, 3]]


def test_router_logit_similarity_is_the_cosine_of_logit_columns():
    moe = layer()
    logits = torch.randn(50, 4, dtype=torch.float64)
    sim = similarity(moe, Usage(torch.ones(4, dtype=torch.long), logits.t() @ logits))
    expected = torch.nn.functional.cosine_similarity(logits.t().unsqueeze(1), logits.t().unsqueeze(0), dim=-1)
    torch.testing.assert_close(sim, expected)
    weights = similarity(moe, None, "weights")
    assert weights.shape == (4, 4) and torch.allclose(weights.diagonal(), torch.ones(4, dtype=torch.float64))


def test_low_rank_plus_sparse_is_exact_at_full_rank_and_no_worse_than_the_svd_below():
    w = torch.randn(3, 10, 6, generator=torch.Generator().manual_seed(0))
    full = LowRankSparse.from_weight(w, rank=6, sparse_fraction=0.0)
    torch.testing.assert_close(full(), w, atol=1e-5, rtol=1e-5)
    for rank in (1, 3):
        for share in (0.0, 0.1):
            approx = LowRankSparse.from_weight(w, rank=rank, sparse_fraction=share)()
            u, s, v = torch.linalg.svd(w, full_matrices=False)
            svd = (u[:, :, :rank] * s[:, None, :rank]) @ v[:, :rank]
            assert (approx - w).norm() <= (svd - w).norm() + 1e-5
            if share:
                assert (approx - w).norm() < (svd - w).norm() - 1e-3  # the kept remainder helps
    exact = LowRankSparse.from_weight(w, rank=1, sparse_fraction=1.0)
    torch.testing.assert_close(exact(), w, atol=1e-5, rtol=1e-5)  # everything the SVD missed, kept
    assert exact.stored_values() == 3 * (10 + 6) + w.numel()
    assert rank_for(384, 1536, 0.25) == 96
    with pytest.raises(MoefyError, match="rank must be in 1-6"):
        LowRankSparse.from_weight(w, rank=7, sparse_fraction=0.0)


def test_compressed_layer_trains_its_factors_and_keeps_the_sparsity_pattern():
    moe = layer(gated=True)
    errors = compress_experts(moe, rank_fraction=0.5, sparse_fraction=0.05)
    assert set(errors) == {"w_in", "w_gate", "w_out"} and all(0 < e < 1 for e in errors.values())
    assert moe.w_in is None and moe.gated and "w_in" in moe.factored
    before = moe.factored["w_in"].indices.clone()
    out = moe(torch.randn(6, D))
    out.sum().backward()
    assert moe.factored["w_in"].u.grad is not None and moe.factored["w_in"].values.grad is not None
    assert torch.equal(moe.factored["w_in"].indices, before)
    assert moe.flops_per_token(measured=False) < layer(gated=True).flops_per_token(measured=False)


def test_merged_and_compressed_upcycled_model_saves_reloads_and_runs(tmp_path):
    folder = build_tiny("bert", tmp_path / "bert", hidden_act="relu")
    model = load_model(str(folder), "classification", label_names=["a", "b"]).eval()
    moes = upcycle_model(model, "all", 4, Routing("top_k", k=2), drop_ratio=0.5, seed=0)
    with torch.no_grad():
        for moe in moes.values():
            moe.router.weight.normal_(0, 1.0)
    mask_padding(model, moes.values())
    tokenizer = load_tokenizer(str(folder))
    inputs = tokenizer(["the movie was good", "bad plot and dull cast", "fine"], padding=True, return_tensors="pt")
    with record_usage(moes) as usage, torch.no_grad():
        model(**inputs)
    assert all(int(u.counts.sum()) == 2 * int(inputs["attention_mask"].sum()) for u in usage.values())

    with torch.no_grad():
        original = model(**inputs).logits
        singletons, _ = merge_model(moes, usage, "msmoe", groups=4)  # every expert its own group
        swap_layers(model, moes, singletons)
        torch.testing.assert_close(model(**inputs).logits, original, atol=1e-6, rtol=1e-6)
        swap_layers(model, singletons, moes)
    merged, groups = merge_model(moes, usage, "msmoe", groups=2)
    assert sum(m.num_experts for m in merged.values()) == 2 * len(moes)
    for moe in merged.values():
        compress_experts(moe, rank_fraction=0.5, sparse_fraction=0.1)
    swap_layers(model, moes, merged)
    mask_padding(model, merged.values())
    with torch.no_grad():
        expected = model(**inputs).logits
    save_sparse_moe(model, merged, tokenizer, tmp_path / "saved", "classification")
    reloaded, reloaded_moes, _ = load_sparse_moe(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-6, rtol=1e-6)
    assert [m.num_experts for m in reloaded_moes.values()] == [m.num_experts for m in merged.values()]
    assert all(set(m.factored) == {"w_in", "w_out"} and m.router_experts == 4 for m in reloaded_moes.values())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch_transformers"])
def test_hugging_face_smoes_merge_save_reload_and_run(family, tmp_path):
    from test_smoe import batch, save_tiny, tiny

    from moefy.adapters.smoe import convert_smoes
    from moefy.moe.checkpoints import load_smoe

    if family == "switch_transformers":  # no moefy task loads it: merged in memory, run
        model = tiny(family)
        moes = convert_smoes(model)
    else:
        save_tiny(family, tmp_path / family)
        model, moes, _, site = load_smoe(tmp_path / family, "causal_lm")
        assert site == "smoe"
    inputs = batch(family)
    with record_usage(moes) as usage, torch.no_grad():
        model(**inputs)
    merged, _ = merge_model(moes, usage, "msmoe", groups=2)
    for moe in merged.values():
        compress_experts(moe, rank_fraction=0.5, sparse_fraction=0.05)
    swap_layers(model, moes, merged)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert torch.isfinite(expected).all()
    assert sum(m.num_experts for m in merged.values()) == 2 * len(merged)
    if family == "switch_transformers":
        return
    tokenizer = load_tokenizer(str(tmp_path / family))
    save_sparse_moe(model, merged, tokenizer, tmp_path / "saved", "causal_lm", site="smoe")
    reloaded, reloaded_moes, _, site = load_smoe(tmp_path / "saved", "causal_lm")
    assert site == "smoe" and [m.num_experts for m in reloaded_moes.values()] == [m.num_experts for m in merged.values()]
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits[real], expected[real], atol=1e-5, rtol=1e-5)


def test_a_saved_file_mixing_layer_sites_is_a_clear_error():
    from pathlib import Path

    from moefy.moe.checkpoints import _site

    assert _site(Path("m"), {"1": {"site": "smoe"}, "3": {"site": "smoe"}}) == "smoe"
    assert _site(Path("m"), {"1": {}}) == "ffn"  # written before sites existed: dense FFN slots
    with pytest.raises(MoefyError, match="mixes MoE layer sites"):
        _site(Path("m"), {"1": {"site": "ffn"}, "3": {"site": "smoe"}})
