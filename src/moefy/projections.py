"""The attention-projection adapter, and D2DMoE's distillation of a projection into a ReLU MLP.

Beside the FFN adapter (moefy.ffn), this is the one place that knows where a model family keeps
its attention projections (q, k, v, o). D2DMoE converts a projection into experts by first
replacing it with a two-layer ReLU MLP that reproduces its output (trained on the projection's own
inputs, backbone frozen); the MLP is then an FFN like any other and can be split and routed.

The MLP starts from the projection itself: a linear map W = U S V^T is exactly
relu(V^T x) - relu(-V^T x) pushed through U S, so 2r neurons reproduce the rank-r part of W
before any training (2 min(d_in, d_out) reproduce W exactly), half of them off for any token.
Training then fits what the truncated rank left out with the remaining neurons.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moefy.errors import MoefyError
from moefy.ffn import FFN, _as_linear
from moefy.files import load_tensors, save_tensors

NAMES = ("q", "k", "v", "o")
PROJECTIONS_FILE = "projections.safetensors"  # beside a model's own weights: its distilled projections


@dataclass
class Projection:
    """One attention projection: layer index, which one (q, k, v, o, or qkv where fused), and its
    slot (parent module and attribute), which holds the nn.Linear or, once distilled, its MLP."""

    layer: int
    name: str
    parent: nn.Module
    attribute: str

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def mlp(self) -> ProjectionMLP | None:
        module = getattr(self.parent, self.attribute)
        return module if isinstance(module, ProjectionMLP) else None

    @property
    def linear(self) -> nn.Linear:
        if self.mlp is not None:
            raise MoefyError(f"projection {self.key} is distilled already: it has no nn.Linear")
        return _as_linear(self.parent, self.attribute)

    def replace(self, module: nn.Module) -> None:
        setattr(self.parent, self.attribute, module)


def _slot(parent: nn.Module, attribute: str, layer: int, name: str) -> Projection:
    projection = Projection(layer, name, parent, attribute)
    if projection.mlp is None:
        projection.linear  # noqa: B018  (a GPT-2 Conv1D becomes an nn.Linear now, before any optimizer sees it)
    return projection


def _bert_like(model: nn.Module) -> list[Projection]:
    found = []
    for i, layer in enumerate(model.base_model.encoder.layer):
        attention = layer.attention
        found += [_slot(attention.self, a, i, n) for a, n in (("query", "q"), ("key", "k"), ("value", "v"))]
        found.append(_slot(attention.output, "dense", i, "o"))
    return found


def _distilbert(model: nn.Module) -> list[Projection]:
    found = []
    for i, layer in enumerate(model.base_model.transformer.layer):
        attention = layer.attention
        found += [_slot(attention, f"{n}_lin", i, n) for n in ("q", "k", "v")] + [_slot(attention, "out_lin", i, "o")]
    return found


def _t5(model: nn.Module) -> list[Projection]:
    """Self-attention of every encoder block, then every decoder block (layer indices run on);
    the decoder's cross-attention stays dense."""
    base = model.base_model
    blocks = list(base.encoder.block) + (list(base.decoder.block) if getattr(base, "decoder", None) is not None else [])
    return [_slot(block.layer[0].SelfAttention, n, i, n) for i, block in enumerate(blocks) for n in NAMES]


def _gpt2(model: nn.Module) -> list[Projection]:
    """GPT-2 computes q, k and v with one fused matrix (c_attn), distilled as one projection."""
    found = []
    for i, block in enumerate(model.base_model.h):
        found += [_slot(block.attn, "c_attn", i, "qkv"), _slot(block.attn, "c_proj", i, "o")]
    return found


def _llama_like(model: nn.Module) -> list[Projection]:
    return [_slot(layer.self_attn, f"{n}_proj", i, n) for i, layer in enumerate(model.base_model.layers) for n in NAMES]


