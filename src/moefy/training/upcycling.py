"""Sparse Upcycling: an MoE built from a dense checkpoint, every expert a copy of its FFN.

Komatsuzaki et al. (ICLR 2023) upcycle every other FFN starting with the second, give each a new
router N(0, 0.02) and continue training with the dense model's schedule; Drop-Upcycling (ICLR 2025)
redraws a share r of every expert's neurons (r = 0.5 was best) so that the copies diverge.
"""

from __future__ import annotations

import torch
from torch import nn

from moefy.adapters.ffn import FFN, find_ffns
from moefy.errors import MoefyError
from moefy.moe.sparse import Routing, SparseMoE

LAYER_CHOICES = ("every_other", "all")


def new_router(d_model: int, num_experts: int, std: float = 0.02, generator: torch.Generator | None = None) -> nn.Linear:
    """Sparse Upcycling's router: a bias-free Linear(d, E), weights N(0, std)."""
    router = nn.Linear(d_model, num_experts, bias=False)
    with torch.no_grad():
        router.weight.normal_(0.0, std, generator=generator)
    return router


def _redrawn(weight: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """`count` fresh rows drawn from N(mean, std) of `weight`'s entries (Drop-Upcycling)."""
    fresh = torch.empty(count, weight.shape[1], dtype=torch.float32)
    fresh.normal_(generator=generator)
    return (fresh * weight.float().std() + weight.float().mean()).to(weight.dtype)


def upcycle(
    ffn: FFN,
    num_experts: int,
    routing: Routing,
    drop_ratio: float = 0.0,
    router_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> SparseMoE:
    """Sparse Upcycling: every expert a copy of the FFN, a new router N(0, router_std).

    Drop-Upcycling (drop_ratio r > 0): in each expert, a random share r of the neurons is redrawn
    from the statistics of the FFN's weights (their input and gate rows, output columns; their
    input biases set to 0), so that the experts start apart and specialise.
    """
    if not 0 <= drop_ratio <= 1:
        raise MoefyError(f"drop_ratio must be in [0, 1], got {drop_ratio}")
    E, d_ff = num_experts, ffn.d_ff
    w_in = ffn.w_in.weight.detach().clone()  # rows are neurons
    w_gate = None if ffn.w_gate is None else ffn.w_gate.weight.detach().clone()
    w_out = ffn.w_out.weight.detach().t().clone()  # [d_ff, d]: rows are neurons
    stacks = {
        name: w.unsqueeze(0).repeat(E, 1, 1) for name, w in (("in", w_in), ("gate", w_gate), ("out", w_out)) if w is not None
    }

    def bias(linear: nn.Linear | None) -> torch.Tensor | None:
        return None if linear is None or linear.bias is None else linear.bias.detach().unsqueeze(0).repeat(E, 1)

    b_in, b_gate, b_out = bias(ffn.w_in), bias(ffn.w_gate), bias(ffn.w_out)
    dropped = round(drop_ratio * d_ff)
    if dropped:
        for e in range(E):  # E draws of a random neuron subset, not a loop in any forward
            neurons = torch.randperm(d_ff, generator=generator)[:dropped]
            for name, source in (("in", w_in), ("gate", w_gate), ("out", w_out)):
                if source is not None:
                    stacks[name][e, neurons] = _redrawn(source, dropped, generator)
            for b in (b_in, b_gate):
                if b is not None:
                    b[e, neurons] = 0
    return SparseMoE(
        w_in=stacks["in"].transpose(1, 2),
        w_out=stacks["out"],
        act=ffn.act,
        router=new_router(ffn.d_model, E, router_std, generator).to(ffn.w_in.weight.device, ffn.w_in.weight.dtype),
        routing=routing,
        w_gate=None if w_gate is None else stacks["gate"].transpose(1, 2),
        b_in=b_in,
        b_gate=b_gate,
        expert_bias=b_out,
    )


def upcycled_layers(choice: str | list[int], count: int) -> list[int]:
    """FFN indices to upcycle: `every_other` (1, 3, 5, ...: the article's choice), `all`, or a list
    of indices (or the config's comma-separated form, "1,3")."""
    if choice == "every_other":
        return list(range(1, count, 2))
    if choice == "all":
        return list(range(count))
    if isinstance(choice, str):
        try:
            choice = [int(part) for part in choice.split(",")]
        except ValueError:
            raise MoefyError(
                f"upcycle layers must be one of {', '.join(LAYER_CHOICES)} or FFN indices such as 1,3; got {choice!r}"
            ) from None
    bad = [i for i in choice if not 0 <= i < count]
    if bad or not choice:
        raise MoefyError(f"upcycle layers {list(choice)}: the model has FFNs 0-{count - 1}; name at least one of them")
    return sorted(set(choice))


def upcycle_model(
    model: nn.Module,
    layers: str | list[int],
    num_experts: int,
    routing: Routing,
    drop_ratio: float = 0.0,
    router_std: float = 0.02,
    seed: int = 0,
) -> dict[int, SparseMoE]:
    """Swap the chosen FFNs of `model` for upcycled MoEs, in place; returns them by FFN index."""
    ffns = find_ffns(model)
    generator = torch.Generator().manual_seed(seed)
    moes = {}
    for index in upcycled_layers(layers, len(ffns)):
        ffn = ffns[index]
        moes[index] = upcycle(ffn, num_experts, routing, drop_ratio, router_std, generator=generator)
        ffn.replace(moes[index])
    return moes
