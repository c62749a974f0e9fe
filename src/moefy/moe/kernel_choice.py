"""Which MoE kernel is fastest on this machine, measured once per FFN shape.

The MoE layer has four ways to compute the picked experts (moefy.moe.layer): embedding bags, a loop of
matmuls over the experts, grouped matmuls and masked-dense. Which one wins depends on the token
count, the share of experts each token uses, how unevenly the experts are picked, the expert size
and the machine (its BLAS, caches, cores; a GPU). So the calibrate step times them all on a random
FFN of the study's shape over a ladder of token counts and densities (experts per token / E), with
picks as uneven as a trained router's, and writes the winners to a file; the layers run what it says. Every evaluate job of the study reads
that file, so the kernels, and with them the last bits of every output, are the same in every
rerun on the machine, while another machine measures its own.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm import tqdm

from moefy.adapters.ffn import FFN
from moefy.errors import MoefyError

TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Embedding bags re-read their expert's weights for every pair: timed only while there are at most
# this many pairs per expert (beyond, they lose to the per-expert matmuls by far).
BAG_PAIRS_PER_EXPERT = 16
# Bags, looped and grouped matmuls only get slower against masked-dense as the density grows: in a
# row, a kernel this many times slower than the best at two densities in a row is not timed further.
GIVE_UP_RATIO = 1.5
FORMAT = "moefy-kernels/2"  # /2: timed on skewed picks (/1: uniform)


def shape_key(
    d_model: int, d_ff: int, num_experts: int, gated: bool, d_out: int | None = None, dtype: torch.dtype = torch.float32
) -> str:
    """`d384-ff1536-E48` (`-gated`; `-out128` for an output narrower than the input: a distilled
    grouped-query k or v projection; `-bf16` for weights in bfloat16, whose kernels rank otherwise)."""
    narrow = d_out is not None and d_out != d_model
    key = f"d{d_model}-ff{d_ff}-E{num_experts}" + ("-gated" if gated else "") + (f"-out{d_out}" if narrow else "")
    return key + {torch.float32: "", torch.bfloat16: "-bf16"}.get(dtype, f"-{str(dtype).removeprefix('torch.')}")


def ffn_shape_key(ffn, num_experts: int) -> str:
    """The shape key of an FFN (moefy.adapters.ffn.FFN) split into `num_experts` experts."""
    gated = ffn.w_gate is not None
    return shape_key(ffn.d_model, ffn.d_ff, num_experts, gated, ffn.w_out.out_features, ffn.w_in.weight.dtype)


def layer_shape_key(layer) -> str:
    """The shape key of a MoE layer (moefy.moe.layer.MoEFFN): its FFN's, which the calibration measured."""
    d_ff = layer.num_experts * layer.expert_size
    return shape_key(layer.d_model, d_ff, layer.num_experts, layer.w_gate is not None, layer.d_out, layer.w_in.dtype)


def _nearest(ladder: tuple[float, ...], value: float) -> int:
    i = bisect.bisect_left(ladder, value)
    if i == 0:
        return 0
    if i == len(ladder):
        return len(ladder) - 1
    return i if ladder[i] - value < value - ladder[i - 1] else i - 1


