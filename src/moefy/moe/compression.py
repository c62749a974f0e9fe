"""MC-SMoE's compression: each expert weight as a low-rank product plus a sparse remainder.

W [a, b] = U V + S, with U [a, r], V [r, b] from the truncated SVD (the best rank-r approximation
in Frobenius norm) and S the remainder W - U V with only its largest-magnitude share kept. A stack
of expert weights [E, a, b] is factored expert by expert. The factors are parameters, so a
distillation run trains them (S keeps its sparsity pattern: only its kept entries are stored).
On disk a layer then costs r (a + b) values per expert plus a value and an int32 index per kept
entry of S, instead of a b.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moefy.errors import MoefyError


def rank_for(a: int, b: int, rank_fraction: float) -> int:
    """The rank kept for an [a, b] matrix: rank_fraction of min(a, b), at least 1."""
    if not 0 < rank_fraction <= 1:
        raise MoefyError(f"rank fraction must be in (0, 1], got {rank_fraction}")
    return max(1, round(rank_fraction * min(a, b)))


class LowRankSparse(nn.Module):
    """A stack of E matrices [E, a, b] stored as u [E, a, r] @ v [E, r, b] + a sparse S (values at
    flat indices into [E, a, b]); forward() rebuilds the dense stack."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, values: torch.Tensor, indices: torch.Tensor):
        super().__init__()
        if u.dim() != 3 or v.dim() != 3 or u.shape[0] != v.shape[0] or u.shape[2] != v.shape[1]:
            raise MoefyError(f"low-rank factors must be [E, a, r] and [E, r, b], got {list(u.shape)} and {list(v.shape)}")
        if values.shape != indices.shape:
            raise MoefyError("the sparse remainder needs one index per value")
        self.u, self.v = nn.Parameter(u.contiguous()), nn.Parameter(v.contiguous())
        self.values = nn.Parameter(values.contiguous())
        self.register_buffer("indices", indices.to(torch.int32).contiguous())

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.u.shape[0], self.u.shape[1], self.v.shape[2]

    @property
    def rank(self) -> int:
        return self.u.shape[2]

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rank: int, sparse_fraction: float) -> LowRankSparse:
        """The rank-`rank` truncated SVD of each matrix, plus the `sparse_fraction` of the remainder's
        entries with the largest magnitude (over the whole stack)."""
        if weight.dim() != 3:
            raise MoefyError(f"compress a stack of matrices [E, a, b]; got shape {list(weight.shape)}")
        if not 0 <= sparse_fraction <= 1:
            raise MoefyError(f"the sparse share must be in [0, 1], got {sparse_fraction}")
        experts, a, b = weight.shape
        if not 1 <= rank <= min(a, b):
            raise MoefyError(f"rank must be in 1-{min(a, b)} for [{a}, {b}] matrices, got {rank}")
        w = weight.detach().float()
        left, sigma, right = torch.linalg.svd(w, full_matrices=False)  # batched over experts
        root = sigma[:, :rank].sqrt()
        u = left[:, :, :rank] * root.unsqueeze(1)
        v = root.unsqueeze(2) * right[:, :rank, :]
        remainder = (w - u @ v).reshape(-1)
        kept = math.floor(sparse_fraction * remainder.numel())
        indices = remainder.abs().topk(kept).indices.sort().values if kept else remainder.new_zeros(0, dtype=torch.long)
        dtype = weight.dtype
        return cls(u.to(dtype), v.to(dtype), remainder[indices].to(dtype), indices)

    def forward(self) -> torch.Tensor:
        dense = torch.bmm(self.u, self.v)
        if self.values.numel() == 0:
            return dense
        return dense.reshape(-1).index_add(0, self.indices.long(), self.values).view(dense.shape)

    def stored_values(self) -> int:
        """Numbers stored (low-rank factors and kept remainder), indices aside."""
        return self.u.numel() + self.v.numel() + self.values.numel()

    def flops_per_row(self) -> float:
        """Multiply-adds x 2 per input row and expert when applied as x U V + x S (the factored
        kernel; moefy's forward rebuilds the dense weight instead)."""
        experts, a, b = self.shape
        return 2.0 * (self.rank * (a + b) + self.values.numel() / experts)


def compress_experts(moe, rank_fraction: float, sparse_fraction: float) -> dict[str, float]:
    """Factor every expert weight of a SparseMoE (w_in, w_gate, w_out) in place; returns each
    weight's relative reconstruction error ||W - (UV + S)|| / ||W||."""
    errors = {}
    for name in ("w_in", "w_gate", "w_out"):
        weight = moe.weight(name)
        if weight is None or name in moe.factored:
            continue
        _, a, b = weight.shape
        factors = LowRankSparse.from_weight(weight, rank_for(a, b, rank_fraction), sparse_fraction)
        with torch.no_grad():
            errors[name] = float((factors() - weight).norm() / weight.norm().clamp(min=1e-12))
        moe.compress(name, factors)
    return errors
