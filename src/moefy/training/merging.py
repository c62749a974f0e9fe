"""Merging the experts of a sparse MoE (M-SMoE, Li et al., ICLR 2024), and the baselines it is ranked against.

M-SMoE, per MoE layer:
1. calibration: how often the router uses each expert, and its logits on calibration tokens;
2. the most-used experts are the dominant ones, one group each. With global grouping one
   threshold on the usage share holds across layers, so a layer with a flat usage keeps more
   groups and a peaked one fewer, the average staying the requested count (each layer >= 1);
3. every other expert joins the dominant expert it is most similar to: the cosine of their
   router-logit columns over the calibration tokens (default), or of their flattened weights;
4. members are aligned to their group's dominant expert by a neuron permutation (weight
   matching: the linear assignment maximising the dot products of the neurons' input rows, gate
   rows, biases and output columns, so a gated FFN aligns on gate and up rows together), then
   averaged with their usage frequencies as weights.
The router keeps its E outputs; a token sent to any member goes to its group's expert (the
layer's expert_map). Baselines: `average` (same groups, plain mean, no alignment), `frequency`
(frequency-weighted, no alignment), `prune` (keep the dominant experts only, the router's rows of
the others removed, so its softmax renormalises over the kept ones).
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from moefy.errors import MoefyError
from moefy.moe.sparse import SparseMoE

METHODS = ("average", "frequency", "prune", "msmoe")
SIMILARITIES = ("router_logits", "weights")
GROUPINGS = ("global", "layer")
# A merged model's name, `<method>-G<groups>` then its -kd / -svd steps (chain_of); the patterns are
# also the workflow's wildcard constraints, so a file name and this module never disagree.
METHOD_PATTERN = "|".join(METHODS)
GROUPS_PATTERN = r"\d+(?:\.\d+)?"
STEPS_PATTERN = r"(?:-kd|-svd)*"
CHAIN_PATTERN = rf"(?:{METHOD_PATTERN})-G{GROUPS_PATTERN}{STEPS_PATTERN}"
MERGED_PATTERN = rf"full|{CHAIN_PATTERN}"
CHAIN = re.compile(rf"(?P<method>[a-z]+)-G(?P<groups>{GROUPS_PATTERN})(?P<steps>{STEPS_PATTERN})")
_EXPERT_TENSORS = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "expert_bias")


@dataclass
class Usage:
    """One layer's calibration: pairs per router expert and the Gram matrix of its logit columns."""

    counts: torch.Tensor  # [E] long
    logit_gram: torch.Tensor  # [E, E] float64: sum over tokens of logit_i * logit_j

    @property
    def frequency(self) -> torch.Tensor:
        """Share of the layer's (token, expert) pairs each expert took (sums to 1)."""
        return self.counts.double() / self.counts.sum().clamp(min=1)


@contextmanager
def record_usage(moes: dict[int, SparseMoE]):
    """Within the block, forwards of the model accumulate each layer's Usage (real tokens only)."""
    grams = {i: torch.zeros(m.router_experts, m.router_experts, dtype=torch.float64) for i, m in moes.items()}

    def hook(index):
        def capture(module, args, logits):
            moe = moes[index]
            flat = logits.detach().reshape(-1, logits.shape[-1]).double()
            if moe.token_mask is not None and moe.token_mask.numel() == flat.shape[0]:
                flat = flat[moe.token_mask.reshape(-1).to(flat.device)]
            grams[index] += (flat.t() @ flat).cpu()

        return capture

    for moe in moes.values():
        moe.reset_statistics()
    handles = [moe.router.register_forward_hook(hook(i)) for i, moe in moes.items()]
    usage: dict[int, Usage] = {}
    try:
        yield usage
    finally:
        for handle in handles:
            handle.remove()
    usage.update({i: Usage(moes[i].load.clone(), grams[i]) for i in moes})


