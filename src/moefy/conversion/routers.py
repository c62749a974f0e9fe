"""Expert routers: given a token's FFN input x, score the experts of one layer.

All share one call signature, `router(x, h) -> scores [..., E]`, so the MoE layer does not care
which it has; only the ground-truth oracle reads the neuron activations h. Top-k needs only the
scores' order; dynamic-k compares each score with the token's largest, so every router also
gives `contribution(x, h)`: a non-negative estimate of how much each expert adds to the output.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from moefy.config import ROUTERS, check_names
from moefy.errors import MoefyError
from moefy.native import ACTIVATIONS, activation_code
from moefy.training import convergence


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
    """The oracle: needs every neuron's activation, so it saves no compute; an upper bound. It
    scores the routed experts, the first `routed` of the labels' (moefy.conversion.shared)."""

    needs_activations = True

    def __init__(self, labels: torch.Tensor, num_experts: int, routed: int | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.routed = num_experts if routed is None else routed
        self.register_buffer("labels", labels.long(), persistent=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return expert_mass(h, self.labels, self.num_experts)[..., : self.routed]

    contribution = forward

    def flops_per_token(self) -> int:
        return 0


class SimilarityRouter(nn.Module):
    """Pick the experts whose centroid is most similar to the token (no training)."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return x @ self.centroids.t()

    def contribution(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return self(x).clamp(min=0)  # an expert pointing away from the token is expected to add nothing

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

    def contribution(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self(x))  # it was trained to predict expert mass / the token's largest

    def flops_per_token(self) -> int:
        num_experts, d_model = self.fc1.weight.shape
        return 2 * num_experts * d_model + 2 * num_experts * num_experts


class LinearRouter(nn.Module):
    """One linear map d -> E, no bias: the router of the served MoE formats (the sparse
    decoders that serving runtimes load), trained as the mlp router is (BCE of its logits against each expert's mass over the
    token's largest) from the experts' centroids. Unweighted it picks; with a SoftmaxGate
    (recovery `task-softmax`, `kd-softmax`) its logits also weigh the experts it picks.
    """

    def __init__(self, d_model: int, num_experts: int, centroids: torch.Tensor | None = None):
        super().__init__()
        self.proj = nn.Linear(d_model, num_experts, bias=False)
        if centroids is not None:
            with torch.no_grad():
                self.proj.weight.copy_(centroids)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x)

    def contribution(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self(x))  # trained to predict expert mass / the token's largest

    def flops_per_token(self) -> int:
        num_experts, d_model = self.proj.weight.shape
        return 2 * num_experts * d_model


class SoftmaxGate(nn.Module):
    """Softmax gates over a linear router's logits z [T, E]: an expert a token picked gets
    E * softmax(scale * z), over all E routed experts and not renormalised over the picks (the
    served formats' top-k softmax with `norm_topk_prob` off), 0 if not picked. The picks are the
    top k of those probabilities, computed as the served formats compute them, so that a served
    copy (router scale * W, E folded into the experts' output weights) picks the same experts.

    `scale` starts at MIN_SCALE and never goes below it (training projects it back after every
    step): near 0 the gates are about 1, the unweighted top-k MoE that recovery starts from, and
    above 0 the top-k of the softmax are the top-k of z, as a served router needs.
    """

    MIN_SCALE = 0.01  # gates within exp(+-0.01 * the logits' spread) of 1 at the start

    def __init__(self, scale: float = MIN_SCALE):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(scale * z) in float32 [T, E], what the picks and the gates are read from."""
        return (self.scale * logits.float()).softmax(-1)

    def pick(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """The k experts of largest probability per token [T, k]."""
        return self.probabilities(logits).topk(k, dim=-1, sorted=False).indices

    def forward(self, logits: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """Gates [T, E] for router logits [T, E] and picks [T, E] bool."""
        return (logits.shape[-1] * self.probabilities(logits) * picked).to(logits.dtype)

    @torch.no_grad()
    def keep_scale_above_floor(self) -> None:
        """Project the scale back to MIN_SCALE after an optimizer step that took it below."""
        self.scale.clamp_(min=self.MIN_SCALE)


class NormRouter(nn.Module):
    """D2DMoE's router: Linear(d, H) -> ReLU -> Linear(H, E) -> softplus, trained with MSE to predict
    the L2 norm of each expert's output (relative to the layer's mean norm).

    Softplus keeps the prediction non-negative without the dead outputs a final ReLU can get
    stuck in under MSE.
    """

    def __init__(self, d_model: int, num_experts: int, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, num_experts)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return F.softplus(self.fc2(F.relu(self.fc1(x))))

    contribution = forward

    def flops_per_token(self) -> int:
        hidden, d_model = self.fc1.weight.shape
        return 2 * hidden * d_model + 2 * hidden * self.fc2.out_features


class RepresentativeRouter(nn.Module):
    """CMoE's training-free router: each expert is scored by the magnitude of its representative
    neurons' activations, computed from the FFN's own rows (W_in, and the gate of a gated FFN), times
    a per-expert scale fitted in closed form so that the score estimates the expert's mass.

    No gradient step: the representatives (the neurons whose |h| follows their expert's mass most
    closely on the calibration tokens) and the scales (least squares, one number per expert) come
    from the activations step's token sample.
    """

    def __init__(
        self,
        w_in: torch.Tensor,
        b_in: torch.Tensor | None,
        w_gate: torch.Tensor | None,
        b_gate: torch.Tensor | None,
        scale: torch.Tensor,
        act_code: int,
    ):
        super().__init__()
        if act_code not in ACTIVATIONS:
            raise MoefyError(f"activation code {act_code} is not one the representative router computes ({sorted(ACTIVATIONS)})")
        self.num_experts = len(scale)
        self.w_in = nn.Parameter(w_in.clone(), requires_grad=False)  # [E * m, d], expert-major
        self.b_in = None if b_in is None else nn.Parameter(b_in.clone(), requires_grad=False)
        self.w_gate = None if w_gate is None else nn.Parameter(w_gate.clone(), requires_grad=False)
        self.b_gate = None if b_gate is None else nn.Parameter(b_gate.clone(), requires_grad=False)
        self.scale = nn.Parameter(scale.clone(), requires_grad=False)  # [E]
        self.register_buffer("act_code", torch.tensor(act_code))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> RepresentativeRouter:
        return cls(
            tensors["w_in"],
            tensors.get("b_in"),
            tensors.get("w_gate"),
            tensors.get("b_gate"),
            tensors["scale"],
            int(tensors["act_code"]),
        )

    def representatives(self, x: torch.Tensor) -> torch.Tensor:
        """|h| of every expert's representative neurons, [..., E, m]."""
        act = ACTIVATIONS[int(self.act_code)]
        up = F.linear(x, self.w_in, self.b_in)
        h = act(up) if self.w_gate is None else act(F.linear(x, self.w_gate, self.b_gate)) * up
        return h.abs().unflatten(-1, (self.num_experts, -1))

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        return self.representatives(x).sum(-1) * self.scale

    contribution = forward  # a non-negative estimate of the expert's mass

    def flops_per_token(self) -> int:
        rows, d_model = self.w_in.shape
        return 2 * rows * d_model * (1 if self.w_gate is None else 2) + 2 * rows


class _CorrelationSums:
    """Running sums for the Pearson correlation of every neuron's |h| with its expert's mass."""

    def __init__(self, neurons: int):
        self.n = 0
        self.a, self.b, self.aa, self.bb, self.ab = (torch.zeros(neurons, dtype=torch.float64) for _ in range(5))

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.n += len(a)
        self.a += a.sum(0)
        self.b += b.sum(0)
        self.aa += a.square().sum(0)
        self.bb += b.square().sum(0)
        self.ab += (a * b).sum(0)

    def correlation(self) -> torch.Tensor:
        n = max(1, self.n)
        cov = self.ab / n - (self.a / n) * (self.b / n)
        var_a = (self.aa / n - (self.a / n).square()).clamp(min=0)
        var_b = (self.bb / n - (self.b / n).square()).clamp(min=0)
        return cov / (var_a * var_b).sqrt().clamp(min=1e-12)


def representative_router(
    ffn,
    labels: torch.Tensor,
    num_experts: int,
    h: torch.Tensor,
    per_expert: int,
    routed: int | None = None,
    chunk_tokens: int = 4096,
) -> RepresentativeRouter:
    """The representative router of one layer from its neurons' values h [N, d_ff] on calibration
    tokens (ffn.activations of the sampled inputs): per expert, the `per_expert` neurons whose |h|
    correlates best with the expert's mass, and the scale that fits their summed |h| to that mass
    (least squares through the origin). It scores the first `routed` experts (default: all; the
    rest are shared). Tokens go in chunks, so the float64 sums stay at a chunk's [n, d_ff]
    whatever the sample size."""
    code = activation_code(ffn.act)
    if code is None:
        raise MoefyError(
            f"layer {ffn.index}'s activation {type(ffn.act).__name__} is not one the representative router computes "
            "(ReLU, GELU, GELU-tanh, SiLU); use another router for this model"
        )
    size = len(labels) // num_experts
    if not 1 <= per_expert <= size:
        raise MoefyError(f"router.representatives={per_expert} must be between 1 and the expert size {size}")
    sums = _CorrelationSums(len(labels))
    with torch.no_grad():
        for part in h.split(chunk_tokens):
            magnitude = part.abs().double()  # [n, d_ff]
            sums.add(magnitude, expert_mass(magnitude, labels, num_experts)[:, labels])
        order = torch.argsort(labels, stable=True).view(num_experts, size)  # each expert's neurons
        routed = num_experts if routed is None else routed
        order = order[:routed]
        best = sums.correlation()[order].topk(per_expert, dim=1).indices
        chosen = order.gather(1, best).sort(dim=1).values.reshape(-1)  # [R * m], expert-major
        fit = torch.zeros(2, routed, dtype=torch.float64)  # sum(summed * mass), sum(summed^2)
        for part in h.split(chunk_tokens):
            magnitude = part.abs().double()
            summed = magnitude[:, chosen].view(len(part), routed, per_expert).sum(-1)
            mass = expert_mass(magnitude, labels, num_experts)[:, :routed]
            fit += torch.stack([(summed * mass).sum(0), summed.square().sum(0)])
        scale = fit[0] / fit[1].clamp(min=1e-12)

    def rows(linear: nn.Linear | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if linear is None:
            return None, None
        weight = linear.weight.detach()[chosen].float()
        return weight, None if linear.bias is None else linear.bias.detach()[chosen].float()

    (w_in, b_in), (w_gate, b_gate) = rows(ffn.w_in), rows(ffn.w_gate)
    return RepresentativeRouter(w_in, b_in, w_gate, b_gate, scale.float(), code)


def expert_output_norms(
    h: torch.Tensor, w_out: torch.Tensor, labels: torch.Tensor, num_experts: int, chunk_floats: int = 2**24
) -> torch.Tensor:
    """||W_out[:, expert e] h[expert e]||_2 for every token and expert, [N, E]: the norm router's target.

    h [N, d_ff] neuron values, w_out [d, d_ff]. Tokens go in chunks so the [E, n, d] expert outputs
    stay small even for hundreds of experts.
    """
    order = torch.argsort(labels, stable=True)
    size = len(labels) // num_experts
    weights = w_out.t()[order].reshape(num_experts, size, -1)  # [E, s, d]
    step = max(1, chunk_floats // (num_experts * weights.shape[-1]))
    norms = []
    for start in range(0, len(h), step):
        part = h[start : start + step][:, order].reshape(-1, num_experts, size).transpose(0, 1)  # [E, n, s]
        norms.append(torch.linalg.vector_norm(torch.bmm(part, weights), dim=-1).t())
    return torch.cat(norms) if norms else h.new_zeros(0, num_experts)


def scaled_mass(mass: torch.Tensor) -> torch.Tensor:
    """Each token's expert masses divided by its largest one: the router's BCE target in [0, 1]."""
    return mass / mass.amax(dim=-1, keepdim=True).clamp(min=1e-12)


def topk_recall(scores: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Activation mass in the router's top-k experts over the mass in the oracle's top-k."""
    picked = mass.gather(-1, scores.topk(k, dim=-1).indices).sum(-1)
    best = mass.topk(k, dim=-1).values.sum(-1)
    keep = best > 0
    if not keep.any():
        return 1.0
    return float((picked[keep] / best[keep]).mean())


@dataclass
class TrainResult:
    router: nn.Module
    epochs_run: int
    best_epoch: int
    best_heldout_loss: float
    initial_heldout_loss: float

    @property
    def stopped_at_cap(self) -> bool:
        """The last epoch had the best held-out loss: the epoch cap, not patience, ended a router still
        improving (moefy.training.convergence)."""
        return convergence.stopped_at_cap(self.best_epoch, self.epochs_run)


LOSSES = {"mlp": F.binary_cross_entropy_with_logits, "linear": F.binary_cross_entropy_with_logits, "norm": F.mse_loss}
LOSS_NAMES = {"mlp": "bce", "linear": "bce", "norm": "mse"}


def train_router(
    router: nn.Module,
    loss_fn,
    x_train: torch.Tensor,
    target_train: torch.Tensor,
    x_heldout: torch.Tensor,
    target_heldout: torch.Tensor,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    patience: int,
    seed: int,
    desc: str = "router",
) -> TrainResult:
    """Fit `router` with Adam on loss_fn(router(x), target); keep the epoch with the lowest held-out loss."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(router.parameters(), lr=learning_rate)

    def heldout_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(router(x_heldout), target_heldout))

    best_loss = initial = heldout_loss()
    best_state, best_epoch, stale, epoch = copy.deepcopy(router.state_dict()), 0, 0, 0
    steps = math.ceil(len(x_train) / batch_size)
    for epoch in tqdm(range(1, epochs + 1), desc=desc, unit="epoch", leave=False, mininterval=2):
        order = torch.randperm(len(x_train), generator=generator)
        for step in range(steps):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss = loss_fn(router(x_train[idx]), target_train[idx])
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


def active_experts(budget: float, num_experts: int) -> int:
    """Experts active per token, shared ones included, at a top-k ratio: round(budget * E), at most E."""
    return int(min(num_experts, np.floor(budget * num_experts + 0.5)))


def budget_to_k(budget: float, num_experts: int, shared_experts: int = 0) -> int:
    """Routed experts per token for a top-k ratio: active_experts, the shared ones among them; at
    least 1 (a budget no larger than the shared experts is refused)."""
    active = active_experts(budget, num_experts)
    if shared_experts and active <= shared_experts:
        raise MoefyError(
            f"budget {budget:g} activates {active} of {num_experts} experts, no more than the {shared_experts} shared ones: "
            f"give budgets above {shared_experts / num_experts:.3g} or fewer shared experts"
        )
    return max(1, active - shared_experts)


def router_tensors(routers: dict[int, nn.Module], gates: dict[int, SoftmaxGate] | None = None) -> dict[str, torch.Tensor]:
    """All routers' weights in one flat dict, keys `layer.{i}.<param>` (the oracle has none), and
    their softmax gates' as `layer.{i}.gate.<param>`."""
    tensors = {f"layer.{i}.{name}": t for i, router in routers.items() for name, t in router.state_dict().items()}
    for i, gate in (gates or {}).items():
        tensors |= {f"layer.{i}.gate.{name}": t.detach() for name, t in gate.state_dict().items()}
    return tensors


def gates_of(tensors: dict[str, torch.Tensor]) -> dict[int, SoftmaxGate]:
    """The softmax gates among `router_tensors` output, by layer (none: the routers pick unweighted)."""
    gates: dict[int, SoftmaxGate] = {}
    for key, t in tensors.items():
        if key.endswith(".gate.scale"):
            gates[int(key.split(".")[1])] = SoftmaxGate(float(t))
    return gates


def build_routers(
    kind: str, tensors: dict[str, torch.Tensor], labels: dict[int, torch.Tensor], num_experts: int, shared_experts: int = 0
) -> dict[int, nn.Module]:
    """Rebuild each layer's router of kind `kind` (one of ROUTERS) from `router_tensors` output;
    they score the E - S routed experts."""
    routers: dict[int, nn.Module] = {}
    routed = num_experts - shared_experts
    for i, layer_labels in labels.items():
        own = {k.split(".", 2)[2]: t for k, t in tensors.items() if k.startswith(f"layer.{i}.")}
        if kind == "groundtruth":
            routers[i] = GroundTruthRouter(layer_labels, num_experts, routed)
            continue
        if kind == "representative":
            routers[i] = RepresentativeRouter.from_tensors(own)
            continue
        if kind == "similarity":
            routers[i] = SimilarityRouter(own["centroids"])
        elif kind == "norm":
            hidden, d_model = own["fc1.weight"].shape
            routers[i] = NormRouter(d_model, routed, hidden)
        elif kind == "linear":
            own = {k: t for k, t in own.items() if not k.startswith("gate.")}  # a recovery's SoftmaxGate: see gates_of
            routers[i] = LinearRouter(own["proj.weight"].shape[1], routed)
        else:
            routers[i] = MLPRouter(own["fc1.weight"].shape[1], routed)
        routers[i].load_state_dict(own)
    return routers


@dataclass(frozen=True)
class RouterSettings:
    """How trained routers are fitted: the config section `router`."""

    heldout_fraction: float = 0.1
    mlp_epochs: int = 100
    mlp_batch_size: int = 512
    mlp_learning_rate: float = 1.0e-3
    mlp_patience: int = 3
    norm_hidden: int = 128
    representatives: int = 1

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> RouterSettings:
        """The settings among `values` (parsed step flags, or a config section)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def heldout_count(tokens: int, settings: RouterSettings) -> int:
    """How many of the last sampled tokens a router is judged on (never trained on)."""
    return max(1, int(round(tokens * settings.heldout_fraction)))


def fit_router(
    kind: str,
    ffn,
    labels: torch.Tensor,
    x: torch.Tensor,
    num_experts: int,
    settings: RouterSettings,
    budgets: Sequence[float],
    seed: int,
    shared_experts: int = 0,
) -> tuple[nn.Module, dict[str, float]]:
    """One layer's router of kind `kind` (one of ROUTERS), built from the FFN inputs x [N, d] sampled
    by the activations step, and its held-out statistics: training curve for the trained routers, and
    recall of the oracle's activation mass at each budget (on the last heldout_fraction of x). It
    scores the E - S routed experts, the first of the labels' (moefy.conversion.shared)."""
    check_names("router", kind, ROUTERS)
    E, R = num_experts, num_experts - shared_experts
    with torch.no_grad():
        h = ffn.activations(x)
        mass = expert_mass(h, labels, E)[:, :R]
    heldout = heldout_count(len(x), settings)
    x_fit, x_val, mass_val = x[:-heldout], x[-heldout:], mass[-heldout:]
    centroids = expert_centroids(ffn.keys, labels, E)[:R]
    stats: dict[str, float] = {}
    if kind == "groundtruth":
        router: nn.Module = GroundTruthRouter(labels, E, R)
    elif kind == "similarity":
        router = SimilarityRouter(centroids)
    elif kind == "representative":
        router = representative_router(ffn, labels, E, h[:-heldout], settings.representatives, R)
    else:
        torch.manual_seed(seed)
        if kind == "mlp":
            router, target = MLPRouter(x.shape[1], R, centroids), scaled_mass(mass)
        elif kind == "linear":
            router, target = LinearRouter(x.shape[1], R, centroids), scaled_mass(mass)
        else:
            with torch.no_grad():
                norms = expert_output_norms(h, ffn.w_out.weight.detach(), labels, E)[:, :R]
            router, target = NormRouter(x.shape[1], R, settings.norm_hidden), norms / norms[:-heldout].mean().clamp(min=1e-12)
        fit = train_router(
            router.to(x.device),
            LOSSES[kind],
            x_fit,
            target[:-heldout],
            x_val,
            target[-heldout:],
            epochs=settings.mlp_epochs,
            batch_size=settings.mlp_batch_size,
            learning_rate=settings.mlp_learning_rate,
            patience=settings.mlp_patience,
            seed=seed,
            desc=f"layer {ffn.index}",
        )
        router, loss = fit.router, LOSS_NAMES[kind]
        stats = {
            "epochs_run": fit.epochs_run,
            "best_epoch": fit.best_epoch,
            f"heldout_{loss}": fit.best_heldout_loss,
            f"heldout_{loss}_initial": fit.initial_heldout_loss,
            convergence.KEY: fit.stopped_at_cap,
        }
    with torch.no_grad():
        scores = router(x_val, h[-heldout:])
    for budget in budgets:
        if active_experts(budget, E) > shared_experts:  # a budget the shared experts fill has no routed pick
            stats[f"recall@{budget:g}"] = topk_recall(scores, mass_val, budget_to_k(budget, E, shared_experts))
    return router.cpu(), stats
