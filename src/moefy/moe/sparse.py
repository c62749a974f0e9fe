"""A trainable sparse MoE FFN: the layer that recovery, Sparse Upcycling and merging train.

moe.py's MoEFFN is the inference layer of a conversion (frozen weights, kernels chosen for speed).
SparseMoE holds every expert's weights as one block of a [E, d, s] tensor, so that a token's
gradient reaches exactly the experts it used: (token, expert) pairs are sorted by expert and each
projection is one `grouped_mm` over all experts, forward and backward, with no Python loop over
experts or tokens. Each pair's output is scaled by its gate and added to its token's row; a
token no expert takes gets 0, so its block passes it on through the residual connection alone.

Routing (`Routing.kind`):
- `top_k`: token choice, softmax gates over all experts, the k largest kept, renormalised to sum
  to 1 over the chosen k (`renormalize`) or not (the Sparse Upcycling article reports both; with
  k = 1 a renormalised gate is always 1 and the router learns nothing from the task loss, so
  Switch-style top-1 takes the raw probability);
- `expert_choice`: every expert takes the capacity_factor * T / E tokens it scores highest
  (softmax over experts), so no expert is ever over capacity and some tokens may go untaken;
- `unweighted_top_k`: MoEfication's rule, the k best-scored experts summed with gate 1. The task
  loss then gives the router no gradient: its router keeps what the router step trained, or stays
  frozen; unless a `gate` (moefy.conversion.routers.SoftmaxGate) weighs the picks by the router's
  softmax, which starts at gate 1 and trains with the router (softmax-gated recovery).

A conversion with shared experts (moefy.conversion.shared) keeps them as one dense block beside
the routed experts, run on every token (`SharedExperts`).

A merged layer (moefy.training.merging) keeps its router over the original experts and an `expert_map`
from them to the experts it stores: a token sent to two experts of one group gets that group's
expert once, with the two gates summed. A compressed layer (moefy.moe.compression) stores a weight as
a low-rank product plus a sparse remainder, rebuilt for each forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moefy.adapters.ffn import FFN
from moefy.config import ROUTINGS
from moefy.conversion.routers import LinearRouter, SoftmaxGate
from moefy.errors import MoefyError
from moefy.moe.layer import expert_order


@dataclass(frozen=True)
class Routing:
    kind: str = "top_k"
    k: int = 2  # experts per token (top_k, unweighted_top_k)
    renormalize: bool = True  # top_k: gates sum to 1 over the chosen k
    capacity_factor: float = 2.0  # expert_choice: each expert takes capacity_factor * T / E tokens

    def __post_init__(self):
        if self.kind not in ROUTINGS:
            raise MoefyError(f"routing {self.kind!r} is not one of {', '.join(ROUTINGS)}")
        if self.k < 1 or self.capacity_factor <= 0:
            raise MoefyError(f"routing needs k >= 1 and capacity_factor > 0, got k={self.k}, C={self.capacity_factor}")


@dataclass
class Dispatch:
    """The (token, expert) pairs of one batch, sorted by expert, with their gates."""

    token: torch.Tensor  # [P] long
    expert: torch.Tensor  # [P] long, non-decreasing
    gate: torch.Tensor  # [P], differentiable where the routing weights by the router
    counts: torch.Tensor  # [E] pairs per expert


def expert_capacity(tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: ceil(C * T / E), at most T."""
    return max(1, min(tokens, math.ceil(capacity_factor * tokens / num_experts)))


