"""Neuron co-activation counts, accumulated as a streaming matrix product.

C[i, j] counts the tokens on which neurons i and j both fire; C[i, i] counts the tokens on which
i fires. `update` takes the boolean firing mask of FFN.fired (which also defines firing for gated and
never-zero activations), or ReLU activations, which fire where h > 0. Each batch adds B^T B for its binarised activations B [tokens, d_ff], so memory
is the d_ff x d_ff accumulator plus one batch's product (never a tokens x d_ff x d_ff tensor).

B is 0/1, so the product is done in int8 with int32 accumulation where torch supports it
(torch._int_mm): exact, and about 8x the throughput of a float32 matmul on a CPU with VNNI.
Elsewhere it falls back to float32 addmm, exact while a count stays below 2^24. The counts come
back as float32, exact up to 2^24 tokens, which is the limit enforced here.
"""

from __future__ import annotations

import functools

import torch

EXACT_LIMIT = 2**24


@functools.cache
def _int8_matmul_works(device_type: str) -> bool:
    try:
        probe = torch.ones(32, 32, dtype=torch.int8, device=device_type)
        return bool((torch._int_mm(probe, probe) == 32).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _fired(h: torch.Tensor) -> torch.Tensor:
    return h if h.dtype == torch.bool else h > 0


class CoactivationCounter:
    def __init__(self, d_ff: int, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self._int8 = _int8_matmul_works(device.type)
        self._acc = torch.zeros(d_ff, d_ff, dtype=torch.int32 if self._int8 else torch.float32, device=device)
        self.tokens = 0

    @property
    def counts(self) -> torch.Tensor:
        """The counts as float32 [d_ff, d_ff]; a distributed step all-reduces this tensor."""
        if self._acc.dtype != torch.float32:
            self._acc = self._acc.float()
        return self._acc

    def update(self, h: torch.Tensor) -> None:
        """Add some tokens' firing mask (bool) or ReLU activations, h [tokens, d_ff]."""
        if self.tokens + h.shape[0] > EXACT_LIMIT:
            raise ValueError(f"co-activation counts are exact up to {EXACT_LIMIT} tokens; lower activations.max_tokens")
        self.tokens += h.shape[0]
        if self._acc.dtype == torch.int32:
            fired = _fired(h).to(torch.int8)
            rows = fired.shape[0]
            if rows % 8:  # _int_mm wants the inner dimension in multiples of 8; zero rows count nothing
                fired = torch.cat([fired, fired.new_zeros(8 - rows % 8, fired.shape[1])])
            try:
                self._acc += torch._int_mm(fired.t().contiguous(), fired)
                return
            except RuntimeError:  # a shape this device's int8 kernel refuses: count in float32 from now on
                self._acc = self._acc.float()
        fired = _fired(h).to(torch.float32)
        self._acc.addmm_(fired.t(), fired)

    def sparsity(self) -> float:
        """Share of zero (non-firing) activations among the counted tokens."""
        if self.tokens == 0:
            return 0.0
        return 1.0 - float(self._acc.diagonal().sum()) / (self.tokens * self._acc.shape[0])
