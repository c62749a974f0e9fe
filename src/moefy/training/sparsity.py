"""Activation-sparsity penalties for fine-tuning (D2DMoE): fewer active neurons per token means
fewer experts worth running per token.

Both are per token over one FFN's neurons, averaged over real tokens and layers, and normalised
by d_ff so that one weight means the same on any model size:
  l1     mean |a|                                  (pushes activations to zero)
  hoyer  (sum |a|)^2 / (sum a^2) / d_ff, in [1/d_ff, 1]: the share of "effectively active"
         neurons; scale-invariant, so it sparsifies without just shrinking activations.
"""

from __future__ import annotations

import torch

from moefy.config import PENALTIES


def token_penalty(h: torch.Tensor, kind: str) -> torch.Tensor:
    """Penalty of each token's activations h [..., d_ff] -> [...]."""
    h = h.float()
    if kind == "l1":
        return h.abs().mean(-1)
    if kind == "hoyer":
        l1, l2sq = h.abs().sum(-1), h.square().sum(-1)
        return l1.square() / l2sq.clamp(min=1e-12) / h.shape[-1]
    raise ValueError(f"unknown sparsity penalty {kind!r}; choose one of {', '.join(p for p in PENALTIES if p != 'none')}")


def layers_penalty(activations: list[torch.Tensor], mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over layers and real tokens (mask [batch, seq] bool) of the per-token penalty."""
    per_layer = [token_penalty(h, kind)[mask].mean() for h in activations]
    return torch.stack(per_layer).mean()


def ramped_weight(weight: float, step: int, total_steps: int, ramp: float) -> float:
    """The penalty weight at `step`: rising linearly from 0 over the first `ramp` share of training."""
    ramp_steps = ramp * total_steps
    if ramp_steps <= 0:
        return weight
    return weight * min(1.0, step / ramp_steps)
