"""The MoE FFN that replaces a dense one, and what it costs in FLOPs.

This is the reference implementation: it computes every neuron, then zeroes the neurons of
the experts the router did not pick. Its output is exactly what an MoE that computes only the
picked experts would give, so accuracy is measured exactly; compute is accounted analytically
(`ffn_flops_fraction`).
"""

from __future__ import annotations

import torch
from torch import nn

from moefy.ffn import FFN, find_ffns


class MoEFFN(nn.Module):
    def __init__(self, ffn: FFN, labels: torch.Tensor, router: nn.Module, num_experts: int):
        super().__init__()
        self.w_in, self.act, self.w_out, self.w_gate = ffn.w_in, ffn.act, ffn.w_out, ffn.w_gate
        self.register_buffer("labels", labels.long().to(ffn.w_in.weight.device), persistent=False)
        self.router = router
        self.num_experts = num_experts
        self.k = num_experts
        self.experts_per_token: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.w_in(x)) if self.w_gate is None else self.act(self.w_gate(x)) * self.w_in(x)
        if self.k >= self.num_experts:
            self.experts_per_token = None
            return self.w_out(h)
        scores = self.router(x, h)
        chosen = scores.topk(self.k, dim=-1).indices
        expert_on = torch.zeros_like(scores, dtype=h.dtype).scatter_(-1, chosen, 1.0)
        self.experts_per_token = expert_on.sum(-1)
        return self.w_out(h * expert_on[..., self.labels])


def moefy_model(model: nn.Module, labels: dict[int, torch.Tensor], routers: dict[int, nn.Module], num_experts: int) -> list[MoEFFN]:
    """Swap every FFN of `model` for an MoEFFN; returns them in layer order (to set k)."""
    layers = []
    for ffn in find_ffns(model):
        router = routers[ffn.index].to(ffn.w_in.weight.device)
        moe = MoEFFN(ffn, labels[ffn.index], router, num_experts)
        ffn.replace(moe)
        layers.append(moe)
    return layers


def set_experts_per_token(layers: list[MoEFFN], k: int) -> None:
    for layer in layers:
        layer.k = k


def ffn_flops_fraction(d_model: int, d_ff: int, num_experts: int, k: int, router_flops: int) -> float:
    """FFN multiply-add FLOPs per token with k of E experts plus the router, over the dense FFN's.

    With every expert chosen the router is not needed (MoEFFN skips it), so it costs nothing.
    """
    dense = 4 * d_model * d_ff
    expert = 4 * d_model * (d_ff // num_experts)
    return (k * expert + (router_flops if k < num_experts else 0)) / dense