def dominant_experts(usage: dict[int, Usage], groups: float, grouping: str = "global") -> dict[int, list[int]]:
    """The dominant experts of every layer, most used first. `groups`: experts per layer after
    merging (global grouping: on average over layers, rounded to a whole total)."""
    if grouping not in GROUPINGS:
        raise MoefyError(f"grouping {grouping!r} is not one of {', '.join(GROUPINGS)}")
    sizes = {i: u.counts.numel() for i, u in usage.items()}
    if not 1 <= groups <= min(sizes.values()):
        raise MoefyError(f"groups per layer must be in 1-{min(sizes.values())} (the layers' expert counts), got {groups}")
    order = {i: torch.argsort(u.frequency, descending=True, stable=True).tolist() for i, u in usage.items()}
    if grouping == "layer":
        if groups != int(groups):
            raise MoefyError(f"layer grouping keeps a whole number of groups per layer, got {groups}")
        return {i: order[i][: int(groups)] for i in usage}
    total = round(groups * len(usage))
    kept = {i: [order[i][0]] for i in usage}  # every layer keeps at least its most-used expert
    # the highest usage shares over all layers, ties to the lower layer, then the lower expert
    candidates = sorted((-float(usage[i].frequency[e]), i, e) for i in usage for e in order[i][1:])
    for _, layer, expert in candidates[: total - len(usage)]:
        kept[layer].append(expert)
    return {i: sorted(kept[i], key=order[i].index) for i in usage}


def similarity(moe: SparseMoE, usage: Usage, kind: str = "router_logits") -> torch.Tensor:
    """[E, E] cosine similarity of the router's experts: their logit columns, or their weights."""
    if kind == "router_logits":
        gram = usage.logit_gram
        norms = gram.diagonal().clamp(min=1e-30).sqrt()
        return gram / norms.unsqueeze(0) / norms.unsqueeze(1)
    if kind == "weights":
        if moe.expert_map is not None:
            raise MoefyError("weight similarity needs one stored expert per router expert; merge the full SMoE")
        flat = torch.cat([t.detach().reshape(moe.num_experts, -1) for t in _tensors(moe).values()], dim=1).double()
        flat = flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-30)
        return flat @ flat.t()
    raise MoefyError(f"similarity {kind!r} is not one of {', '.join(SIMILARITIES)}")


def group_experts(dominant: list[int], sim: torch.Tensor) -> list[list[int]]:
    """Groups, each its dominant expert first, then the others most similar to it."""
    groups = [[d] for d in dominant]
    for expert in range(sim.shape[0]):
        if expert not in dominant:
            best = max(range(len(dominant)), key=lambda g: float(sim[expert, dominant[g]]))
            groups[best].append(expert)
    return groups


def _tensors(moe: SparseMoE) -> dict[str, torch.Tensor]:
    """The layer's expert tensors by name (weights rebuilt if compressed), leading dim = expert."""
    found = {name: moe.weight(name) if name.startswith("w_") else getattr(moe, name) for name in _EXPERT_TENSORS}
    return {name: t.detach() for name, t in found.items() if t is not None}


def neuron_features(tensors: dict[str, torch.Tensor], expert: int) -> torch.Tensor:
    """[s, F]: one row per neuron of `expert` (its input, gate and output weights and biases)."""
    parts = []
    for name, t in tensors.items():
        if name in ("w_in", "w_gate"):
            parts.append(t[expert].t())  # [s, d]
        elif name == "w_out":
            parts.append(t[expert])  # [s, d]
        elif name in ("b_in", "b_gate"):
            parts.append(t[expert].unsqueeze(1))
    return torch.cat(parts, dim=1).double()


