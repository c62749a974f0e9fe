"""The MoE FFN that replaces a dense one: it computes only the experts the router picks.

Neurons are reordered once so that expert e owns neurons [e*s, (e+1)*s), and every projection is
kept the way `x @ W` reads it: input projections W_in^T [d, d_ff], the output projection W_out^T
[d_ff, d] = [E, s, d]. Viewed as a table of [d*E, s] rows, W_in^T's row c*E + e is expert e's
weights for input coordinate c, and W_in^T[:, e*s:(e+1)*s] its [d, s] block, so an expert's weights
are read in place, never copied, by every kernel:

- few tokens (memory-bound): `embedding_bag` with per-sample weights, one bag per (token,
  expert) pair. h_e = sum_c x_c * W_in^T[c*E + e] and y = sum_j h_j * W_out^T[j] are exactly
  weighted sums of table rows; bags run in parallel over the threads.
- many tokens (compute-bound): a loop over the picked experts, each a pair of plain matmuls on the
  rows of the tokens that picked it (gathered, then scatter-added into the output). The
  intermediates of one expert are small enough for the allocator and the caches to reuse, where
  one `grouped_mm` over all (token, expert) pairs writes and re-reads [pairs, d] tensors of tens
  of MB (on a CPU that traffic, not the arithmetic, made it 0.8x of dense at half the experts).
  For CPU inference in float32 the loop runs compiled (moefy.native): the same algorithm without
  the microseconds of dispatch per op and expert that kept it at the dense FFN's speed at half the
  experts. An expert that most tokens of a block picked costs less computed for every token and masked
  than gathered: the share where the two break even is where looped stops winning in the
  measured table (uniform picks put every expert at the batch's density), and a trained router,
  which gives some experts most of a batch and others few, gains most from this.
- many tokens on a GPU: tokens grouped by expert and one `grouped_mm` per projection (one kernel
  launch for all experts, where the loop launches several per expert).
- many tokens on many experts: masked-dense, every neuron computed and the unpicked experts'
  zeroed, always available as the fallback.

Which kernel is fastest depends on the machine: a KernelTable measured by the calibrate step
(moefy.moe.kernel_choice) decides by token count and experts per token; without one, fixed rules
measured on the project's machine decide. With every expert picked it runs the dense matmuls on
the reordered weights, so budget 1.0 costs what the dense FFN costs. No Python loop runs over
tokens; the looped kernel's loop over experts costs a few microseconds per expert.

Shared experts (moefy.conversion.shared) are a dense FFN of their own neurons, computed for every
token beside the routed experts' kernel; the router and the kernels see the routed experts only.

A softmax-gated conversion (moefy.conversion.routers.SoftmaxGate, from softmax-gated recovery)
weighs each picked expert's output by its gate; every kernel takes the gates, the compiled loop
included.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moefy import native
from moefy.adapters.ffn import FFN, find_ffns
from moefy.errors import MoefyError

KERNELS = ("bags", "looped", "grouped", "masked")
# The rules used without a measured KernelTable (benchmarks/moe_speed.py measures them):
# at most this many (token, expert) pairs per expert on average run through embedding_bag: a bag
# re-reads its expert's weights, so it only wins while tokens rarely share an expert;
BAG_PAIRS_PER_EXPERT = 1.0
# experts narrower than this make per-expert matmuls too small to beat the dense matmul (384
# experts of 4 neurons on MiniLM: grouped_mm 0.2x of dense at budget 0.2), so they run masked-dense;
MIN_EXPERT_SIZE = 16
# and an expert that at least this share of the tokens picked runs on every token, masked, in
# the looped kernel (MiniLM's 48 experts of 32 neurons, 3,072 tokens, one core with AVX-512:
# 1.18-1.27x of dense at budget 0.5 gathering every expert, 0.80x computing every one for all).
LOOPED_DENSE_SHARE = 0.7
# The looped kernel works through a batch in blocks of this many tokens: each block's gathered rows
# and output stay nearer the core (384x1536, 48 experts, 8,192 tokens, one core: 1.32x of dense at
# budget 0.5 in blocks of 2,048 against 1.12x in one; 768x3072 at 4,096 tokens: 1.29x against 1.24x).
LOOPED_BLOCK_TOKENS = 2048
# The native looped kernel (moefy.native) takes smaller blocks, as it has no per-op cost to spread:
# 384x1536, 48 experts, 4,096 tokens, one AVX2 core, budget 0.5: 1.63x of dense in blocks of 512,
# 1.74x in blocks of 1,024.
NATIVE_BLOCK_TOKENS = 1024
NATIVE_DTYPES = (torch.float32, torch.bfloat16)  # what looped.cpp computes in
# The grouped kernel works through (token, expert) pairs in slabs of at most this many floats per
# [pairs, d] intermediate: below glibc's largest mmap threshold (32 MB), so freed slabs are reused.
SLAB_FLOATS = 4 * 2**20


def expert_order(labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Neuron ids sorted by expert (stable), after checking every expert has d_ff / E neurons."""
    labels = labels.long()
    sizes = torch.bincount(labels, minlength=num_experts)
    if len(sizes) != num_experts or not bool((sizes == sizes[0]).all()) or int(sizes[0]) == 0:
        raise MoefyError(
            f"expert labels give sizes {sizes.min().item()}-{sizes.max().item()} for {num_experts} experts; the MoE "
            "layer needs exactly d_ff / E neurons per expert: use the balance step's labels (balance/<split>-E<E>)"
        )
    return torch.argsort(labels, stable=True)


