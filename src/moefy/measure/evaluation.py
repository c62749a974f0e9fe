"""Measuring an MoEfied model: selection rules, one pass over the test set, and its record.

A selection rule is top-k at a budget (round(budget * E) experts per token, the shared ones
among them), with the same k routed experts in every layer (`uniform`) or as many spread over
the layers by their measured sensitivity (`sensitivity`, moefy.conversion.budgets), or dynamic-k
at a threshold tau (every expert whose router contribution is at least (1 - tau) * the token's
largest). A pass runs the test set under one rule and adds up what the record needs; the record
compares it with the dense pass (the MoE with every expert) on the same batches.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from moefy import dist
from moefy.adapters.tasks import Task
from moefy.conversion.budgets import spread
from moefy.conversion.routers import budget_to_k
from moefy.data.batches import Encoded, iterate
from moefy.errors import MoefyError
from moefy.measure.flops import ForwardTimer, ModelFlops
from moefy.measure.timing import paired_timing, total_seconds
from moefy.moe.layer import MoEFFN, kernel_calls, set_experts_per_token, set_threshold


@dataclass(frozen=True)
class SelectionRule:
    kind: str  # "top_k" or "dynamic"
    budget: float | None = None
    tau: float | None = None
    k: int | None = None  # routed experts per token (top_k); with layer_k, their mean over layers
    allocation: str = "uniform"  # top_k: k in every layer, or layer_k spread by sensitivity
    layer_k: tuple[int, ...] | None = None

    @property
    def label(self) -> str:
        """`budget 0.2`, `budget 0.2 sensitivity` or `tau 0.5`: how logs and MLflow metric names call it."""
        if self.kind != "top_k":
            return f"tau {self.tau:g}"
        return f"budget {self.budget:g}" + ("" if self.allocation == "uniform" else f" {self.allocation}")

    def runs_dense(self, routed_experts: int) -> bool:
        """Every expert for every token: the dense model, measured once in the dense pass."""
        return self.k >= routed_experts if self.kind == "top_k" else self.tau >= 1

    def apply(self, layers: list[MoEFFN]) -> None:
        if self.kind == "top_k":
            set_experts_per_token(layers, self.k if self.layer_k is None else self.layer_k)
        else:
            set_threshold(layers, self.tau)


def selection_rules(
    budgets: Sequence[float],
    thresholds: Sequence[float],
    layers: list[MoEFFN],
    num_experts: int,
    allocations: Sequence[str] = ("uniform",),
    curves: dict[int, torch.Tensor] | None = None,
) -> list[SelectionRule]:
    """Top-k at each budget in each allocation, then dynamic-k at each threshold, each in
    increasing order. `curves`: the router step's error curves by layer index (for sensitivity)."""
    shared = layers[0].shared_experts
    routed = num_experts - shared
    shapes = [(layer.num_experts, layer.expert_flops_per_token) for layer in layers]
    rules = []
    for budget in sorted(budgets):
        k = budget_to_k(budget, num_experts, shared)
        for allocation in allocations:
            if allocation == "uniform" or k >= routed:  # every expert everywhere: nothing to spread
                rules.append(SelectionRule("top_k", budget=budget, k=k, allocation=allocation))
                continue
            if curves is None:
                raise MoefyError("per-layer budgets (allocation sensitivity) need the router step's error curves")
            layer_k = spread(k, [curves[layer.index].tolist() for layer in layers], shapes)
            rules.append(SelectionRule("top_k", budget=budget, k=k, allocation=allocation, layer_k=tuple(layer_k)))
    return rules + [SelectionRule("dynamic", tau=t) for t in sorted(thresholds)]