def alignment(reference: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """perm [s]: member neuron perm[i] matched to reference neuron i (maximum total dot product)."""
    rows, cols = linear_sum_assignment((reference @ member.t()).numpy(), maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def permute_expert(tensors: dict[str, torch.Tensor], expert: int, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """One expert's tensors with its neurons reordered by perm (outputs unchanged)."""
    out = {}
    for name, t in tensors.items():
        x = t[expert]
        if name in ("w_in", "w_gate"):
            out[name] = x[:, perm]
        elif name == "w_out":
            out[name] = x[perm]
        elif name in ("b_in", "b_gate"):
            out[name] = x[perm]
        else:  # expert_bias: per output feature, not per neuron
            out[name] = x
    return out


def merge_layer(moe: SparseMoE, groups: list[list[int]], usage: Usage, method: str) -> SparseMoE:
    """The layer with one expert per group (see the module docstring for the methods)."""
    if method not in METHODS:
        raise MoefyError(f"merge method {method!r} is not one of {', '.join(METHODS)}")
    if moe.expert_map is not None or moe.factored:
        raise MoefyError("merge a full SMoE: this layer is merged or compressed already")
    tensors = _tensors(moe)
    frequency = usage.frequency
    if method == "prune":
        keep = torch.as_tensor([g[0] for g in groups])
        router = nn.Linear(moe.d_model, len(keep), bias=getattr(moe.router, "bias", None) is not None)
        with torch.no_grad():
            router.weight.copy_(_router_linear(moe).weight[keep])
            if router.bias is not None:
                router.bias.copy_(moe.router.bias[keep])
        merged = {name: t[keep] for name, t in tensors.items()}
        return _rebuilt(moe, merged, router.to(moe.router.weight.dtype), None)
    merged = {name: [] for name in tensors}
    expert_map = torch.empty(moe.router_experts, dtype=torch.long)
    for index, members in enumerate(groups):
        expert_map[members] = index
        if method == "average":
            weights = torch.full((len(members),), 1.0 / len(members), dtype=torch.float64)
        else:
            share = frequency[members]
            weights = share / share.sum() if share.sum() > 0 else torch.full_like(share, 1.0 / len(members))
        reference = neuron_features(tensors, members[0])
        parts = []
        for member in members:
            if method == "msmoe" and member != members[0]:
                perm = alignment(reference, neuron_features(tensors, member))
            else:
                perm = torch.arange(moe.expert_size)
            parts.append(permute_expert(tensors, member, perm))
        for name in tensors:
            stacked = torch.stack([p[name].double() for p in parts])
            shape = (-1,) + (1,) * (stacked.dim() - 1)
            merged[name].append((stacked * weights.view(shape)).sum(0).to(tensors[name].dtype))
    merged = {name: torch.stack(parts) for name, parts in merged.items()}
    return _rebuilt(moe, merged, copy.deepcopy(moe.router), expert_map)


def _router_linear(moe: SparseMoE) -> nn.Linear:
    if not isinstance(moe.router, nn.Linear):
        raise MoefyError("pruning rebuilds the router's rows: it needs a Linear router (an upcycled or Hugging Face SMoE)")
    return moe.router


def _rebuilt(moe: SparseMoE, tensors: dict[str, torch.Tensor], router: nn.Module, expert_map) -> SparseMoE:
    return SparseMoE(
        act=moe.act,
        router=router,
        routing=moe.routing,
        shared_bias=None if moe.shared_bias is None else moe.shared_bias.detach(),
        expert_map=expert_map,
        **tensors,
    )


def merge_model(
    moes: dict[int, SparseMoE],
    usage: dict[int, Usage],
    method: str,
    groups: float,
    grouping: str = "global",
    similarity_kind: str = "router_logits",
) -> tuple[dict[int, SparseMoE], dict[int, list[list[int]]]]:
    """Every layer merged to its groups; returns the new layers and the groups, by layer."""
    missing = sorted(set(moes) - set(usage))
    if missing:
        raise MoefyError(f"no calibration for MoE layers {missing}; calibrate the same model")
    dominant = dominant_experts({i: usage[i] for i in moes}, groups, grouping)
    merged, grouped = {}, {}
    for index, moe in moes.items():
        grouped[index] = group_experts(dominant[index], similarity(moe, usage[index], similarity_kind))
        merged[index] = merge_layer(moe, grouped[index], usage[index], method)
    return merged, grouped


def swap_layers(model: nn.Module, old: dict[int, SparseMoE], new: dict[int, SparseMoE]) -> None:
    """Put each new layer where the old layer of that index sits in `model` (in place): works
    wherever the layer is a child module, inside a dense model's FFN slot or a family's wrapper."""
    where = {id(moe): index for index, moe in old.items()}
    found = set()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if id(child) in where:
                setattr(module, name, new[where[id(child)]])
                found.add(where[id(child)])
    missing = sorted(set(old) - found)
    if missing:
        raise MoefyError(f"MoE layers {missing} are not in the model")


def chain_of(name: str) -> dict[str, object]:
    """What a merged model's name says: `full` (the SMoE as trained), or `<method>-G<groups>` then
    `-kd` (distillation) and `-svd` (compression) in the order applied, e.g. msmoe-G4-kd-svd-kd
    (MC-SMoE: merge, distil, compress, distil)."""
    if name == "full":
        return {"merged": "full", "method": "full", "groups": None, "recovery": "none", "compressed": False}
    match = CHAIN.fullmatch(name)
    if match is None or match["method"] not in METHODS:
        raise MoefyError(
            f"merged model name {name!r} is not `full` or <method>-G<groups> followed by -kd / -svd steps "
            f"(e.g. msmoe-G4-kd-svd-kd), with method one of {', '.join(METHODS)}"
        )
    steps = match["steps"].split("-")[1:]
    compressed = "svd" in steps
    method = match["method"]
    return {
        "merged": name,
        "method": ("mcsmoe" if method == "msmoe" else f"{method}+svd") if compressed else method,
        "groups": float(match["groups"]),
        "recovery": "kd" if "kd" in steps else "none",
        "compressed": compressed,
    }