class KernelChoice(Protocol):
    """What picks a kernel for a batch: moefy.moe.kernel_choice.KernelTable, measured on this machine."""

    def choose(self, tokens: int, pairs: int) -> str: ...

    def masked_share(self, tokens: int) -> float | None: ...


def default_kernel(tokens: int, pairs: int, num_experts: int, expert_size: int, on_gpu: bool) -> str:
    """The kernel for `pairs` (token, expert) pairs of `tokens` tokens when nothing was measured."""
    if pairs <= BAG_PAIRS_PER_EXPERT * num_experts:
        return "bags"
    if expert_size < MIN_EXPERT_SIZE:
        return "masked"
    return "grouped" if on_gpu else "looped"


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().contiguous(), requires_grad=False)


class MoEFFN(nn.Module):
    def __init__(
        self,
        ffn: FFN,
        labels: torch.Tensor,
        router: nn.Module,
        num_experts: int,
        kernels: KernelChoice | None = None,
        shared_experts: int = 0,
        gate: nn.Module | None = None,
    ):
        """`num_experts` counts the labels' experts, of which the last `shared_experts` are shared:
        self.num_experts is then the routed ones, those the router scores. `gate`: a SoftmaxGate
        that weighs the picks by the router's logits (None: each pick counts once)."""
        super().__init__()
        everything = expert_order(labels.to(ffn.w_in.weight.device), num_experts)
        d_ff, d_model = ffn.w_in.weight.shape
        E, s = num_experts - shared_experts, d_ff // num_experts
        order, shared = everything[: E * s], everything[E * s :]
        self.num_experts, self.expert_size, self.d_model = E, s, d_model
        self.shared_experts = shared_experts
        self.index = ffn.index  # the FFN's: per-layer settings and curves are keyed by it
        self.d_out = ffn.w_out.out_features  # d_model for an FFN; a distilled k or v projection may be narrower
        self.projection = ffn.projection  # a distilled attention projection: its FLOPs replace the projection's
        self.act, self.router, self.gate = ffn.act, router, gate
        self.k = E
        self.tau: float | None = None  # dynamic-k threshold; None: top-k with self.k
        self.experts_per_token: torch.Tensor | None = None
        self.kernels = kernels
        self.kernel_calls: Counter[str] = Counter()  # which kernel ran how often, for evaluate's records
        self.d_ff = d_ff
        self.register_buffer("routed_neurons", order, persistent=False)
        # The oracle scores each expert by its neurons' activations; when its experts are this
        # layer's, they are the blocks of h in expert order, so no reordering copy is needed.
        self._oracle_in_order = getattr(router, "needs_activations", False) and torch.equal(
            router.labels.cpu(), labels.long().cpu()
        )

        def by_expert_t(linear: nn.Linear, neurons: torch.Tensor = order) -> nn.Parameter:  # W^T [d, n], in that order
            return _frozen(linear.weight.detach()[neurons].t())

        def bias(linear: nn.Linear, neurons: torch.Tensor = order, rows: int = E) -> nn.Parameter | None:  # [rows, s]
            return None if linear.bias is None else _frozen(linear.bias.detach()[neurons].view(rows, -1))

        self.w_in, self.b_in = by_expert_t(ffn.w_in), bias(ffn.w_in)
        gated = ffn.w_gate is not None
        self.w_gate, self.b_gate = (by_expert_t(ffn.w_gate), bias(ffn.w_gate)) if gated else (None, None)
        self.w_out = _frozen(ffn.w_out.weight.detach().t()[order])  # [E*s, d] = [E, s, d]
        self.b_out = _frozen(ffn.w_out.bias)
        # The shared experts as one dense block: W^T [d, S*s], biases [1, S*s], W_out^T [S*s, d].
        self.shared_w_in = self.shared_b_in = self.shared_w_gate = self.shared_b_gate = self.shared_w_out = None
        if shared_experts:
            self.shared_w_in, self.shared_b_in = by_expert_t(ffn.w_in, shared), bias(ffn.w_in, shared, 1)
            if gated:
                self.shared_w_gate, self.shared_b_gate = by_expert_t(ffn.w_gate, shared), bias(ffn.w_gate, shared, 1)
            self.shared_w_out = _frozen(ffn.w_out.weight.detach().t()[shared])
        elsize = self.w_in.element_size()
        self._grouped_ok = (d_model * elsize) % 16 == 0 and (s * elsize) % 16 == 0  # grouped_mm's alignment
        self._native_act = native.activation_code(self.act)  # None: the native looped kernel cannot compute it

    # -- every neuron ---------------------------------------------------------------------------
    def dense_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Every neuron's value [T, d_ff], in expert order."""
        gate = None if self.w_gate is None else _linear(x, self.w_gate, self.b_gate)
        return self._hidden(_linear(x, self.w_in, self.b_in), gate)

    def _hidden(self, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """act(up), or act(gate) * up for a gated FFN: every kernel's fresh projections, overwritten
        in place unless autograd records them (it needs the values that in-place ops overwrite)."""
        if up.requires_grad or (gate is not None and gate.requires_grad):
            return self.act(up) if gate is None else self.act(gate) * up
        return _act_(self.act, up) if gate is None else _act_(self.act, gate).mul_(up)

    def routed_dense(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Every routed expert's output summed (the output bias included)."""
        return _linear(self.dense_activations(x) if h is None else h, self.w_out, self.b_out)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output [T, d_out] (None without shared experts)."""
        if self.shared_w_in is None:
            return None
        gate = None if self.shared_w_gate is None else _linear(x, self.shared_w_gate, self.shared_b_gate)
        return torch.mm(self._hidden(_linear(x, self.shared_w_in, self.shared_b_in), gate), self.shared_w_out)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The FFN's output with every expert: what the layer replaced."""
        return self._plus_shared(self.routed_dense(x), x)

    def _plus_shared(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared_output(x)
        if shared is None:
            return out
        return out + shared if out.requires_grad or shared.requires_grad else out.add_(shared)

    # -- the picked experts only ------------------------------------------------------------------
    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Experts picked per token [T, E] (bool) and, for the oracle, the dense activations it needed;
        with a gate, the picks' gates [T, E] instead of bools."""
        h = None
        if getattr(self.router, "needs_activations", False):
            h = self.dense_activations(x)
        if self._oracle_in_order:
            by_expert = h.view(h.shape[0], self.num_experts, self.expert_size)  # expert_mass: the sum of |h|
            scores = by_expert.sum(-1) if type(self.act) is nn.ReLU else by_expert.abs().sum(-1)  # ReLU: h >= 0
        else:
            router_h = None if h is None else self._neuron_order(h)
            scores = (self.router.contribution if self.tau is not None else self.router)(x, router_h)
        if self.tau is not None:
            picked = threshold_pick(scores, self.tau)
        else:
            if self.gate is not None:  # the served rule: the top k of the gates' softmax
                chosen = self.gate.pick(scores, self.k)
            else:
                chosen = scores.topk(self.k, dim=-1, sorted=False).indices  # a set: sorting it costs as much as the router
            picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, chosen, True)
        if self.gate is not None:  # weighed by the logits (dynamic-k scored the contributions)
            return self.gate(scores if self.tau is None else self.router(x, None), picked), h
        return picked, h

    def _neuron_order(self, h: torch.Tensor) -> torch.Tensor:
        """The routed neurons' values h [T, E*s] (expert order) as [T, d_ff] in the FFN's own neuron
        order, the shared neurons 0: what a router given the activations reads."""
        return h.new_zeros(h.shape[0], self.d_ff).index_copy_(1, self.routed_neurons, h)

    @property
    def expert_flops_per_token(self) -> int:
        """2 FLOPs per multiply-add of one expert's matmuls (the gate's too, for a gated FFN)."""
        return 2 * self.expert_size * ((2 if self.w_gate is not None else 1) * self.d_model + self.d_out)

    @property
    def dense_flops_per_token(self) -> int:
        """The dense FFN's: every expert, routed and shared."""
        return (self.num_experts + self.shared_experts) * self.expert_flops_per_token

    def flops_per_token(self, experts: float, router_runs: bool) -> float:
        """FLOPs per token with `experts` routed experts (a mean for dynamic-k) and the shared ones,
        plus the router when it runs."""
        active = experts + self.shared_experts
        return active * self.expert_flops_per_token + (self.router.flops_per_token() if router_runs else 0)

    @property
    def runs_dense(self) -> bool:
        """Every expert is picked for every token unweighted, so no router is needed."""
        if self.gate is not None:
            return False
        return self.tau >= 1 if self.tau is not None else self.k >= self.num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.d_out)
        x = x.reshape(-1, self.d_model)
        if self.runs_dense:
            self.experts_per_token = None
            return self.dense(x).view(shape)
        picked, h = self.select(x)
        self.experts_per_token = (picked != 0).sum(-1).to(x.dtype).view(shape[:-1])
        out = self.experts_forward(x, picked, h=h)  # h: the oracle computed every routed neuron
        return self._plus_shared(out, x).view(shape)

    def _masked(self, x: torch.Tensor, picked: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Every neuron computed (or given as h, which is overwritten), the unpicked experts' zeroed
        (and the picked ones' scaled by their gates)."""
        h = self.dense_activations(x) if h is None else h
        return self.routed_dense(x, _zero_unpicked(h, picked, self.expert_size))

    def choose_kernel(self, tokens: int, pairs: int, on_gpu: bool = False) -> str:
        if self.kernels is not None:
            kernel = self.kernels.choose(tokens, pairs)
            if kernel != "grouped" or self._grouped_ok:
                return kernel
        # grouped_mm cannot read unaligned weights: they take the CPU's rules (the loop) on a GPU too
        return default_kernel(tokens, pairs, self.num_experts, self.expert_size, on_gpu and self._grouped_ok)

    def masked_share(self, tokens: int) -> float:
        """The share of a batch's tokens from which the looped kernel computes an expert for every
        token (masked) rather than for the tokens that picked it."""
        share = None if self.kernels is None else self.kernels.masked_share(tokens)
        return LOOPED_DENSE_SHARE if share is None else share

    def popular_experts(self, picked: torch.Tensor) -> torch.Tensor:
        """Experts [E] bool that at least masked_share of the tokens picked (picked [T, E] bool)."""
        return picked.sum(0) >= self.masked_share(picked.shape[0]) * picked.shape[0]

    def experts_forward(
        self, x: torch.Tensor, picked: torch.Tensor, kernel: str = "auto", h: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sum of the picked routed experts' outputs per token [T, d] (the shared experts' aside);
        picked [T, E] bool, or each pick's gate (0: not picked), which scales its expert's output.

        kernel: "bags" (embedding_bag), "looped" (a matmul pair per expert), "grouped" (grouped_mm),
        "masked" (every neuron computed, the unpicked zeroed) or "auto" (the kernel table's choice,
        else default_kernel).
        h: every neuron's activation [T, d_ff] in expert order, when the router computed them (the
        oracle): only the output projection runs, and h may be overwritten.
        """
        gates = None if picked.dtype == torch.bool else picked
        if gates is not None:
            picked = gates != 0
        if kernel == "auto":
            kernel = self.choose_kernel(x.shape[0], int(picked.sum()), x.is_cuda)
        elif kernel not in KERNELS:
            raise MoefyError(f"no MoE kernel {kernel!r}: choose one of {', '.join(KERNELS)} or 'auto'")
        self.kernel_calls[kernel] += 1
        if kernel == "masked":
            return self._masked(x, picked if gates is None else gates, h)
        rows = (x.shape[0], self.d_out)
        out = x.new_zeros(rows) if self.b_out is None else self.b_out.expand(rows).clone()
        if kernel == "looped":
            return self._looped(x, picked, h, out, gates)
        if kernel == "bags":
            token, expert = picked.nonzero(as_tuple=True)
            return out.index_add_(0, token, _gated(self._bags(x, token, expert, h), gates, token, expert))
        expert, token = picked.t().nonzero(as_tuple=True)  # pairs grouped by expert
        ends = torch.cumsum(picked.sum(0), 0)
        # Slabs of pairs keep each [pairs, d] intermediate small enough for the allocator to reuse
        # (a fresh 100 MB tensor costs more in page faults than its matmul on CPU).
        slab = len(token) if x.is_cuda else max(1, SLAB_FLOATS // max(self.d_model, self.d_out))
        for start in range(0, len(token), slab):
            stop = min(start + slab, len(token))
            offs = (ends.clamp(start, stop) - start).to(torch.int32)
            t, e = token[start:stop], expert[start:stop]
            out.index_add_(0, t, _gated(self._grouped(x, t, e, offs, h), gates, t, e))
        return out

    def _looped(
        self, x: torch.Tensor, picked: torch.Tensor, h: torch.Tensor | None, out: torch.Tensor, gates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The looped kernel: compiled (moefy.native) for CPU inference in float32 or bfloat16 where it
        could be built, the Python loop otherwise (a GPU, autograd, another dtype or activation)."""
        kernel = native.looped_kernel() if self._native_runs(x, h, gates) else None
        if kernel is None:
            return self._looped_python(x, picked, h, out, gates)
        # Each thread takes whole blocks (see looped.cpp): at least one block per thread.
        block = max(1, min(NATIVE_BLOCK_TOKENS, math.ceil(x.shape[0] / torch.get_num_threads())))
        kernel.looped(
            x.contiguous(), picked.contiguous(), self.w_in, self.b_in, self.w_gate, self.b_gate, self.w_out,
            out, h, self.num_experts, self._native_act, block, float(self.masked_share(block)),
            None if gates is None else gates.contiguous(),
        )  # fmt: skip
        return out

    def _native_runs(self, x: torch.Tensor, h: torch.Tensor | None, gates: torch.Tensor | None = None) -> bool:
        recorded = _autograd_records(x, h) or (gates is not None and torch.is_grad_enabled() and gates.requires_grad)
        inputs_fit = (
            x.dtype in NATIVE_DTYPES and x.dtype == self.w_in.dtype and (h is None or (h.dtype == x.dtype and h.is_contiguous()))
        )
        inputs_fit = inputs_fit and (gates is None or gates.dtype == x.dtype)
        on_cpu = x.device.type == "cpu"
        return self._native_act is not None and on_cpu and not recorded and inputs_fit

    def _looped_python(
        self, x: torch.Tensor, picked: torch.Tensor, h: torch.Tensor | None, out: torch.Tensor, gates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Blocks of LOOPED_BLOCK_TOKENS tokens, and in each one expert at a time: its tokens' rows
        gathered, two matmuls, the result scatter-added into `out`; an expert that at least
        masked_share of the block's tokens picked is computed for every token of the block and masked
        instead (no gather, no scatter)."""
        E, s, d = self.num_experts, self.expert_size, self.d_model
        # Expert e's weights, read in place: [d, s] blocks of the input projections, [s, d_out] of the output's.
        in_blocks = self.w_in.view(d, E, s).unbind(1)
        gate_blocks = None if self.w_gate is None else self.w_gate.view(d, E, s).unbind(1)
        out_blocks = self.w_out.view(E, s, -1).unbind(0)
        scratch = _LoopScratch.for_block(x, h, min(LOOPED_BLOCK_TOKENS, x.shape[0]), s, self.d_out, gated=gate_blocks is not None)
        for start in range(0, x.shape[0], LOOPED_BLOCK_TOKENS):
            rows = slice(start, start + LOOPED_BLOCK_TOKENS)
            x_block, picked_block, out_block = x[rows], picked[rows], out[rows]
            weight_block = picked_block if gates is None else gates[rows]
            h_block = None if h is None else h[rows].view(-1, E, s)  # the oracle's activations, by expert
            token = picked_block.t().nonzero(as_tuple=True)[1]  # the pairs' tokens, grouped by expert
            counts = picked_block.sum(0).tolist()
            tokens_of = token.split(counts)
            everyone = self.popular_experts(picked_block).tolist()
            for e in (e for e, count in enumerate(counts) if count):
                tokens = None if everyone[e] else tokens_of[e]
                n = x_block.shape[0] if tokens is None else counts[e]
                if h_block is not None:
                    hidden = _rows(h_block[:, e], tokens, scratch.take("up", n))
                else:
                    xs, gate = _rows(x_block, tokens, scratch.take("rows", n)), None
                    if gate_blocks is not None:
                        gate = _linear(xs, gate_blocks[e], _row(self.b_gate, e), scratch.take("gate", n))
                    hidden = self._hidden(_linear(xs, in_blocks[e], _row(self.b_in, e), scratch.take("up", n)), gate)
                if tokens is None:
                    mask = weight_block[:, e, None]
                    hidden = hidden * mask if hidden.requires_grad else hidden.mul_(mask)
                    out_block.addmm_(hidden, out_blocks[e])
                else:
                    y = torch.mm(hidden, out_blocks[e], out=scratch.take("out", n))
                    if gates is not None:
                        y = y * weight_block[tokens, e, None] if y.requires_grad else y.mul_(weight_block[tokens, e, None])
                    out_block.index_add_(0, tokens, y)
        return out

    def _pair_activations(self, token: torch.Tensor, expert: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The [pairs, s] activations of (token, expert) pairs, read from every neuron's h."""
        return h.view(-1, self.expert_size).index_select(0, token * self.num_experts + expert)

    def _grouped(self, x, token, expert, ends, h=None):
        E, s = self.num_experts, self.expert_size
        if h is None:
            xs = torch.index_select(x, 0, token)

            def project(w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # w [d, E*s] as E blocks [d, s]
                return _add_bias(F.grouped_mm(xs, w.view(-1, E, s).transpose(0, 1), offs=ends), bias, expert)

            gate = None if self.w_gate is None else project(self.w_gate, self.b_gate)
            pairs = self._hidden(project(self.w_in, self.b_in), gate)
        else:
            pairs = self._pair_activations(token, expert, h)
        return F.grouped_mm(pairs, self.w_out.view(E, s, -1), offs=ends)

    def _bags(self, x, token, expert, h=None):
        d, s, E = self.d_model, self.expert_size, self.num_experts
        if h is None:
            rows = torch.arange(0, d * E, E, device=x.device) + expert.unsqueeze(1)  # pair (t, e) reads rows c*E + e
            rows, weights = rows.view(-1), x[token].reshape(-1)
            starts = torch.arange(0, rows.numel(), d, device=x.device)

            def project(table: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
                out = F.embedding_bag(rows, table.view(-1, s), starts, mode="sum", per_sample_weights=weights)
                return _add_bias(out, bias, expert)

            gate = None if self.w_gate is None else project(self.w_gate, self.b_gate)
            pairs = self._hidden(project(self.w_in, self.b_in), gate)
        else:
            pairs = self._pair_activations(token, expert, h)
        neurons = ((expert * s).unsqueeze(1) + torch.arange(s, device=x.device)).view(-1)
        return F.embedding_bag(
            neurons,
            self.w_out,
            torch.arange(0, neurons.numel(), s, device=x.device),
            mode="sum",
            per_sample_weights=pairs.reshape(-1),
        )


def _gated(y: torch.Tensor, gates: torch.Tensor | None, token: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Pair outputs y [P, d] scaled by their gates (gates [T, E], or None: unweighted)."""
    if gates is None:
        return y
    weights = gates[token, expert].unsqueeze(1)
    return y * weights if y.requires_grad or weights.requires_grad else y.mul_(weights)


def _zero_unpicked(h: torch.Tensor, picked: torch.Tensor, expert_size: int) -> torch.Tensor:
    """h [T, n*s] with each token's unpicked experts (picked [T, n] bool) zeroed, in place where
    autograd does not record h (as in MoEFFN._hidden); picked may be each pick's gate instead."""
    by_expert = h.view(h.shape[0], -1, expert_size)
    mask = picked.unsqueeze(-1)
    return (by_expert * mask).view_as(h) if h.requires_grad else by_expert.mul_(mask).view_as(h)


def _act_(act: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """act(t), in place for the ReLU of a D2DMoE-style fine-tune: `t` is a fresh matmul output, and
    a pass over a new [tokens, d_ff] tensor costs a few percent of the FFN."""
    return t.relu_() if type(act) is nn.ReLU else act(t)


def _linear(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.mm(x, w_t, out=out) if b is None else torch.addmm(b.reshape(-1), x, w_t, out=out)


def _autograd_records(x: torch.Tensor, h: torch.Tensor | None) -> bool:
    """Whether autograd records ops on the looped kernel's inputs (x, or the oracle's h)."""
    return torch.is_grad_enabled() and (x.requires_grad or (h is not None and h.requires_grad))


class _LoopScratch:
    """The looped kernel's intermediates, one block of rows each, reused by every expert. A fresh
    tensor per expert and matmul (a few MB each) costs page faults and cold caches: at density 0.5
    on CPU the loop went from 1.09x to 1.17x of dense with these (MiniLM's FFN, 4,096 tokens, one
    thread)."""

    def __init__(self, like: torch.Tensor, rows: int, widths: dict[str, int]):
        self.buffers = {name: like.new_empty(rows, width) for name, width in widths.items()}

    @classmethod
    def for_block(cls, x: torch.Tensor, h: torch.Tensor | None, rows: int, expert_size: int, d_out: int, gated: bool):
        """Scratch for a block of `rows` tokens, or one that hands out nothing (every op allocates)
        where autograd records the kernel: ops with out= tensors cannot be differentiated."""
        if _autograd_records(x, h):
            return cls(x, 0, {})
        widths = {"up": expert_size, "out": d_out}  # with the oracle's h: its gathered rows, the output
        if h is None:  # the input projections' too
            widths |= {"rows": x.shape[1]} | ({"gate": expert_size} if gated else {})
        return cls(x, rows, widths)

    def take(self, name: str, rows: int) -> torch.Tensor | None:
        """The first `rows` rows of the named buffer (None: let the op allocate)."""
        buffer = self.buffers.get(name)
        return None if buffer is None else buffer[:rows]


def _rows(t: torch.Tensor, index: torch.Tensor | None, out: torch.Tensor | None) -> torch.Tensor:
    """t's rows at index (written into out, if given), or all of t for index None."""
    return t if index is None else torch.index_select(t, 0, index, out=out)


def _row(bias: torch.Tensor | None, expert: int) -> torch.Tensor | None:
    return None if bias is None else bias[expert]


def _add_bias(out: torch.Tensor, bias: torch.Tensor | None, expert: torch.Tensor) -> torch.Tensor:
    return out if bias is None else out + bias[expert]


def moefy_model(
    model: nn.Module,
    labels: dict[int, torch.Tensor],
    routers: dict[int, nn.Module],
    num_experts: int,
    kernels: KernelChoice | None = None,
    shared_experts: int = 0,
    gates: dict[int, nn.Module] | None = None,
) -> list[MoEFFN]:
    """Swap every FFN of `model` for an MoEFFN; returns them in layer order (to set k). `gates`: a
    softmax-gated conversion's SoftmaxGate per layer."""
    layers = []
    for ffn in find_ffns(model):
        router = routers[ffn.index].to(ffn.w_in.weight.device)
        gate = None if not gates else gates[ffn.index].to(ffn.w_in.weight.device)
        moe = MoEFFN(ffn, labels[ffn.index], router, num_experts, kernels, shared_experts, gate)
        ffn.replace(moe)
        layers.append(moe)
    return layers


def threshold_pick(contribution: torch.Tensor, tau: float) -> torch.Tensor:
    """D2DMoE's dynamic-k rule: per token, every expert whose contribution is at least (1 - tau) times
    the token's largest. tau = 0 keeps the top expert(s), tau >= 1 keeps all; an expert predicted to
    contribute nothing (0) is never run below tau = 1."""
    if tau >= 1:
        return torch.ones_like(contribution, dtype=torch.bool)
    top = contribution.amax(dim=-1, keepdim=True)
    return (contribution >= (1 - tau) * top) & (contribution > 0)


def set_experts_per_token(layers: list[MoEFFN], k: int | Sequence[int]) -> None:
    """Top-k selection with k routed experts per token: one k for every layer, or one per layer."""
    ks = [k] * len(layers) if isinstance(k, int) else list(k)
    if len(ks) != len(layers):
        raise MoefyError(f"{len(ks)} per-layer k for {len(layers)} MoE layers")
    for layer, layer_k in zip(layers, ks):
        layer.k, layer.tau = layer_k, None


def set_threshold(layers: list[MoEFFN], tau: float) -> None:
    """Dynamic-k selection with threshold tau (see threshold_pick)."""
    for layer in layers:
        layer.tau = tau


def kernel_calls(layers: list[MoEFFN], reset: bool = True) -> Counter[str]:
    """How often each kernel ran in the layers since the last reset (the dense path is not counted)."""
    total = sum((layer.kernel_calls for layer in layers), Counter())
    if reset:
        for layer in layers:
            layer.kernel_calls = Counter()
    return total
