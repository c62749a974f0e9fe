"""Neuron co-activation counts, accumulated as a streaming matrix product.

C[i, j] counts the tokens on which neurons i and j are both positive; C[i, i] counts the tokens
on which i fires. Each batch adds B^T B for its binarised activations B [tokens, d_ff], so memory
is one d_ff x d_ff matrix plus one batch (never a tokens x d_ff x d_ff tensor). Counts are float32:
exact while every entry stays below 2^24 tokens.
"""

from __future__ import annotations

import torch

EXACT_LIMIT = 2**24


class CoactivationCounter:
    def __init__(self, d_ff: int, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(d_ff, d_ff, dtype=torch.float32, device=device)
        self.tokens = 0

    def update(self, h: torch.Tensor) -> None:
        """Add the activations of some tokens, h [tokens, d_ff]."""
        if self.tokens + h.shape[0] > EXACT_LIMIT:
            raise ValueError(f"co-activation counts are exact up to {EXACT_LIMIT} tokens; lower activations.max_tokens")
        fired = (h > 0).to(self.counts.dtype)
        self.counts.addmm_(fired.t(), fired)
        self.tokens += h.shape[0]

    def sparsity(self) -> float:
        """Share of zero (non-firing) activations among the counted tokens."""
        if self.tokens == 0:
            return 0.0
        return 1.0 - float(self.counts.diagonal().sum()) / (self.tokens * self.counts.shape[0])
