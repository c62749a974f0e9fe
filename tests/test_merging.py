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
    cluster_experts,
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


def calibrated(moe: SparseMoE, tokens: int = 64, seed: int = 0) -> Usage:
    """The layer's Usage from `tokens` random inputs."""
    with record_usage({0: moe}) as usage, torch.no_grad():
        moe(torch.randn(tokens, moe.d_model, generator=torch.Generator().manual_seed(seed)))
    return usage[0]


def test_reap_score_is_the_mean_over_routed_tokens_of_gate_times_output_norm():
    # expert e outputs c_e * relu(x); the router's bias gives probabilities 0.6 / 0.3 / 0.1 and
    # input 3 raises expert 2's logit by x_3, so tokens a, b pick experts 0, 1 (gates 2/3, 1/3)
    # and token c (logits ln 6, ln 3, ln 12) picks 2, 0 (gates 12/18, 6/18)
    scale = torch.tensor([1.0, 3.0, 5.0])
    router = nn.Linear(4, 3)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[2, 3] = 1.0
        router.bias.copy_(torch.tensor([6.0, 3.0, 1.0]).log())
    eye = torch.eye(4).expand(3, 4, 4)
    moe = SparseMoE(w_in=eye, w_out=eye * scale.view(3, 1, 1), act=nn.ReLU(), router=router, routing=Routing("top_k", k=2))
    ln12 = float(torch.tensor(12.0).log())
    a, b, c = [3.0, 4.0, 0.0, 0.0], [0.0, 6.0, 8.0, 0.0], [0.0, 0.0, 0.0, ln12]  # |relu(x)|: 5, 10, ln 12
    x = torch.tensor([[a, b, c, [9.0, 9.0, 9.0, 9.0]]])
    moe.token_mask = torch.tensor([[True, True, True, False]])  # the last position is padding
    with record_usage({0: moe}) as usage, torch.no_grad():
        moe(x)
    usage = usage[0]
    assert usage.counts.tolist() == [3, 2, 1] and int(usage.tokens) == 3
    expected = [(2 / 3 * 5 + 2 / 3 * 10 + 1 / 3 * ln12) / 3, (1 / 3 * 3 * 5 + 1 / 3 * 3 * 10) / 2, 2 / 3 * 5 * ln12]
    torch.testing.assert_close(usage.reap, torch.tensor(expected, dtype=torch.float64))
    mean_input = torch.tensor([a, b, c]).relu().mean(0).double()
    torch.testing.assert_close(usage.mean_output, scale.double().view(3, 1) * mean_input)
    assert ranked(usage, "reap") == [2, 1, 0] and ranked(usage) == [0, 1, 2]  # REAP keeps the rarely used expert 2
    pruned, groups = merge_model({0: moe}, {0: usage}, "reap", groups=2, grouping="layer")
    assert groups[0] == [[2], [1]] and pruned[0].num_experts == 2
    torch.testing.assert_close(pruned[0].w_out, moe.w_out[[2, 1]])


@pytest.mark.parametrize("renormalize", [True, False])
def test_pruning_keeps_the_outputs_of_tokens_whose_picks_survive(renormalize):
    moe = layer(experts=6, k=2, biases=True)
    moe.routing = Routing("top_k", k=2, renormalize=renormalize)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    usage = calibrated(moe)
    pruned, groups = merge_model({0: moe}, {0: usage}, "reap", groups=4, grouping="layer")
    kept = torch.tensor([g[0] for g in groups[0]])
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        probs = moe.router(x).softmax(-1)
        full, out = moe(x), pruned[0](x)
    survive = torch.isin(probs.topk(2).indices, kept).all(-1)
    assert 0 < int(survive.sum()) < 200
    if renormalize:  # the kept softmax is p_e / sum of the kept p: the picks and their renormalised gates stay
        torch.testing.assert_close(out[survive], full[survive], atol=1e-5, rtol=1e-5)
    else:  # raw gates grow by 1 / (the kept experts' probability mass)
        mass = probs[:, kept].sum(-1, keepdim=True)
        torch.testing.assert_close(out[survive], full[survive] / mass[survive], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out[survive], full[survive], atol=1e-3)


def test_hcsmoe_clusters_planted_groups_of_near_identical_experts_and_merges_them():
    moe = layer(experts=6, k=2)
    planted = [{0, 3}, {1, 4, 5}, {2}]
    noise = torch.Generator().manual_seed(5)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0, generator=noise)
        for source, copies in ((0, [3]), (1, [4, 5])):
            for target in copies:
                for t in (moe.w_in, moe.w_out, moe.b_in, moe.expert_bias):
                    t[target] = t[source] + 1e-3 * torch.randn(t[source].shape, generator=noise)
    usage = calibrated(moe)
    merged, groups = merge_model({0: moe}, {0: usage}, "hcsmoe", groups=3, grouping="layer")
    assert sorted(map(set, groups[0]), key=min) == planted
    assert merged[0].num_experts == 3 and merged[0].router_experts == 6
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():  # near-identical experts merged: nearly the same layer
        torch.testing.assert_close(merged[0](x), moe(x), atol=1e-2, rtol=1e-2)
    # average linkage, not single: on 0, 1, 2, 3, 4.2 the chain 0-1-2-3 (steps of 1) is not one cluster
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.2]])
    assert cluster_experts(points, 2, torch.full((5,), 0.2)) == [[0, 1], [2, 3, 4]]


def test_per_layer_budgets_keep_the_global_count_and_one_expert_per_layer_for_every_method():
    moes = {i: layer(experts=4, k=2, seed=i) for i in (1, 3, 5)}
    with torch.no_grad():
        for i, moe in moes.items():
            moe.router.weight.normal_(0, 0.5 * i, generator=torch.Generator().manual_seed(i))  # peaked to flat
    usage = {i: calibrated(moe, seed=i) for i, moe in moes.items()}
    for grouping in ("global", "reap"):
        for groups in (1, 1.5, 2, 2.5, 3.25, 4):
            budgets = layer_budgets(usage, groups, grouping)
            assert sum(budgets.values()) == round(groups * 3) and all(1 <= n <= 4 for n in budgets.values())
    reap = {  # layer 1's REAP scores peaked, layer 3's flat: a global count of 6 goes mostly to layer 3
        1: Usage(torch.ones(4, dtype=torch.long), torch.eye(4), torch.tensor([9.0, 0.5, 0.3, 0.2], dtype=torch.float64)),
        3: Usage(torch.ones(4, dtype=torch.long), torch.eye(4), torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)),
    }
    assert layer_budgets(reap, 3, "reap") == {1: 2, 3: 4}
    for method in ("average", "frequency", "prune", "msmoe", "hcsmoe", "reap"):
        merged, groups = merge_model(moes, usage, method, 2.5, "reap")
        assert {i: m.num_experts for i, m in merged.items()} == layer_budgets(usage, 2.5, "reap")
        assert sum(m.num_experts for m in merged.values()) == round(2.5 * 3)


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