def route(logits: torch.Tensor, routing: Routing, valid: torch.Tensor | None = None) -> Dispatch:
    """Pairs for router logits [T, E]; `valid` [T] bool leaves padding tokens to the residual."""
    tokens, num_experts = logits.shape
    probs = logits.float().softmax(-1)
    if valid is not None:  # padding: no expert takes it, it weighs nothing in any expert's choice
        probs = probs * valid.unsqueeze(-1)
    if routing.kind == "expert_choice":
        capacity = expert_capacity(int(tokens if valid is None else valid.sum()), num_experts, routing.capacity_factor)
        gate, token = probs.t().topk(capacity, dim=-1)  # [E, C]
        expert = torch.arange(num_experts, device=logits.device).repeat_interleave(capacity)
        token, gate = token.reshape(-1), gate.reshape(-1)
        keep = gate > 0  # a padding token is never taken, even by an expert with spare capacity
        token, gate, expert = token[keep], gate[keep], expert[keep]
    else:
        k = min(routing.k, num_experts)
        scores = probs if routing.kind == "top_k" else logits.float()
        chosen = scores.topk(k, dim=-1).indices  # [T, k]
        gate = probs.gather(-1, chosen)
        if routing.kind == "unweighted_top_k":
            gate = torch.ones_like(gate)
        elif routing.renormalize:
            gate = gate / gate.sum(-1, keepdim=True).clamp(min=torch.finfo(gate.dtype).tiny)
        token = torch.arange(tokens, device=logits.device).repeat_interleave(k)
        expert, gate = chosen.reshape(-1), gate.reshape(-1)
        if valid is not None:
            keep = valid[token]
            token, expert, gate = token[keep], expert[keep], gate[keep]
        order = torch.argsort(expert, stable=True)
        token, expert, gate = token[order], expert[order], gate[order]
    return Dispatch(token, expert, gate, torch.bincount(expert, minlength=num_experts))


def regroup(dispatch: Dispatch, expert_map: torch.Tensor, num_groups: int, tokens: int) -> Dispatch:
    """The pairs of a router over E experts sent to the groups `expert_map` [E] names: pairs of one
    token to one group become one pair, their gates summed (the merged expert computes once)."""
    key = expert_map[dispatch.expert] * tokens + dispatch.token
    unique, inverse = torch.unique(key, sorted=True, return_inverse=True)  # sorted: by group, then token
    gate = dispatch.gate.new_zeros(unique.shape).index_add(0, inverse, dispatch.gate)
    group = unique // tokens
    return Dispatch(unique % tokens, group, gate, torch.bincount(group, minlength=num_groups))