@dataclass(frozen=True)
class KernelTable:
    """The fastest kernel per (token count, density) cell of one FFN shape. A batch takes the
    winner of its nearest cell (token counts compared on a log scale)."""

    num_experts: int
    tokens: tuple[int, ...]
    densities: tuple[float, ...]
    winners: tuple[tuple[str, ...], ...]  # [token row][density column]
    milliseconds: dict[str, list[list[float | None]]] | None = None  # per kernel, as measured (None: not timed)

    def _row(self, tokens: int) -> int:
        return _nearest(tuple(math.log(t) for t in self.tokens), math.log(max(tokens, 1)))

    def choose(self, tokens: int, pairs: int) -> str:
        density = pairs / max(tokens, 1) / self.num_experts
        return self.winners[self._row(tokens)][_nearest(self.densities, density)]

    def masked_share(self, tokens: int) -> float | None:
        """The share of tokens picking an expert from which the looped kernel computes it for every
        token, masked, rather than for its tokens alone: with uniform picks every expert has the
        batch's density, so it is where looped stops winning in this row (midway to the next
        density; 1.0 if it never stops; None if it never wins in this row)."""
        winners = self.winners[self._row(tokens)]
        looped = [i for i, kernel in enumerate(winners) if kernel == "looped"]
        if not looped:
            return None
        last = looped[-1]
        return 1.0 if last == len(winners) - 1 else (self.densities[last] + self.densities[last + 1]) / 2

    def to_json(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "tokens": list(self.tokens),
            "densities": list(self.densities),
            "winners": [list(row) for row in self.winners],
            "milliseconds": self.milliseconds,
        }

    @classmethod
    def from_json(cls, entry: dict) -> KernelTable:
        try:
            return cls(
                int(entry["num_experts"]),
                tuple(entry["tokens"]),
                tuple(entry["densities"]),
                tuple(tuple(row) for row in entry["winners"]),
                entry.get("milliseconds"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise MoefyError(f"a kernel table is damaged ({err!r}); delete the calibrate step's file and rerun it") from None


def table_for(document: dict, key: str, source: str) -> KernelTable:
    """The table of one FFN shape (`shape_key`) from the calibrate step's file (read as `document`)."""
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise MoefyError(f"{source} is not a kernel calibration of this moefy ({FORMAT}); delete it and rerun the calibrate step")
    if key not in document.get("shapes", {}):
        raise MoefyError(
            f"{source} has no kernel table for FFN shape {key} (it has {', '.join(document.get('shapes', {})) or 'none'}); "
            "rerun the calibrate step for this model and expert count"
        )
    return KernelTable.from_json(document["shapes"][key])


class _GatherEveryExpert:
    """The kernel choice of the layer being measured: kernels are asked for by name, and the looped
    kernel never computes an expert for every token."""

    def choose(self, tokens: int, pairs: int) -> str:
        raise AssertionError("the calibration names every kernel it times")

    def masked_share(self, tokens: int) -> float:
        return math.inf


def _fastest_milliseconds(calls: dict[str, Callable[[], object]], sync, repeats: int) -> dict[str, float]:
    """Each call's best of `repeats` timings after one warm-up. The calls take turns, each round
    in another order, so that a burst of load on the machine slows every kernel of a cell rather
    than only the one running then (one kernel's three timings in a row flipped winners)."""
    for call in calls.values():
        call()
    best = dict.fromkeys(calls, math.inf)
    names = list(calls)
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            sync()
            started = time.perf_counter()
            calls[name]()
            sync()
            best[name] = min(best[name], time.perf_counter() - started)
    return {name: seconds * 1e3 for name, seconds in best.items()}


def skewed_picks(tokens: int, num_experts: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """[tokens, E] bool, k distinct experts per token drawn without replacement with Zipf
    popularities (expert e of the shuffled ranking weighs 1 / (rank + 1)): some experts take most
    of a batch, others a few percent, as a trained router's do (at budget 0.5 the default study's
    kmeans / mlp router gave its experts 23-78% of a batch, 10th to 90th percentile), where uniform
    picks give every expert the batch's density."""
    ranks = torch.randperm(num_experts, generator=generator)
    log_weight = -torch.log1p(ranks.float())
    gumbel = -torch.log(-torch.log(torch.rand(tokens, num_experts, generator=generator).clamp(min=1e-12)))
    chosen = (log_weight + gumbel).topk(k, dim=-1).indices  # Gumbel top-k: sampling without replacement
    return torch.zeros(tokens, num_experts, dtype=torch.bool).scatter_(-1, chosen, True)


def measure(ffn: FFN, num_experts: int, device: torch.device, repeats: int = 3, max_seconds_per_call: float = 0.5) -> KernelTable:
    """Time every kernel in every (tokens, density) cell of the ladders on this FFN (its weights do
    not matter, its shape, activation and dtype do: a bf16 FFN is timed in bf16).

    Picks are k distinct experts per token, drawn as unevenly as a trained router's (skewed_picks):
    how many tokens each expert gets decides what gathering costs against masking.
    Token counts whose dense FFN takes longer than `max_seconds_per_call` are not measured; they take
    the largest measured row, as the winner no longer changes with the token count there.
    """
    from moefy.moe.layer import MoEFFN

    d_model, d_ff = ffn.d_model, ffn.d_ff
    # The looped kernel is timed gathering every expert's tokens: where that stops winning is the
    # share from which the study's layers compute an expert for every token (masked_share).
    labels = torch.arange(d_ff) % num_experts
    layer = MoEFFN(ffn, labels.to(ffn.w_in.weight.device), nn.Identity(), num_experts, _GatherEveryExpert()).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(1)
    usable = [k for k in ("bags", "looped", "grouped", "masked") if k != "grouped" or layer._grouped_ok]
    tokens_measured, winners = [], []
    timings: dict[str, list[list[float | None]]] = {k: [] for k in usable}
    cells = [(t, density) for t in TOKENS for density in DENSITIES]
    with (
        torch.no_grad(),
        tqdm(cells, desc=f"kernels {ffn_shape_key(ffn, num_experts)}", unit="cell", mininterval=2, leave=False) as bar,
    ):
        for tokens in TOKENS:
            x = torch.randn(tokens, d_model, generator=generator).to(device=device, dtype=ffn.w_in.weight.dtype)
            if _fastest_milliseconds({"dense": partial(layer.dense, x)}, sync, 1)["dense"] / 1e3 > max_seconds_per_call:
                break
            row, row_times = [], {k: [] for k in usable}
            losses = {k: 0 for k in usable}  # densities in a row at which the kernel lost by GIVE_UP_RATIO
            for density in DENSITIES:
                k = max(1, min(num_experts, round(density * num_experts)))
                picked = skewed_picks(tokens, num_experts, k, generator).to(device)
                calls = {}
                for kernel in usable:
                    too_many = kernel == "bags" and tokens * k > BAG_PAIRS_PER_EXPERT * num_experts
                    if kernel == "masked" or not (too_many or losses[kernel] >= 2):
                        calls[kernel] = partial(layer.experts_forward, x, picked, kernel=kernel)
                measured = _fastest_milliseconds(calls, sync, repeats)
                best = min(measured, key=measured.get)
                for kernel in usable:
                    row_times[kernel].append(round(measured[kernel], 4) if kernel in measured else None)
                    if kernel in measured:
                        losses[kernel] = losses[kernel] + 1 if measured[kernel] > GIVE_UP_RATIO * measured[best] else 0
                row.append(best)
                bar.update()
            tokens_measured.append(tokens)
            winners.append(tuple(row))
            for kernel in usable:
                timings[kernel].append(row_times[kernel])
    if not winners:
        raise MoefyError(f"not even one token fits a {max_seconds_per_call} s call of a {d_model}x{d_ff} FFN on {device}")
    return KernelTable(num_experts, tuple(tokens_measured), DENSITIES, tuple(winners), timings)