# evaluate.precision: what the dense model and the MoE run in (moefy.steps.evaluate)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class PassTotals:
    """What one pass adds up (over batches, then over ranks)."""

    score: float = 0.0  # the task metric's numerator: correct texts, or summed next-token loss
    count: float = 0.0  # its denominator: texts, or predicted tokens
    experts: float = 0.0  # experts per real token (mean over layers), summed over real tokens
    experts_squared: float = 0.0
    tokens: float = 0.0  # real (non-padding) tokens
    agreeing: float = 0.0  # predictions equal to the dense model's
    ffn_ms: float = 0.0  # wall-clock of every FFN layer, router included
    paired_ffn_ms: float = 0.0  # of it, the calls timed next to the dense FFN (0 in the dense pass)
    paired_dense_ffn_ms: float = 0.0  # the dense FFN next to those, on the same tokens
    model_ms: float = 0.0  # wall-clock of the whole forward passes, the paired dense FFNs left out
    layer_experts: tuple[float, ...] = ()  # per MoE layer: experts per real token, summed over real tokens

    def all_reduced(self, ctx: dist.Context) -> PassTotals:
        # float64: float32 sums of squares over many tokens lose the spread's last digits
        scalars = [getattr(self, f.name) for f in fields(self) if f.name != "layer_experts"]
        summed = dist.all_reduce_sum(torch.tensor([*scalars, *self.layer_experts], dtype=torch.float64), ctx).tolist()
        return PassTotals(*summed[: len(scalars)], layer_experts=tuple(summed[len(scalars) :]))

    @property
    def experts_mean(self) -> float:
        return self.experts / self.tokens

    @property
    def experts_std(self) -> float:
        return max(0.0, self.experts_squared / self.tokens - self.experts_mean**2) ** 0.5

    @property
    def layer_experts_mean(self) -> list[float]:
        return [e / self.tokens for e in self.layer_experts]


def run_pass(
    model: torch.nn.Module,
    layers: list[MoEFFN],
    encoded: Encoded,
    batches: list,
    task: Task,
    targets: torch.Tensor | None,
    ctx: dist.Context,
    desc: str,
    dense_predictions: list[torch.Tensor] | None = None,
    paired: bool = True,
) -> tuple[list[torch.Tensor], PassTotals, str]:
    """This rank's predictions per batch, the all-reduced totals of one pass under the layers'
    current selection rule (agreement counted against `dense_predictions`, per batch), and which
    kernels the layers ran over all ranks (e.g. "looped 60, masked 6"; "dense" for the dense path).

    Every other MoE layer call is timed next to the dense FFN on the same tokens (moefy.measure.timing):
    the FFN speed-up is the ratio of those, while the whole model's compares with the dense pass.
    `paired=False` leaves the dense FFN out, for a pass whose times nobody reads."""
    kernel_calls(layers)
    predictions: list[torch.Tensor] = []
    totals = PassTotals()
    timer = ForwardTimer()
    with timer.attached(model), paired_timing(layers, paired) as clocks:
        for b, (idx, inputs, logits) in enumerate(iterate(model, encoded, batches, ctx, desc)):
            batch_targets = None if targets is None else targets[idx].to(logits.device)
            score, count, predicted = task.batch_stats(logits, inputs, batch_targets)
            predictions.append(predicted.cpu())
            real = inputs["attention_mask"].bool()
            # a layer that ran dense (every routed expert: the dense pass, or its per-layer k) has no picks
            per_layer = torch.stack(
                [
                    torch.full(real.shape, float(layer.num_experts))
                    if layer.experts_per_token is None
                    else layer.experts_per_token.cpu()
                    for layer in layers
                ]
            )[:, real.cpu()].double()
            experts = per_layer.mean(0)
            layer_sums = per_layer.sum(1).tolist()
            totals.layer_experts = tuple(a + b for a, b in zip(totals.layer_experts, layer_sums)) or tuple(layer_sums)
            totals.score += score
            totals.count += count
            totals.experts += float(experts.sum())
            totals.experts_squared += float(experts.square().sum())
            totals.tokens += len(experts)
            totals.agreeing += (
                len(predicted) if dense_predictions is None else float((predictions[-1] == dense_predictions[b]).sum())
            )
    moe_seconds, paired_seconds, dense_seconds = total_seconds(clocks)
    totals.ffn_ms, totals.paired_ffn_ms, totals.paired_dense_ffn_ms = moe_seconds * 1e3, paired_seconds * 1e3, dense_seconds * 1e3
    totals.model_ms = (timer.seconds - dense_seconds) * 1e3
    used = sum((Counter(part) for part in dist.all_gather(dict(kernel_calls(layers)), ctx)), Counter())
    kernels = ", ".join(f"{name} {count}" for name, count in sorted(used.items())) or "dense"
    return predictions, totals.all_reduced(ctx), kernels


