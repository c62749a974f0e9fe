"""Softmax gates on a linear router (moefy.conversion.routers.SoftmaxGate): they start at 1, so the
gated MoE starts as the unweighted one; the trainable layer (SparseMoE) and the inference layer
(MoEFFN, every kernel) compute the same gated sum; and only a linear router can carry them."""

import pytest
import torch
from torch import nn

from builders import synthetic_ffn
from moefy.conversion.routers import LinearRouter, MLPRouter, SoftmaxGate, build_routers, gates_of, router_tensors
from moefy.errors import MoefyError
from moefy.moe.layer import KERNELS, MoEFFN
from moefy.moe.sparse import from_split

D, D_FF, E = 16, 64, 8


def conversion(shared: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    ffn = synthetic_ffn(D, D_FF, gated=True, bias=False, act=nn.SiLU())
    labels = torch.randperm(D_FF) % E
    router = LinearRouter(D, E - shared)
    return ffn, labels, router


def test_gates_are_one_at_scale_zero_and_e_times_the_softmax_of_the_picks_otherwise():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]])
    picked = torch.tensor([[True, False, False, True]])
    assert torch.equal(SoftmaxGate(0.0)(logits, picked), picked.float()), "scale 0: every pick weighs 1"
    gates = SoftmaxGate(0.5)(logits, picked)
    probs = torch.exp(0.5 * logits) / torch.exp(0.5 * logits).sum()
    torch.testing.assert_close(gates, 4 * probs * picked, rtol=0, atol=1e-6)  # over all 4 experts, not renormalised


@pytest.mark.parametrize("shared", [0, 2])
def test_the_gated_layer_starts_near_the_unweighted_one_and_trains_its_router(shared):
    ffn, labels, router = conversion(shared)
    x = torch.randn(40, D)
    k = 3
    unweighted = from_split(ffn, labels, E, router, k, shared)
    gated = from_split(ffn, labels, E, router, k, shared, softmax_gates=True)
    assert float(gated.gate.scale) == pytest.approx(SoftmaxGate.MIN_SCALE)
    with torch.no_grad():
        logits = router(x)
        spread = float((logits.amax(-1) - logits.amin(-1)).max())
    picks = gated.gate.pick(logits, k).sort(-1).values
    assert torch.equal(picks, logits.topk(k).indices.sort(-1).values), "above 0 the softmax's top k are the logits'"
    # every gate within exp(MIN_SCALE * spread) of 1
    bound = float(torch.tensor(SoftmaxGate.MIN_SCALE * spread).exp()) - 1
    torch.testing.assert_close(gated(x), unweighted(x), rtol=0, atol=bound * float(unweighted(x).abs().max()) * k)
    gated(x).square().sum().backward()
    assert gated.gate.scale.grad is not None and gated.gate.scale.grad.abs() > 0, "the gate scale learns from the output"
    with torch.no_grad():
        gated.gate.scale.fill_(0.7)
    gated.zero_grad()
    gated(x).square().sum().backward()
    assert gated.router.router.proj.weight.grad.abs().sum() > 0, "once the gates differ, the router's weights learn too"
    assert unweighted.gate is None


def test_an_optimizer_step_never_leaves_the_scale_below_its_floor():
    gate = SoftmaxGate()
    optimizer = torch.optim.SGD(gate.parameters(), lr=1.0)
    optimizer.register_step_post_hook(lambda *_: gate.keep_scale_above_floor())
    gate(torch.tensor([[3.0, -3.0]]), torch.tensor([[True, False]])).sum().backward()  # pushes the scale down
    optimizer.step()
    assert float(gate.scale) == pytest.approx(SoftmaxGate.MIN_SCALE)


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_inference_kernel_computes_the_trained_layer_s_gated_sum(kernel, shared):
    ffn, labels, router = conversion(shared, seed=1)
    x = torch.randn(48, D)
    k = 2
    trained = from_split(ffn, labels, E, router, k, shared, softmax_gates=True)
    with torch.no_grad():
        trained.gate.scale.fill_(1.3)
        expected = trained(x)
    layer = MoEFFN(ffn, labels, router, E, shared_experts=shared, gate=trained.gate)
    layer.k = k
    forward = layer.experts_forward
    layer.experts_forward = lambda x_, picked, h=None: forward(x_, picked, kernel=kernel, h=h)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.equal(layer.experts_per_token, torch.full((48,), float(k))), "a gate is not an extra expert"


def test_a_gated_layer_weighs_its_picks_even_with_every_expert():
    ffn, labels, router = conversion()
    gate = SoftmaxGate(2.0)
    layer = MoEFFN(ffn, labels, router, E, gate=gate)
    layer.k = E
    assert not layer.runs_dense
    x = torch.randn(10, D)
    with torch.no_grad():
        assert not torch.allclose(layer(x), layer.dense(x), atol=1e-4), "E * softmax gates are not all 1"


def test_softmax_gates_need_a_linear_router():
    ffn, labels, _ = conversion()
    with pytest.raises(MoefyError, match="softmax gates weigh the experts by a linear router's logits, not a MLPRouter's"):
        from_split(ffn, labels, E, MLPRouter(D, E), 2, softmax_gates=True)


def test_gates_round_trip_through_the_router_file_and_unweighted_files_have_none():
    _, labels, router = conversion()
    tensors = router_tensors({0: router}, {0: SoftmaxGate(0.25)})
    rebuilt = build_routers("linear", tensors, {0: labels}, E)[0]
    assert torch.equal(rebuilt.proj.weight, router.proj.weight)
    assert float(gates_of(tensors)[0].scale) == 0.25
    assert gates_of(router_tensors({0: router})) == {}
