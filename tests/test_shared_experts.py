"""Shared experts: always-on neurons beside the routed experts (moefy.conversion.shared), in the
inference layer (MoEFFN), the trainable one (SparseMoE) and the routers."""

import numpy as np
import pytest
import torch
from torch import nn

from builders import build_tiny, synthetic_ffn
from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import load_model
from moefy.conversion.routers import (
    GroundTruthRouter,
    MLPRouter,
    RouterSettings,
    budget_to_k,
    build_routers,
    expert_mass,
    fit_router,
    representative_router,
    router_tensors,
    topk_recall,
)
from moefy.conversion.shared import check_shared, neuron_mass, routed_neurons, shared_neurons, with_shared
from moefy.errors import MoefyError
from moefy.moe.layer import KERNELS, MoEFFN, moefy_model, set_experts_per_token
from moefy.moe.sparse import from_split
from moefy.training.moe_training import write_back

E, S = 8, 2


def shared_labels(d_ff: int, fire_counts: torch.Tensor, seed: int = 0) -> np.ndarray:
    shared = shared_neurons(fire_counts, S, E)
    rng = np.random.default_rng(seed)
    routed = rng.permutation(d_ff - len(shared)) % (E - S)
    return with_shared(routed, shared, d_ff, E, S)


def test_the_most_firing_neurons_are_shared_and_every_neuron_is_in_exactly_one_expert():
    d_ff = 64
    counts = torch.arange(d_ff).flip(0).float()  # neuron 0 fires most
    counts[40] = 1000  # and 40 more than any
    shared = shared_neurons(counts, S, E)
    assert shared.tolist() == sorted([40] + list(range(15))), "the 2 * 8 most firing neurons"
    labels = with_shared(np.arange(d_ff - 16) % (E - S), shared, d_ff, E, S)
    assert (labels[shared] >= E - S).all() and (labels[routed_neurons(shared, d_ff)] < E - S).all()
    assert np.bincount(labels).tolist() == [8] * E, "every expert, shared or routed, has d_ff / E neurons"
    ffn = synthetic_ffn(16, d_ff, gated=True, bias=False, act=nn.SiLU())
    layer = MoEFFN(ffn, torch.from_numpy(labels), GroundTruthRouter(torch.from_numpy(labels), E, E - S), E, shared_experts=S)
    routed = set(layer.routed_neurons.tolist())
    assert routed.isdisjoint(shared.tolist()) and len(routed) + len(shared) == d_ff
    assert layer.num_experts == E - S and layer.shared_w_in.shape == (16, 16)


def test_shared_experts_are_refused_where_nothing_would_be_routed():
    with pytest.raises(MoefyError, match="at least one expert must be routed"):
        check_shared(E, E)
    with pytest.raises(MoefyError, match="no more than the 2 shared ones"):
        budget_to_k(0.25, E, S)  # 2 of 8 active: the shared ones only
    assert budget_to_k(0.5, E, S) == 2 and budget_to_k(1.0, E, S) == E - S


@pytest.mark.parametrize("gated,bias,act", [(True, False, nn.SiLU()), (False, True, nn.ReLU()), (False, False, nn.GELU())])
def test_shared_block_and_routed_experts_at_full_budget_equal_the_dense_ffn(gated, bias, act):
    ffn = synthetic_ffn(16, 64, gated=gated, bias=bias, act=act)
    x = torch.randn(40, 16)
    with torch.no_grad():
        labels = torch.from_numpy(shared_labels(64, ffn.activations(x).abs().sum(0)))
        dense = ffn.w_out(ffn.activations(x))
        layer = MoEFFN(ffn, labels, MLPRouter(16, E - S), E, shared_experts=S)
        torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)  # the dense path
        everyone = torch.ones(40, E - S, dtype=torch.bool)
        for kernel in KERNELS:
            if kernel == "grouped" and not torch.cuda.is_available():
                continue  # grouped_mm runs on CPU too, but its kernel is the GPU's choice; looped covers the CPU
            out = layer.experts_forward(x, everyone, kernel=kernel) + layer.shared_output(x)
            torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5, msg=kernel)