def record(
    rule: SelectionRule,
    totals: PassTotals,
    dense: PassTotals,
    task: Task,
    layers: list[MoEFFN],
    kernels: str,
    whole: ModelFlops,
) -> dict:
    """One evaluation record: the rule, the task metric (and the count of texts, or predicted tokens,
    it is over) and the same relative to dense, agreement
    with dense, experts per token, FLOPs fractions (routers included) of the FFNs, of the distilled
    attention projections (where there are any) and of the whole model, measured FFN and
    whole-forward times and the kernels that took them.

    `whole` is the converted model's dense FLOPs per token before conversion (distilled MLPs
    included). The whole-model fraction is over the model before distillation: each distilled
    MLP stands in for its projection's 2 d_in d_out FLOPs there."""
    metric = task.metric
    value, dense_value = task.metric_of(totals.score, totals.count), task.metric_of(dense.score, dense.count)
    router_runs = not rule.runs_dense(layers[0].num_experts) or layers[0].gate is not None  # gates weigh every pick
    moe = [layer.flops_per_token(e, router_runs) for layer, e in zip(layers, totals.layer_experts_mean)]

    def fraction(of_projections: bool, dense_flops) -> float:
        chosen = [i for i, layer in enumerate(layers) if layer.projection == of_projections]
        return sum(moe[i] for i in chosen) / sum(dense_flops(layers[i]) for i in chosen)

    projections = [layer for layer in layers if layer.projection]
    original = whole.total + sum(2 * p.d_model * p.d_out - p.dense_flops_per_token for p in projections)
    converted = whole.total - sum(layer.dense_flops_per_token for layer in layers) + sum(moe)
    # The FFN speed-up is the paired calls' ratio where the pass timed them (see run_pass); the dense
    # time is the whole pass's MoE time over that ratio.
    speedup = totals.paired_dense_ffn_ms / totals.paired_ffn_ms if totals.paired_ffn_ms else dense.ffn_ms / totals.ffn_ms
    dense_ffn_ms = totals.ffn_ms * speedup
    entry = {
        "rule": rule.kind,
        "budget": rule.budget,
        "tau": rule.tau,
        "k": rule.k,
        "allocation": rule.allocation,  # dynamic-k: uniform, the same tau in every layer
        "layer_k": None if rule.layer_k is None else list(rule.layer_k),
        "experts_per_token": totals.experts_mean,
        "experts_per_token_std": totals.experts_std,
        f"test_{metric}": value,
        f"relative_{metric}": value / dense_value,
        "ffn_flops_fraction": fraction(False, lambda layer: layer.dense_flops_per_token),
        "model_flops_fraction": converted / original,
        "dense_model_flops_per_token": original,
        "dense_agreement": totals.agreeing / totals.count,
        f"dense_test_{metric}": dense_value,
        "test_count": totals.count,  # texts (or predicted tokens) the metric is over: what resolves it (moefy.report.intervals)
        "ffn_ms_dense": dense_ffn_ms,
        "ffn_ms_moe": totals.ffn_ms,
        "ffn_speedup": speedup,
        "model_ms_dense": dense.model_ms,
        "model_ms_moe": totals.model_ms,
        "model_speedup": dense.model_ms / totals.model_ms,
        "kernels": kernels,
    }
    if projections:  # against the projections' own FLOPs, 2 d_in d_out each (not the MLPs')
        entry["projection_flops_fraction"] = fraction(True, lambda layer: 2 * layer.d_model * layer.d_out)
    return entry


MEASURES = (
    "dense_agreement",
    "ffn_flops_fraction",
    "model_flops_fraction",
    "experts_per_token",
    "experts_per_token_std",
    "ffn_ms_dense",
    "ffn_ms_moe",
    "ffn_speedup",
    "model_speedup",
)


def logged_metrics(rule: SelectionRule, record_: dict, metric: str) -> dict[str, float]:
    """The record as MLflow metrics, `<name>/<rule label>` (e.g. test_accuracy/budget_0.2)."""
    names = (f"test_{metric}", f"relative_{metric}", *MEASURES)
    return {f"{name}/{rule.label.replace(' ', '_')}": record_[name] for name in names}
