"""Expert selectors ("routers"): given a token's FFN input x, score the experts of one layer.

All three share one call signature, `router(x, h) -> scores [..., E]`, so the MoE layer does not
care which it has; only the ground-truth oracle reads the neuron activations h.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

SELECTORS = ("groundtruth", "similarity", "mlp")


def expert_mass(h: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Sum of |h| over each expert's neurons: the ground-truth expert score.

    With ReLU, h >= 0 and this is MoEfication's sum of positive activations. A gated neuron's
    h = act(gate) * up is negative whenever up is, and it moves the output just as much, so the
    score counts magnitude, not sign (as does any activation that goes below zero, like GELU).
    """
    out = h.new_zeros(*h.shape[:-1], num_experts)
    return out.index_add_(-1, labels, h.abs())


def expert_centroids(w_in: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Mean of each expert's L2-normalised key rows (W_in, or the gate of a gated FFN), [E, d]."""
    rows = F.normalize(w_in.float(), dim=1)
    sums = rows.new_zeros(num_experts, rows.shape[1]).index_add_(0, labels, rows)
    counts = torch.bincount(labels, minlength=num_experts).clamp(min=1).unsqueeze(1)
    return sums / counts


class GroundTruthRouter(nn.Module):
    """The oracle: needs every neuron's activation, so it saves no compute; an upper bound."""

    def __init__(self, labels: torch.Tensor, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.register_buffer("labels", labels.long(), persistent=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return expert_mass(h, self.labels, self.num_experts)

    def flops_per_token(self) -> int:
        return 0


class SimilarityRouter(nn.Module):
    """Pick the experts whose centroid is most similar to the token (no training)."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return x @ self.centroids.t()

    def flops_per_token(self) -> int:
        num_experts, d_model = self.centroids.shape
        return 2 * num_experts * d_model


class MLPRouter(nn.Module):
    """MoEfication's router: Linear(d, E) -> tanh -> Linear(E, E), trained to predict expert mass.

    Initialised at the similarity router (centroids, identity), so training starts from it.
    """

    def __init__(self, d_model: int, num_experts: int, centroids: torch.Tensor | None = None):
        super().__init__()
        self.fc1 = nn.Linear(d_model, num_experts)
        self.fc2 = nn.Linear(num_experts, num_experts)
        if centroids is not None:
            with torch.no_grad():
                self.fc1.weight.copy_(centroids)
                self.fc1.bias.zero_()
                self.fc2.weight.copy_(torch.eye(num_experts))
                self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))

    def flops_per_token(self) -> int:
        num_experts, d_model = self.fc1.weight.shape
        return 2 * num_experts * d_model + 2 * num_experts * num_experts


def scaled_mass(mass: torch.Tensor) -> torch.Tensor:
    """Each token's expert masses divided by its largest one: the router's BCE target in [0, 1]."""
    return mass / mass.amax(dim=-1, keepdim=True).clamp(min=1e-12)


def topk_recall(scores: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Activation mass in the selector's top-k experts over the mass in the oracle's top-k."""
    picked = mass.gather(-1, scores.topk(k, dim=-1).indices).sum(-1)
    best = mass.topk(k, dim=-1).values.sum(-1)
    keep = best > 0
    if not keep.any():
        return 1.0
    return float((picked[keep] / best[keep]).mean())


@dataclass
class TrainResult:
    router: MLPRouter
    epochs_run: int
    best_epoch: int
    best_heldout_loss: float
    initial_heldout_loss: float


def train_mlp_router(
    x_train: torch.Tensor,
    target_train: torch.Tensor,
    x_heldout: torch.Tensor,
    target_heldout: torch.Tensor,
    centroids: torch.Tensor,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    seed: int,
    desc: str = "router",
) -> TrainResult:
    """Fit an MLPRouter with BCE on scaled expert mass; keep the epoch with the lowest held-out loss."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = MLPRouter(x_train.shape[1], centroids.shape[0], centroids)
    optimizer = torch.optim.Adam(router.parameters(), lr=learning_rate)

    def heldout_loss() -> float:
        with torch.no_grad():
            return float(F.binary_cross_entropy_with_logits(router(x_heldout), target_heldout))

    best_loss = initial = heldout_loss()
    best_state, best_epoch, stale, epoch = copy.deepcopy(router.state_dict()), 0, 0, 0
    steps = math.ceil(len(x_train) / batch_size)
    for epoch in tqdm(range(1, epochs + 1), desc=desc, unit="epoch", leave=False, mininterval=2):
        order = torch.randperm(len(x_train), generator=generator)
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss = F.binary_cross_entropy_with_logits(router(x_train[idx]), target_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss = heldout_loss()
        if loss < best_loss - 1e-6:
            best_loss, best_state, best_epoch, stale = loss, copy.deepcopy(router.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= patience:
                break
    router.load_state_dict(best_state)
    return TrainResult(router, epoch, best_epoch, best_loss, initial)


def budget_to_k(budget: float, num_experts: int) -> int:
    """Experts per token for a top-k ratio: round(budget * E), at least 1."""
    return int(min(num_experts, max(1, np.floor(budget * num_experts + 0.5))))


def router_tensors(routers: dict[int, nn.Module]) -> dict[str, torch.Tensor]:
    """All routers' weights in one flat dict, keys `layer.{i}.<param>` (the oracle has none)."""
    return {f"layer.{i}.{name}": t for i, router in routers.items() for name, t in router.state_dict().items()}


def build_routers(
    selector: str, tensors: dict[str, torch.Tensor], labels: dict[int, torch.Tensor], num_experts: int
) -> dict[int, nn.Module]:
    """Rebuild each layer's router from `router_tensors` output."""
    routers: dict[int, nn.Module] = {}
    for i, layer_labels in labels.items():
        own = {k.split(".", 2)[2]: t for k, t in tensors.items() if k.startswith(f"layer.{i}.")}
        if selector == "groundtruth":
            routers[i] = GroundTruthRouter(layer_labels, num_experts)
            continue
        if selector == "similarity":
            routers[i] = SimilarityRouter(own["centroids"])
        else:
            routers[i] = MLPRouter(own["fc1.weight"].shape[1], num_experts)
        routers[i].load_state_dict(own)
    return routers
