"""What the MoE training step optimises, and what it trains.

The loss is the task's, plus optional distillation from the dense teacher's logits (KL at
temperature T, weight alpha: (1 - alpha) * task + alpha * T^2 * KL, as in Hinton et al.), plus the
routers' auxiliary losses summed over MoE layers (Switch's load balancing, ST-MoE's z-loss), each
with its own weight. A converted FFN trains as a SparseMoE whose experts are permuted blocks of
the FFN's neurons, so its trained weights go back into the FFN's own layout (`write_back`): the
recovered model is a standard checkpoint, and the evaluate step measures it at every budget with
the same labels and router as the unrecovered one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moefy import dist
from moefy.adapters.ffn import FFN
from moefy.data.batches import eval_batches, iterate
from moefy.errors import MoefyError
from moefy.moe.layer import expert_order
from moefy.moe.sparse import SparseMoE
from moefy.training.lora import adapter_parameters

TRAINABLE = ("experts", "routers", "experts_and_routers", "lora", "all")


@dataclass(frozen=True)
class LossWeights:
    distill: float = 0.0  # alpha: share of the distillation term
    temperature: float = 2.0
    load: float = 0.0  # Switch's load loss; the article's decoders: 0.01
    z: float = 0.0

    def __post_init__(self):
        if not 0 <= self.distill <= 1 or self.temperature <= 0 or self.load < 0 or self.z < 0:
            raise MoefyError(f"loss weights: distill must be in [0, 1], temperature > 0, load and z >= 0; got {self}")


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the softened distributions over the last axis, averaged over
    rows (examples, or the real positions of a causal LM where `mask` is given)."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    if mask is not None:
        kl = kl[mask]
    return temperature**2 * kl.mean()


@torch.no_grad()
def heldout_distillation(model, teacher, encoded, batch_size: int, ctx, temperature: float, causal: bool) -> float:
    """The distillation loss over held-out texts (all ranks): how far the MoE is from the dense model."""
    sums = torch.zeros(2, dtype=torch.float64)
    for _, inputs, logits in iterate(model, encoded, eval_batches(encoded, batch_size, ctx), ctx, "distillation"):
        mask = inputs["attention_mask"].bool() if causal else None
        rows = int(mask.sum()) if causal else logits.shape[0]
        loss = distillation_loss(logits, teacher(**inputs).logits, temperature, mask)
        sums += torch.tensor([float(loss) * rows, rows], dtype=torch.float64)
    dist.all_reduce_sum(sums, ctx)
    return float(sums[0] / max(1.0, float(sums[1])))


def auxiliary_loss(moes: Iterable[SparseMoE], weights: LossWeights) -> torch.Tensor | None:
    """load * sum of load losses + z * sum of z-losses over the layers; None if both are off."""
    if weights.load == 0 and weights.z == 0:
        return None
    total = None
    for moe in moes:
        load, z = moe.auxiliary_losses()
        term = weights.load * load + weights.z * z
        total = term if total is None else total + term
    return total


def expert_parameters(moe: SparseMoE) -> list[nn.Parameter]:
    return [p for name, p in moe.named_parameters() if not name.startswith(("router.", "gate."))]


def select_trainable(model: nn.Module, moes: Iterable[SparseMoE], which: str) -> list[nn.Parameter]:
    """Freeze all but `which` (experts, routers, experts_and_routers, lora: the experts and the LoRA
    adapters moefy.training.lora.add_lora put in, all); returns the trained ones."""
    if which not in TRAINABLE:
        raise MoefyError(f"trainable {which!r} is not one of {', '.join(TRAINABLE)}")
    moes = list(moes)
    if which != "all" and not moes:
        raise MoefyError(f"trainable {which!r} names MoE parts, but the model has no MoE layer; use trainable: all")
    if "routers" in which and any(moe.routing.kind == "unweighted_top_k" for moe in moes):
        raise MoefyError(
            "MoEfication's routers pick experts without weighting them, so the task loss gives them no gradient: "
            "train the experts (trainable: experts) and retrain the router with the router step if needed"
        )
    adapters = []
    if which == "lora":
        adapters = adapter_parameters(model)
        if not adapters:
            raise MoefyError(
                "trainable 'lora' trains LoRA adapters beside the experts, but the model has none: "
                "add them first (moefy.training.lora.add_lora)"
            )
    for p in model.parameters():
        p.requires_grad_(which == "all")
    for moe in moes:
        for p in expert_parameters(moe):
            p.requires_grad_(which in ("all", "experts", "experts_and_routers", "lora"))
        for p in moe.router.parameters():
            p.requires_grad_(which in ("all", "routers", "experts_and_routers") and moe.routing.kind != "unweighted_top_k")
        if moe.gate is not None:  # softmax gates: the router weighs its picks, and trains with them
            for p in (*moe.router.parameters(), *moe.gate.parameters()):
                p.requires_grad_(True)
    for p in adapters:
        p.requires_grad_(True)
    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained:
        raise MoefyError(f"trainable {which!r} leaves nothing to train in this model")
    return trained


def load_statistics(moes: dict[int, SparseMoE], reset: bool = True) -> dict[str, float]:
    """Per layer and overall: the busiest expert's share of pairs over the mean share (1 = balanced),
    and the share of tokens no expert took (expert choice)."""
    stats: dict[str, float] = {}
    ratios, dropped, seen = [], 0, 0
    for index, moe in moes.items():
        load = moe.load.double()
        ratio = float(load.max() / load.mean()) if load.sum() > 0 else 0.0
        stats[f"load_max_over_mean/layer_{index}"] = ratio
        stats[f"dropped_share/layer_{index}"] = moe.tokens_dropped / max(1, moe.tokens_seen)
        ratios.append(ratio)
        dropped, seen = dropped + moe.tokens_dropped, seen + moe.tokens_seen
        if reset:
            moe.reset_statistics()
    if moes:
        stats["load_max_over_mean"] = max(ratios)
        stats["dropped_share"] = dropped / max(1, seen)
    return stats


@torch.no_grad()
def write_back(ffn: FFN, moe: SparseMoE, labels: torch.Tensor) -> None:
    """Copy a from_split MoE's trained experts, shared ones included, into the FFN's own
    projections (neuron order restored)."""
    E, s = moe.num_experts, moe.expert_size
    shared = 0 if moe.shared is None else moe.shared.w_out.shape[0]
    if moe.expert_bias is not None or E * s + shared != ffn.d_ff:
        raise MoefyError("write_back takes an MoE made by from_split from this FFN")
    everything = expert_order(labels.to(ffn.w_in.weight.device), ffn.d_ff // s)
    order = everything[: E * s]

    def rows(block: torch.Tensor) -> torch.Tensor:  # [E, d, s] -> [d_ff, d] in expert order
        return block.transpose(1, 2).reshape(E * s, -1)

    ffn.w_in.weight[order] = rows(moe.w_in).to(ffn.w_in.weight.dtype)
    if ffn.w_gate is not None:
        ffn.w_gate.weight[order] = rows(moe.w_gate).to(ffn.w_gate.weight.dtype)
    for linear, bias in ((ffn.w_in, moe.b_in), (ffn.w_gate, moe.b_gate)):
        if linear is not None and linear.bias is not None:
            linear.bias[order] = bias.reshape(-1).to(linear.bias.dtype)
    ffn.w_out.weight[:, order] = moe.w_out.reshape(E * s, -1).t().to(ffn.w_out.weight.dtype)
    if ffn.w_out.bias is not None:
        ffn.w_out.bias.copy_(moe.shared_bias)
    if moe.shared is not None:
        neurons, block = everything[E * s :], moe.shared
        for linear, weight, bias in ((ffn.w_in, block.w_in, block.b_in), (ffn.w_gate, block.w_gate, block.b_gate)):
            if linear is not None:
                linear.weight[neurons] = weight.t().to(linear.weight.dtype)
                if linear.bias is not None:
                    linear.bias[neurons] = bias.to(linear.bias.dtype)
        ffn.w_out.weight[:, neurons] = block.w_out.t().to(ffn.w_out.weight.dtype)
