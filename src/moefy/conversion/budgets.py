"""Per-layer budgets: one global number of routed experts spread over layers by measured sensitivity.

Layers differ in how much they lose when experts are skipped (EvoESAP, REAP's users). The router
step measures each layer's error curve on its held-out calibration tokens: the mean squared error
of the FFN's output, which the block adds to the residual stream, when each token computes only
the k routed experts its router scores highest, for k = 0..R (the shared experts always run, so
they cancel out). The uniform top-k budget spends L * k routed experts over L layers; `allocate`
spends the same number with the least summed relative error: each curve over its value at k = 0
(the routed experts' whole output). Absolute errors follow the residual stream's growth with depth
(on SmolLM2 the error at k = 0 grows about 100-fold from layer 3 to layer 27), so they would give the
last layers every expert for their scale rather than for their sensitivity. The objective is a sum of per-layer terms,
so a dynamic program over the layers finds the exact optimum (no greedy step can be trapped by a
curve that is not convex). Layers of one shape cost the same per expert, so the FLOPs are those of
the uniform budget exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from moefy.errors import MoefyError


@torch.no_grad()
def error_curve(
    ffn, labels: torch.Tensor, num_experts: int, shared_experts: int, router: nn.Module, x: torch.Tensor, chunk_tokens: int = 256
) -> torch.Tensor:
    """Mean squared error [R + 1] (float64) of the FFN output over the tokens x [N, d] when each
    token keeps its top-k routed experts by `router`, for k = 0..R = E - S."""
    routed = num_experts - shared_experts
    size = len(labels) // num_experts
    neurons = torch.argsort(labels.long(), stable=True)[: routed * size]  # routed experts' neurons, expert-major
    w_out = ffn.w_out.weight.detach().t()[neurons].float().view(routed, size, -1)  # [R, s, d]
    sums = torch.zeros(routed + 1, dtype=torch.float64)
    for part in x.split(chunk_tokens):
        h = ffn.activations(part.to(ffn.w_in.weight.dtype)).float()
        outputs = torch.einsum("nrs,rsd->nrd", h[:, neurons].view(len(part), routed, size), w_out)  # each expert's
        rank = router(part.float(), h).argsort(dim=-1, descending=True)
        kept = outputs.gather(1, rank.unsqueeze(-1).expand_as(outputs)).cumsum(1)  # the top k's sum, k = 1..R
        total = outputs.sum(1, keepdim=True)
        sums[0] += total.double().square().sum()
        sums[1:] += (total - kept).double().square().sum((0, 2))
    return sums / max(1, len(x))


def allocate(curves: Sequence[Sequence[float]], total: int, minimum: int = 1) -> list[int]:
    """Experts per layer, summing to `total`, at least `minimum` each, that minimise the summed
    error; curves[l][k] is layer l's error with k experts (k = 0..its expert count)."""
    curves = [np.asarray(c, dtype=np.float64) for c in curves]
    most = sum(len(c) - 1 for c in curves)
    if not minimum * len(curves) <= total <= most:
        raise MoefyError(
            f"cannot spread {total} experts over {len(curves)} layers with at least {minimum} each and at most {most} in all"
        )
    best = np.full(total + 1, np.inf)
    best[0] = 0.0
    choices = []
    for curve in curves:  # best[j]: least error of the layers so far with j experts among them
        step = np.full(total + 1, np.inf)
        choice = np.zeros(total + 1, dtype=np.int64)
        for k in range(minimum, min(len(curve) - 1, total) + 1):
            candidate = best[: total + 1 - k] + curve[k]
            better = candidate < step[k:]
            step[k:][better] = candidate[better]
            choice[k:][better] = k
        best = step
        choices.append(choice)
    ks, left = [], total
    for choice in reversed(choices):
        ks.append(int(choice[left]))
        left -= ks[-1]
    return ks[::-1]


def relative(curve: Sequence[float]) -> np.ndarray:
    """An error curve over its value with no routed expert (a layer whose FFN adds nothing: zeros)."""
    curve = np.asarray(curve, dtype=np.float64)
    return curve / curve[0] if curve[0] > 0 else np.zeros_like(curve)


def spread(k: int, curves: Sequence[Sequence[float]], shapes: Sequence[object]) -> list[int]:
    """Per-layer k for the budget that gives every layer k routed experts: within each group of
    layers of one shape (equal FLOPs per expert), the group's len * k experts are allocated by
    the relative curves, at least one per layer, so the FLOPs equal the uniform budget's."""
    curves = [relative(curve) for curve in curves]
    ks = [0] * len(curves)
    for shape in dict.fromkeys(shapes):
        members = [i for i, other in enumerate(shapes) if other == shape]
        for i, layer_k in zip(members, allocate([curves[i] for i in members], k * len(members))):
            ks[i] = layer_k
    return ks