def test_at_a_budget_the_layer_adds_the_shared_block_to_the_oracles_top_k_routed_experts():
    ffn = synthetic_ffn(16, 64, gated=True, bias=True, act=nn.SiLU())
    x = torch.randn(30, 16)
    with torch.no_grad():
        labels = torch.from_numpy(shared_labels(64, ffn.activations(x).abs().sum(0)))
        layer = MoEFFN(ffn, labels, GroundTruthRouter(labels, E, E - S), E, shared_experts=S)
        set_experts_per_token([layer], 2)
        h = ffn.activations(x)
        mass = expert_mass(h, labels, E)[:, : E - S]
        keep = torch.zeros_like(h, dtype=torch.bool)
        top = mass.topk(2, dim=-1).indices
        for t in range(len(x)):
            keep[t] = (labels >= E - S) | torch.isin(labels, top[t])
        expected = ffn.w_out(h * keep)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    per_expert = layer.expert_flops_per_token
    assert layer.dense_flops_per_token == 2 * 64 * 3 * 16 == E * per_expert
    assert layer.flops_per_token(2, router_runs=False) == (2 + S) * per_expert, "the shared experts always count"


def test_a_tiny_decoder_with_shared_experts_at_full_budget_gives_the_dense_logits(tmp_path):
    folder = build_tiny("llama", tmp_path / "llama")
    model = load_model(str(folder), "causal_lm").eval()
    ids = torch.randint(5, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        labels, routers = {}, {}
        for ffn in find_ffns(model):
            labels[ffn.index] = torch.from_numpy(shared_labels(ffn.d_ff, torch.rand(ffn.d_ff), seed=ffn.index))
            routers[ffn.index] = MLPRouter(ffn.d_model, E - S)
        layers = moefy_model(model, labels, routers, E, shared_experts=S)
        set_experts_per_token(layers, E - S)
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)
        set_experts_per_token(layers, 1)
        assert not torch.allclose(model(input_ids=ids).logits, dense, atol=1e-3), "one routed expert of six changes them"


@pytest.mark.parametrize("kind", ["groundtruth", "similarity", "mlp", "norm", "representative"])
def test_every_router_scores_the_routed_experts_only_and_round_trips(kind):
    ffn = synthetic_ffn(16, 64, gated=True, bias=False, act=nn.SiLU())
    x = torch.randn(300, 16)
    with torch.no_grad():
        labels = torch.from_numpy(shared_labels(64, ffn.activations(x).abs().sum(0)))
    settings = RouterSettings(mlp_epochs=2, representatives=2)
    router, stats = fit_router(kind, ffn, labels, x, E, settings, [0.5, 1.0], seed=0, shared_experts=S)
    assert router(x, ffn.activations(x)).shape == (300, E - S)
    assert set(stats) >= {"recall@0.5", "recall@1"} and stats["recall@1"] == pytest.approx(1.0)
    rebuilt = build_routers(kind, router_tensors({0: router}), {0: labels}, E, S)[0]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, ffn.activations(x)), router(x, ffn.activations(x)))


def test_the_representative_router_over_routed_experts_ranks_them_as_the_oracle_on_a_planted_case():
    """Each routed expert has one loud neuron: its |h| decides the expert's mass."""
    torch.manual_seed(0)
    d, d_ff = 16, 64
    w_in, w_out = nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False)
    labels = torch.from_numpy(shared_labels(d_ff, torch.rand(d_ff)))
    with torch.no_grad():
        loudness = torch.ones(d_ff)
        for e in range(E - S):
            loudness[(labels == e).nonzero()[0]] = 32.0
        w_in.weight.mul_(loudness[:, None] / 32)
    from moefy.adapters.ffn import FFN

    ffn = FFN(0, w_in, nn.ReLU(), w_out, lambda m: None)
    x = torch.randn(4000, d, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        router = representative_router(ffn, labels, E, ffn.activations(x[:3000]), per_expert=1, routed=E - S)
        oracle = expert_mass(ffn.activations(x[3000:]), labels, E)[:, : E - S]
        scores = router(x[3000:])
    assert scores.shape == (1000, E - S)
    assert topk_recall(scores, oracle, 2) > 0.97


def test_recovery_trains_the_shared_experts_and_writes_them_back():
    ffn = synthetic_ffn(16, 64, gated=True, bias=True, act=nn.SiLU())
    x = torch.randn(50, 16)
    with torch.no_grad():
        labels = torch.from_numpy(shared_labels(64, ffn.activations(x).abs().sum(0)))
        dense = ffn.w_out(ffn.activations(x))
    router = GroundTruthRouter(labels, E, E - S)
    with pytest.raises(MoefyError, match="oracle"):
        from_split(ffn, labels, E, router, k=E - S, shared_experts=S)
    moe = from_split(ffn, labels, E, MLPRouter(16, E - S), k=E - S, shared_experts=S)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense, rtol=1e-5, atol=1e-5)  # every routed expert + shared
        assert moe.flops_per_token(measured=False) == pytest.approx(ffn.flops_per_token + 2 * 16 * (E - S))
        moe.shared.w_out.mul_(2.0)  # as if recovery had trained the shared block
        expected = moe(x)
    write_back(ffn, moe, labels)
    with torch.no_grad():
        torch.testing.assert_close(ffn.w_out(ffn.activations(x)), expected, rtol=1e-5, atol=1e-5)