_FAMILIES: dict[str, Callable[[nn.Module], list[Projection]]] = {
    **{name: _bert_like for name in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    "distilbert": _distilbert,
    "t5": _t5,
    "gpt2": _gpt2,
    **{name: _llama_like for name in ("llama", "mistral", "qwen2")},
}


def find_projections(model: nn.Module) -> list[Projection]:
    """Every attention projection of `model`, by layer then q, k, v, o."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _FAMILIES:
        raise MoefyError(
            f"attention projections of model type {model_type!r} are not known yet; supported: {', '.join(sorted(_FAMILIES))}"
        )
    return _FAMILIES[model_type](model)


class ProjectionMLP(nn.Module):
    """y = w_out(relu(w_in(x))): the stand-in for one projection, shaped like an FFN."""

    def __init__(self, d_in: int, width: int, d_out: int):
        super().__init__()
        self.w_in = nn.Linear(d_in, width)
        self.act = nn.ReLU()
        self.w_out = nn.Linear(width, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(self.act(self.w_in(x)))

    @property
    def width(self) -> int:
        return self.w_in.out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, width: int, rank: int | None = None) -> ProjectionMLP:
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
        mlp = cls(d_in, width, d_out).to(weight.device)
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


def distilled_ffns(model: nn.Module, start: int) -> list[FFN]:
    """The projections replaced by a ProjectionMLP so far, as FFNs numbered from `start` (layer,
    then q, k, v, o), so that split, routers and MoE layers treat them like any FFN."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES:
        return []
    slots = []
    for parent in model.modules():
        for attribute, child in parent.named_children():
            if isinstance(child, ProjectionMLP):
                slots.append((parent, attribute, child))
    return [
        FFN(start + i, mlp.w_in, mlp.act, mlp.w_out, lambda m, p=parent, a=attribute: setattr(p, a, m), projection=True)
        for i, (parent, attribute, mlp) in enumerate(slots)
    ]


def save_projections(model: nn.Module, folder: str | os.PathLike) -> None:
    """The distilled MLPs of `model` into <folder>/projections.safetensors (none distilled, or a
    family without a projection adapter, such as an SMoE checkpoint: no file)."""
    if getattr(getattr(model, "config", None), "model_type", None) not in _FAMILIES:
        return
    tensors = {f"{p.key}.{k}": v for p in find_projections(model) if p.mlp is not None for k, v in p.mlp.state_dict().items()}
    if tensors:
        save_tensors(Path(folder) / PROJECTIONS_FILE, tensors, {"format": "moefy-projections/1"})


def install_saved_projections(model: nn.Module, folder: str | os.PathLike) -> int:
    """Put the MLPs saved in <folder>/projections.safetensors in their projections' place; how many."""
    path = Path(folder) / PROJECTIONS_FILE
    if not path.is_file():
        return 0
    tensors = load_tensors(path)
    installed = 0
    for projection in find_projections(model):
        part = {k[len(projection.key) + 1 :]: v for k, v in tensors.items() if k.startswith(projection.key + ".")}
        if not part:
            continue
        try:
            width, d_in = part["w_in.weight"].shape
            mlp = ProjectionMLP(d_in, width, part["w_out.weight"].shape[0])
            mlp.load_state_dict(part)
        except (KeyError, RuntimeError) as err:
            raise MoefyError(
                f"{path} does not hold a projection MLP for {projection.key} ({err}); rerun its distill job"
            ) from None
        projection.replace(mlp.to(next(model.parameters()).dtype))
        installed += 1
    if installed * 4 < len(tensors):  # each MLP has 4 tensors
        raise MoefyError(f"{path} holds projections this model does not have; it belongs to another model: rerun its distill job")
    return installed


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
    lowest held-out MSE and stopping after `patience` epochs without improvement."""
    (x, y), (x_val, y_val) = train, held_out
    if len(x) == 0 or len(x_val) == 0:
        raise MoefyError("distilling a projection needs training and held-out tokens; sample more tokens")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(mlp.parameters(), lr=settings.learning_rate)
    initial = best = held_out_mse(mlp, x_val, y_val)
    best_state = {k: v.clone() for k, v in mlp.state_dict().items()}
    stale = epochs = 0
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
            best, stale = current, 0
            best_state = {k: v.clone() for k, v in mlp.state_dict().items()}
        else:
            stale += 1
    mlp.load_state_dict(best_state)
    with torch.no_grad():
        r2 = r_squared(mlp(x_val), y_val)
    return DistillResult(initial, best, r2, epochs)