def load_loss(logits: torch.Tensor, dispatch: Dispatch, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's load loss (its auxiliary load-balancing loss), E * sum_e f_e * P_e: f_e the share of (token, expert)
    pairs sent to expert e (top-1: the share of tokens), P_e the router's mean probability for e.
    1 when routing is uniform; only P_e carries a gradient."""
    num_experts = logits.shape[-1]
    probs = logits.float().softmax(-1)
    if valid is not None:
        probs = probs[valid]
    f = dispatch.counts.float() / dispatch.counts.sum().clamp(min=1)
    return num_experts * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss, the mean squared log-partition of the router logits: keeps them small."""
    z = torch.logsumexp(logits.float(), dim=-1)
    return (z[valid] if valid is not None else z).pow(2).mean()


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's CPU backward rejects a broadcast (stride 0) incoming gradient, as `.sum()` gives
    if t.requires_grad:
        t.register_hook(lambda grad: grad.contiguous())
    return t


def _grouped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _contiguous_grad(F.grouped_mm(x, w, offs=offs))


class SparseMoE(nn.Module):
    """E experts of s neurons each: y = sum over the token's pairs of gate * expert_e(x).

    w_in, w_gate: [E, d, s]; w_out: [E, s, d]; b_in, b_gate: [E, s]; expert_bias: [E, d], each
    expert's own output bias (upcycled copies carry the FFN's); shared_bias: [d], added once per
    token (a split FFN's output bias, which belongs to no expert). expert_map: [E_router] long,
    the stored expert each of the router's experts is (merged layers; None: the identity).
    """

    def __init__(
        self,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        act: nn.Module,
        router: nn.Module,
        routing: Routing,
        w_gate: torch.Tensor | None = None,
        b_in: torch.Tensor | None = None,
        b_gate: torch.Tensor | None = None,
        expert_bias: torch.Tensor | None = None,
        shared_bias: torch.Tensor | None = None,
        expert_map: torch.Tensor | None = None,
        shared: SharedExperts | None = None,
        gate: SoftmaxGate | None = None,
    ):
        super().__init__()
        num_experts, d_model, size = w_in.shape
        if gate is not None and (routing.kind != "unweighted_top_k" or expert_map is not None):
            raise MoefyError("softmax gates weigh an unweighted top-k router's picks, in a layer that is not merged")
        if w_out.shape != (num_experts, size, d_model):
            raise MoefyError(f"w_out must be [E, s, d] = {[num_experts, size, d_model]}, got {list(w_out.shape)}")
        elsize = w_in.element_size()
        if (d_model * elsize) % 16 or (size * elsize) % 16:
            raise MoefyError(
                f"experts of {size} neurons on d_model {d_model} are not 16-byte aligned, as grouped_mm needs: "
                "choose an expert count that makes d_ff / E a multiple of 4"
            )
        self.num_experts, self.expert_size, self.d_model = num_experts, size, d_model
        self.act, self.router, self.routing = act, router, routing
        self.gated = w_gate is not None
        if expert_map is not None:
            expert_map = expert_map.long()
            if expert_map.dim() != 1 or expert_map.min() < 0 or expert_map.max() >= num_experts:
                raise MoefyError(f"expert_map must name stored experts 0-{num_experts - 1} for every router expert")
        self.register_buffer("expert_map", expert_map)
        self.factored = nn.ModuleDict()  # compressed weights by name (w_in, w_gate, w_out), see compress()

        def param(t: torch.Tensor | None) -> nn.Parameter | None:
            return None if t is None else nn.Parameter(t.detach().clone().contiguous())

        self.w_in, self.w_gate, self.w_out = param(w_in), param(w_gate), param(w_out)
        self.b_in, self.b_gate = param(b_in), param(b_gate)
        self.expert_bias, self.shared_bias = param(expert_bias), param(shared_bias)
        self.shared = shared
        self.gate = gate
        self.token_mask: torch.Tensor | None = None  # [..] bool of the input's leading shape, set per batch
        self.reset_statistics()
        self.logits: torch.Tensor | None = None  # the last forward's, for the auxiliary losses
        self.dispatch: Dispatch | None = None
        self.valid: torch.Tensor | None = None

    @property
    def router_experts(self) -> int:
        """Experts the router chooses among (more than the stored ones in a merged layer)."""
        return self.num_experts if self.expert_map is None else self.expert_map.numel()

    def weight(self, name: str) -> torch.Tensor | None:
        """w_in, w_gate or w_out as [E, ., .], rebuilt from its factors if compressed."""
        return self.factored[name]() if name in self.factored else getattr(self, name)

    def compress(self, name: str, factors: nn.Module) -> None:
        """Store weight `name` as `factors` (a module whose forward gives the weight) from now on."""
        if factors().shape != self.weight(name).shape:
            raise MoefyError(f"factors of {name} give {list(factors().shape)}, not {list(self.weight(name).shape)}")
        setattr(self, name, None)
        self.factored[name] = factors

    def reset_statistics(self) -> None:
        """Expert load since the last reset: pairs per router expert, pairs the stored experts
        computed (fewer in a merged layer), and tokens no expert took."""
        self.load = torch.zeros(self.router_experts, dtype=torch.long)
        self.computed = 0
        self.tokens_seen = 0
        self.tokens_dropped = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)
        valid = None
        if self.token_mask is not None and self.token_mask.shape == shape[:-1]:
            valid = self.token_mask.reshape(-1).to(x.device)
        logits = self.router(x)
        if self.gate is None:
            dispatch = route(logits, self.routing, valid)
        else:  # the top k of the gates' softmax (the served rule), each weighed by E times its probability
            probs = self.gate.probabilities(logits)
            dispatch = route(probs, self.routing, valid)
            dispatch.gate = (probs.shape[-1] * probs)[dispatch.token, dispatch.expert].to(logits.dtype)
        self.logits, self.dispatch, self.valid = logits, dispatch, valid
        if self.expert_map is not None:
            dispatch = regroup(dispatch, self.expert_map, self.num_experts, x.shape[0])
        self._count(self.dispatch, dispatch, x.shape[0] if valid is None else int(valid.sum()))
        out = self.experts(x, dispatch)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.view(shape)

    def experts(self, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """Sum over pairs of gate * expert output, per token [T, d]."""
        y = self.pair_outputs(x, dispatch) * dispatch.gate.to(x.dtype).unsqueeze(-1)
        out = x.new_zeros(x.shape).index_add(0, dispatch.token, y)
        return out if self.shared_bias is None else out + self.shared_bias

    def pair_outputs(self, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """[P, d]: each pair's expert output before its gate (the expert's own bias included, the
        shared bias not), which merging's calibration measures (REAP's output norms)."""
        offs = torch.cumsum(dispatch.counts, 0).to(torch.int32)
        xs, expert = x.index_select(0, dispatch.token), dispatch.expert
        up = _grouped(xs, self.weight("w_in"), offs)
        if self.b_in is not None:
            up = up + self.b_in[expert]
        if not self.gated:
            h = self.act(up)
        else:
            gate = _grouped(xs, self.weight("w_gate"), offs)
            h = self.act(gate if self.b_gate is None else gate + self.b_gate[expert]) * up
        y = _grouped(h, self.weight("w_out"), offs)
        if self.expert_bias is not None:
            y = y + self.expert_bias[expert]
        return y

    def _count(self, dispatch: Dispatch, computed: Dispatch, tokens: int) -> None:
        with torch.no_grad():
            self.load += dispatch.counts.cpu()
            self.computed += int(computed.token.numel())
            self.tokens_seen += tokens
            if self.routing.kind == "expert_choice":  # token choice gives every real token its k experts
                self.tokens_dropped += tokens - int(torch.bincount(dispatch.token).count_nonzero())

    def auxiliary_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(load loss, router z-loss) of the last forward."""
        if self.logits is None:
            raise RuntimeError("auxiliary_losses() before any forward")
        return load_loss(self.logits, self.dispatch, self.valid), z_loss(self.logits, self.valid)

    def expert_parameter_count(self) -> int:
        """Parameters the routed experts store (compressed weights: their factors); the router, the
        shared experts and the shared output bias, which every token uses, aside."""
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if not name.startswith(("router.", "shared.", "gate.")) and name != "shared_bias"
        )

    def experts_per_token(self) -> float:
        """Experts a token is sent to by the routing rule (k; expert choice: C)."""
        if self.routing.kind == "expert_choice":
            return self.routing.capacity_factor
        return float(min(self.routing.k, self.router_experts))

    def active_parameters(self) -> int:
        """Expert parameters a token uses on average (k experts; expert choice: C experts)."""
        return int(round(self.experts_per_token() * self.expert_parameter_count() / self.num_experts))

    def flops_per_token(self, measured: bool = True) -> float:
        """FFN FLOPs per token: the router's matmul plus 2 per multiply-add of each computed expert
        (a compressed weight counted as its factored kernel x U V + x S). `measured`: experts per
        token as computed since the last reset (a merged layer computes a token's two experts of
        one group once), else as the routing rule sends them."""
        per_expert = 0.0
        for name in ("w_in", "w_gate", "w_out"):
            if name in self.factored:
                per_expert += self.factored[name].flops_per_row()
            elif getattr(self, name) is not None:
                per_expert += 2.0 * self.d_model * self.expert_size
        experts = self.experts_per_token()
        if measured and self.tokens_seen:
            experts = self.computed / self.tokens_seen
        shared = 0.0 if self.shared is None else self.shared.flops_per_token()
        return experts * per_expert + shared + 2.0 * self.d_model * self.router_experts


# -- from a conversion --------------------------------------------------------------------------


def mask_padding(model: nn.Module, moes: Iterable[SparseMoE]):
    """Before every forward of `model`, tell its MoE layers which positions are real tokens (its
    attention_mask), so that padding goes to no expert and takes no expert-choice capacity. Layers
    whose input has another shape (an encoder-decoder's decoder) route every position. Returns the hook's handle."""
    moes = list(moes)

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        for moe in moes:
            moe.token_mask = None if mask is None else mask.bool()

    return model.register_forward_pre_hook(hook, with_kwargs=True)


class SharedExperts(nn.Module):
    """Shared experts as one dense FFN block of their neurons, computed for every token."""

    def __init__(self, ffn: FFN, neurons: torch.Tensor):
        super().__init__()

        def param(t: torch.Tensor | None) -> nn.Parameter | None:
            return None if t is None else nn.Parameter(t.detach().clone().contiguous())

        def rows(linear: nn.Linear | None) -> tuple[nn.Parameter | None, nn.Parameter | None]:
            if linear is None:
                return None, None
            return param(linear.weight[neurons].t()), param(None if linear.bias is None else linear.bias[neurons])

        (self.w_in, self.b_in), (self.w_gate, self.b_gate) = rows(ffn.w_in), rows(ffn.w_gate)
        self.w_out = param(ffn.w_out.weight[:, neurons].t())  # [n, d]
        self.act = ffn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = x @ self.w_in if self.b_in is None else torch.addmm(self.b_in, x, self.w_in)
        if self.w_gate is None:
            return self.act(up) @ self.w_out
        gate = x @ self.w_gate if self.b_gate is None else torch.addmm(self.b_gate, x, self.w_gate)
        return (self.act(gate) * up) @ self.w_out

    def flops_per_token(self) -> float:
        d_model, neurons = self.w_in.shape
        return 2.0 * neurons * ((2 if self.w_gate is not None else 1) * d_model + self.w_out.shape[1])


def from_split(
    ffn: FFN,
    labels: torch.Tensor,
    num_experts: int,
    router: nn.Module,
    k: int,
    shared_experts: int = 0,
    softmax_gates: bool = False,
) -> SparseMoE:
    """A converted FFN as a trainable MoE: expert e owns the neurons labelled e, MoEfication's
    router picks k of the routed experts unweighted (`softmax_gates`: a linear router, whose
    softmax then weighs them from gate 1), and the last `shared_experts` run on every token
    (recovery trains the experts; see the module docstring)."""
    everything = expert_order(labels, num_experts)
    E, s = num_experts - shared_experts, ffn.d_ff // num_experts
    order = everything[: E * s]

    def by_expert(linear: nn.Linear | None) -> torch.Tensor | None:  # [E, d, s]
        return None if linear is None else linear.weight.detach()[order].view(E, s, -1).transpose(1, 2)

    def bias(linear: nn.Linear | None) -> torch.Tensor | None:
        return None if linear is None or linear.bias is None else linear.bias.detach()[order].view(E, s)

    if getattr(router, "needs_activations", False):
        raise MoefyError(
            "the groundtruth oracle computes every neuron to route: recovery needs a trained router (mlp, norm, similarity)"
        )
    if softmax_gates and not isinstance(router, LinearRouter):
        raise MoefyError(
            f"softmax gates weigh the experts by a linear router's logits, not a {type(router).__name__}'s: "
            "recover with router linear, or with recovery task or kd"
        )
    return SparseMoE(
        w_in=by_expert(ffn.w_in),
        w_out=ffn.w_out.weight.detach().t()[order].view(E, s, -1),
        act=ffn.act,
        router=_RouterScores(router),
        routing=Routing("unweighted_top_k", k=k),
        w_gate=by_expert(ffn.w_gate),
        b_in=bias(ffn.w_in),
        b_gate=bias(ffn.w_gate),
        shared_bias=None if ffn.w_out.bias is None else ffn.w_out.bias.detach(),
        shared=SharedExperts(ffn, everything[E * s :]) if shared_experts else None,
        gate=SoftmaxGate() if softmax_gates else None,
    )


class _RouterScores(nn.Module):
    """A router (router(x, h) -> scores) seen as router(x) -> logits."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(x, None)