def test_shared_by_mass_takes_a_rare_massive_activation_that_firing_misses():
    """Neuron 5 is on for one token in 20, a thousand times louder than the rest: firing ranks it
    last-but-not-shared, mass ranks it first."""
    ffn = synthetic_ffn(16, 64, gated=False, bias=False, act=nn.ReLU())
    x = torch.randn(400, 16)
    with torch.no_grad():
        ffn.w_in.weight[5] = 0.0
        ffn.w_in.weight[5, 0] = 1.0
        x[:, 0] = -1.0
        x[::20, 0] = 1000.0  # neuron 5 fires on 20 tokens, hugely
        h = ffn.activations(x)
    firing = (h != 0).sum(0)
    mass = neuron_mass(ffn, x, chunk_tokens=64)
    torch.testing.assert_close(mass, h.abs().double().sum(0))
    assert 5 in shared_neurons(mass, S, E) and 5 not in shared_neurons(firing, S, E)


@pytest.mark.parametrize("shared_by", ["firing", "mass"])
def test_the_split_step_sets_the_shared_neurons_aside_by_either_rule(shared_by):
    from argparse import Namespace

    from moefy.steps.split import split_layer

    ffn = synthetic_ffn(16, 64, gated=True, bias=False, act=nn.SiLU())
    x = torch.randn(300, 16)
    with torch.no_grad():
        h = ffn.activations(x)
    fired = ffn.fired(h, 0.1).float()
    coactivation = {"layer.0": fired.t() @ fired}
    args = Namespace(num_experts=E, shared_experts=S, shared_by=shared_by, split="random", seed=0)
    labels = split_layer(args, ffn, coactivation, {"layer.0": x}, 300, torch.device("cpu"))
    scores = fired.sum(0) if shared_by == "firing" else h.abs().sum(0)
    assert set(np.flatnonzero(labels >= E - S)) == set(shared_neurons(scores, S, E).tolist())
    assert np.bincount(labels).tolist() == [8] * E


def test_a_labels_file_split_with_other_shared_experts_is_refused_by_its_readers(tmp_path):
    from moefy.conversion.shared import check_labels_shared, labels_metadata
    from moefy.files import save_tensors
    from moefy.moe.checkpoints import read_moe_parts

    labels = tmp_path / "labels.safetensors"
    save_tensors(labels, {"layer.0": torch.from_numpy(shared_labels(64, torch.rand(64)))}, labels_metadata("kmeans", E, S))
    check_labels_shared(labels, S)
    with pytest.raises(MoefyError, match=r"labels.safetensors has 2 shared experts, not 0; rerun its split job"):
        check_labels_shared(labels, 0)
    with pytest.raises(MoefyError, match="has 2 shared experts, not 3"):
        read_moe_parts(labels, tmp_path / "router.safetensors", "mlp", E, 3)


def test_shared_experts_without_the_sample_they_are_chosen_from_are_refused(tiny_bert, tmp_path):
    from moefy.steps import split

    flags = [
        "--model",
        str(tiny_bert),
        "--split",
        "random",
        "--num-experts",
        "4",
        "--shared-experts",
        "1",
        "--out",
        str(tmp_path),
    ]
    with pytest.raises(MoefyError, match="shared experts by mass need --hidden"):
        split.main([*flags, "--shared-by", "mass"])
    with pytest.raises(MoefyError, match="shared experts by firing need --coactivation"):
        split.main([*flags, "--shared-by", "firing"])
    assert not any(tmp_path.iterdir()), "nothing written"


def test_per_layer_budgets_from_a_router_file_without_curves_are_refused(tmp_path):
    from moefy.files import save_tensors
    from moefy.moe.checkpoints import read_error_curves

    path = tmp_path / "router.safetensors"
    save_tensors(path, {"layer.0.scale": torch.ones(3)})
    with pytest.raises(MoefyError, match="has no error curves for per-layer budgets; rerun its router job"):
        read_error_curves(path)
