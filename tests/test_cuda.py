"""The GPU paths: every MoE kernel, the kernel calibration and the trainable MoE layer on CUDA give
what they give on the CPU. Skipped where torch sees no GPU (CI has none); run on a GPU machine with
`python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moefy.adapters.ffn import FFN
from moefy.conversion.routers import GroundTruthRouter, MLPRouter
from moefy.moe import layer as moe_module
from moefy.moe.kernel_choice import measure
from moefy.moe.layer import MoEFFN, kernel_calls
from moefy.moe.sparse import Routing, from_split

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would round the GPU's matmuls to 10 mantissa bits: compare float32 with float32."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def ffn(d: int = 64, d_ff: int = 256, gated: bool = False) -> FFN:
    torch.manual_seed(0)
    return FFN(
        0,
        nn.Linear(d, d_ff),
        nn.SiLU() if gated else nn.ReLU(),
        nn.Linear(d_ff, d),
        lambda m: None,
        nn.Linear(d, d_ff) if gated else None,
    )


def masked_dense(dense: FFN, x: torch.Tensor, picked: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return dense.w_out(dense.activations(x) * picked.float()[:, labels])


@pytest.mark.parametrize(
    "kernel", ["bags", "looped", "looped, popular experts for every token", "looped in blocks", "grouped", "masked", "auto"]
)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("oracle", [False, True])
def test_every_kernel_on_cuda_computes_exactly_the_picked_experts(kernel, gated, oracle, monkeypatch):
    if kernel == "looped, popular experts for every token":
        monkeypatch.setattr(moe_module, "LOOPED_DENSE_SHARE", 0.3)
        kernel = "looped"
    if kernel == "looped in blocks":  # 600 tokens in blocks of 256, the last one shorter
        monkeypatch.setattr(moe_module, "LOOPED_BLOCK_TOKENS", 256)
        kernel = "looped"
    dense = ffn(gated=gated)
    labels = torch.randperm(256, generator=torch.Generator().manual_seed(1)) % 8
    router = GroundTruthRouter(labels, 8) if oracle else MLPRouter(64, 8)
    layer = MoEFFN(dense, labels, router, 8).to(CUDA)
    for linear in (dense.w_in, dense.w_gate, dense.w_out):
        if linear is not None:
            linear.to(CUDA)
    with torch.no_grad():
        for tokens in (1, 37, 600):
            x = torch.randn(tokens, 64, device=CUDA)
            picked = torch.rand(tokens, 8, device=CUDA) < 0.4
            h = layer.dense_activations(x) if oracle else None
            got = layer.experts_forward(x, picked, kernel=kernel, h=h)
            assert got.is_cuda
            torch.testing.assert_close(got, masked_dense(dense, x, picked, labels.to(CUDA)), rtol=1e-4, atol=1e-4)


def test_the_layer_on_cuda_defaults_to_grouped_mm_for_many_tokens_and_matches_the_cpu():
    cpu_layer = MoEFFN(ffn(), torch.arange(256) % 8, MLPRouter(64, 8), 8)
    layer = MoEFFN(ffn(), torch.arange(256) % 8, MLPRouter(64, 8), 8).to(CUDA)
    layer.router.load_state_dict(cpu_layer.router.state_dict())
    cpu_layer.k = layer.k = 3
    x = torch.randn(500, 64)
    with torch.no_grad():
        kernel_calls([layer])
        got = layer(x.to(CUDA))
        assert kernel_calls([layer]) == {"grouped": 1}
        torch.testing.assert_close(got.cpu(), cpu_layer(x), rtol=1e-4, atol=1e-4)


def test_calibration_on_cuda_times_every_kernel_and_fills_every_cell():
    table = measure(ffn(), 8, CUDA, repeats=1)
    assert len(table.winners) == len(table.tokens) and set(table.milliseconds) == {"bags", "looped", "grouped", "masked"}
    for row, winners in enumerate(table.winners):
        for column, winner in enumerate(winners):
            timed = {k: ms[row][column] for k, ms in table.milliseconds.items() if ms[row][column] is not None}
            assert winner == min(timed, key=timed.get)


@pytest.mark.parametrize("gated", [False, True])
def test_the_trainable_moe_trains_on_cuda_as_on_the_cpu(gated):
    """grouped_mm forward and backward on the GPU: the same outputs and gradients as the CPU's."""
    dense = ffn(gated=gated)
    labels = torch.randperm(256, generator=torch.Generator().manual_seed(1)) % 8
    torch.manual_seed(2)
    router = MLPRouter(64, 8)
    cpu = from_split(dense, labels, 8, router, k=3)
    gpu = from_split(dense, labels, 8, copy.deepcopy(router), k=3).to(CUDA)
    gpu.routing = cpu.routing = Routing("top_k", k=3)
    x = torch.randn(300, 64)
    for layer, inputs in ((cpu, x), (gpu, x.to(CUDA))):
        layer(inputs).square().mean().backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        if p_cpu.grad is not None:
            torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-5, msg=name)
