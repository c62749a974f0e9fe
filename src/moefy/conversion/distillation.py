"""D2DMoE's distillation of an attention projection into a ReLU MLP (a ProjectionMLP), trained on
the projection's own inputs with the backbone frozen.

The MLP starts from the projection itself: a linear map W = U S V^T is exactly
relu(V^T x) - relu(-V^T x) pushed through U S, so 2r neurons reproduce the rank-r part of W
before any training (2 min(d_in, d_out) reproduce W exactly), half of them off for any token.
Training then fits what the truncated rank left out with the remaining neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moefy.adapters.ffn import ProjectionMLP
from moefy.errors import MoefyError
from moefy.training import convergence


def svd_start(linear: nn.Linear, width: int, rank: int | None = None) -> ProjectionMLP:
    """The MLP that computes the best rank-`rank` approximation of `linear` exactly with 2 x rank
    neurons (default: half the width); the other neurons start random with no output.

    Spare neurons matter: the truncated start alone is a critical point of the MSE (the residual
    is orthogonal to every pair's output), so training barely moves it; the spare ones get a
    gradient at once and fit the residual.
    """
    rank = width // 4 if rank is None else rank
    if width < 2 or not 1 <= 2 * rank <= width:
        raise MoefyError(f"a projection MLP of width {width} cannot hold rank {rank}: need 2 <= 2 x rank <= width")
    weight = linear.weight.detach().float()
    d_out, d_in = weight.shape
    mlp = ProjectionMLP(d_in, width, d_out).to(weight.device)
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = min(rank, len(s))
    root = s[:rank].sqrt()
    keys = root[:, None] * vh[:rank]  # [r, d_in]
    values = u[:, :rank] * root  # [d_out, r]
    with torch.no_grad():
        mlp.w_in.weight.zero_()
        mlp.w_in.bias.zero_()
        mlp.w_out.weight.zero_()
        mlp.w_in.weight[:rank] = keys
        mlp.w_in.weight[rank : 2 * rank] = -keys
        mlp.w_out.weight[:, :rank] = values
        mlp.w_out.weight[:, rank : 2 * rank] = -values
        mlp.w_out.bias.copy_(linear.bias.detach() if linear.bias is not None else torch.zeros(d_out))
        if width > 2 * rank:  # spare neurons start small and random: training gives them a use
            nn.init.normal_(mlp.w_in.weight[2 * rank :], std=d_in**-0.5)
    return mlp.to(linear.weight.dtype)


def width_for(d_in: int, d_out: int, flops_factor: float, multiple: int = 1) -> int:
    """The MLP width whose two matrices cost `flops_factor` times the projection's FLOPs
    (1.0: the same FLOPs as the projection, D2DMoE's parametrisation), rounded up to a multiple of
    `multiple` (so that it splits into that many equal experts)."""
    width = max(2, round(flops_factor * d_in * d_out / (d_in + d_out)))
    return -(-width // multiple) * multiple


def r_squared(predicted: torch.Tensor, target: torch.Tensor) -> float:
    """1 - residual / total variance over every output coordinate (1.0: exact, 0.0: the mean)."""
    residual = (predicted - target).double().square().sum()
    total = (target.double() - target.double().mean(0)).square().sum()
    return float(1 - residual / total) if total > 0 else float(residual == 0)


@dataclass(frozen=True)
class DistillSettings:
    learning_rate: float = 1e-3
    batch_size: int = 1024
    max_epochs: int = 50
    patience: int = 3  # epochs without a better held-out MSE before stopping


@dataclass(frozen=True)
class DistillResult:
    mse_initial: float  # held-out, before training (the truncated-SVD start)
    mse: float  # held-out, of the kept (best) weights
    r2: float  # held-out
    epochs: int
    best_epoch: int = 0  # the kept weights' epoch (0: the start was never beaten)
    stopped_at_cap: bool = False  # the last epoch was the best: max_epochs ended it still improving


def held_out_mse(mlp: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(mlp(x), y))


def distill(
    mlp: ProjectionMLP,
    train: tuple[torch.Tensor, torch.Tensor],
    held_out: tuple[torch.Tensor, torch.Tensor],
    settings: DistillSettings = DistillSettings(),
    seed: int = 0,
) -> DistillResult:
    """Fit `mlp` to (inputs, outputs) pairs of one projection with MSE, keeping the weights with the
    lowest held-out MSE and stopping after `patience` epochs without improvement, or at max_epochs
    (then, if the last epoch was the best, it stopped at its cap while still improving:
    moefy.training.convergence)."""
    (x, y), (x_val, y_val) = train, held_out
    if len(x) == 0 or len(x_val) == 0:
        raise MoefyError("distilling a projection needs training and held-out tokens; sample more tokens")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=settings.learning_rate)
    initial = best = held_out_mse(mlp, x_val, y_val)
    best_state = {k: v.clone() for k, v in mlp.state_dict().items()}
    stale = epochs = best_epoch = 0
    while epochs < settings.max_epochs and stale < settings.patience:
        epochs += 1
        for rows in torch.randperm(len(x), generator=generator).split(settings.batch_size):
            rows = rows.to(x.device)
            loss = nn.functional.mse_loss(mlp(x[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        current = held_out_mse(mlp, x_val, y_val)
        if current < best:
            best, stale, best_epoch = current, 0, epochs
            best_state = {k: v.clone() for k, v in mlp.state_dict().items()}
        else:
            stale += 1
    mlp.load_state_dict(best_state)
    with torch.no_grad():
        r2 = r_squared(mlp(x_val), y_val)
    return DistillResult(initial, best, r2, epochs, best_epoch, convergence.stopped_at_cap(best_epoch, epochs))
