"""Merging and pruning the experts of a sparse MoE: M-SMoE (Li et al., ICLR 2024), HC-SMoE, REAP,
and the baselines they are ranked against.

Every method reads one calibration pass (record_usage) and first gives each MoE layer its budget,
the experts (or groups) it keeps (layer_budgets): the same count in every layer (`layer`
grouping), or one global count, round(groups x layers), spread over the layers by one threshold on
a measured share, each layer keeping at least 1: the expert's share of its layer's usage
(`global`: a layer with a flat usage keeps more, a peaked one fewer) or of its layer's REAP
scores (`reap`). Then, per layer:
- M-SMoE (`msmoe`): the budget's most-used experts are the dominant ones, one group each; every
  other expert joins the dominant expert it is most similar to: the cosine of their router-logit
  columns over the calibration tokens (default), or of their flattened weights. Members are
  aligned to their group's dominant expert by a neuron permutation (weight matching: the linear
  assignment maximising the dot products of the neurons' input rows, gate rows, biases and output
  columns, so a gated FFN aligns on gate and up rows together), then averaged with their usage
  frequencies as weights. Baselines on the same groups: `average` (plain mean, no alignment),
  `frequency` (frequency-weighted, no alignment), `prune` (the dominant experts kept, the others
  dropped).
- HC-SMoE (`hcsmoe`, Chen et al., ICML 2025): groups by average-linkage agglomerative clustering
  of the experts' mean outputs over the calibration tokens (every token through every expert,
  Euclidean distance), then frequency-weighted merging as `frequency`, no alignment, no retraining.
- REAP (`reap`, Lasby et al., ICLR 2026): the budget's highest-scored experts kept, the others
  dropped; an expert's score is the mean, over the tokens routed to it, of its gate times the L2
  norm of its output.
A merged layer keeps its router over the E experts; a token sent to any member goes to its group's
expert (the layer's expert_map). A pruned layer (prune, reap) loses the router rows of the dropped
experts, so the router's softmax runs over the kept experts only: each kept probability becomes
p_e / (sum of the kept p), and a token whose top-k picks all survive keeps them, with the same
gates where the routing renormalises over the k picks (and gates scaled by 1 / that sum where not).
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
from moefy.moe.sparse import Dispatch, SparseMoE

METHODS = ("average", "frequency", "prune", "msmoe", "hcsmoe", "reap")
SIMILARITIES = ("router_logits", "weights")
GROUPINGS = ("global", "reap", "layer")
# A merged model's name, `<method>-G<groups>` then its -kd / -svd steps (chain_of); the patterns are
# also the workflow's wildcard constraints, so a file name and this module never disagree.
METHOD_PATTERN = "|".join(METHODS)
GROUPS_PATTERN = r"\d+(?:\.\d+)?"
STEPS_PATTERN = r"(?:-kd|-svd)*"
CHAIN_PATTERN = rf"(?:{METHOD_PATTERN})-G{GROUPS_PATTERN}{STEPS_PATTERN}"
MERGED_PATTERN = rf"full|{CHAIN_PATTERN}"
CHAIN = re.compile(rf"(?P<method>[a-z]+)-G(?P<groups>{GROUPS_PATTERN})(?P<steps>{STEPS_PATTERN})")
_EXPERT_TENSORS = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "expert_bias")
USAGE_FORMAT = "moefy-usage/2"  # a usage file's format: /2 added the experts' outputs
_PAIRS_PER_PASS = 1 << 16  # (token, expert) pairs the calibration computes at once: bounds its memory


@dataclass
class Usage:
    """One layer's calibration: pairs per router expert, the Gram matrix of its logit columns, and
    what the experts output (REAP's saliency, HC-SMoE's features)."""

    counts: torch.Tensor  # [E] long
    logit_gram: torch.Tensor  # [E, E] float64: sum over tokens of logit_i * logit_j
    saliency_sum: torch.Tensor | None = None  # [E] float64: sum over e's pairs of gate * ||e(x)||_2
    output_sum: torch.Tensor | None = None  # [E, d] float64: sum over real tokens of e(x), every e
    tokens: torch.Tensor | None = None  # [] long: real tokens calibrated on

    @property
    def frequency(self) -> torch.Tensor:
        """Share of the layer's (token, expert) pairs each expert took (sums to 1)."""
        return self.counts.double() / self.counts.sum().clamp(min=1)

    @property
    def reap(self) -> torch.Tensor:
        """REAP's saliency [E]: mean over the tokens routed to e of gate * ||e(x)||_2 (0: never routed)."""
        if self.saliency_sum is None:
            raise MoefyError("this calibration has no expert outputs (REAP's scores); rerun its usage job")
        return self.saliency_sum / self.counts.clamp(min=1)

    @property
    def mean_output(self) -> torch.Tensor:
        """HC-SMoE's features [E, d]: each expert's output averaged over all calibration tokens."""
        if self.output_sum is None:
            raise MoefyError("this calibration has no expert outputs (HC-SMoE's features); rerun its usage job")
        return self.output_sum / self.tokens.clamp(min=1)

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        """What a usage file holds for layer `index` (read back by usage_from_tensors)."""
        named = {"counts": self.counts, "gram": self.logit_gram, "saliency": self.saliency_sum}
        named |= {"outputs": self.output_sum, "tokens": self.tokens}
        return {f"{name}.{index}": t for name, t in named.items() if t is not None}


def usage_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[int, Usage]:
    """The layers' Usage from a usage file's tensors (Usage.tensors)."""
    layers = sorted(int(key.split(".")[1]) for key in tensors if key.startswith("counts."))
    return {
        i: Usage(*(tensors.get(f"{name}.{i}") for name in ("counts", "gram", "saliency", "outputs", "tokens"))) for i in layers
    }


def expert_outputs(moe: SparseMoE, x: torch.Tensor, dispatch: Dispatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(saliency sum [E], output sum [E, d]) of one batch of real tokens x [T, d], every token
    through every expert: dispatch's pairs (tokens indexing x) add gate * ||e(x)||_2 to their
    expert's saliency; every e(x) adds to its expert's output sum."""
    tokens, experts = x.shape[0], moe.num_experts
    saliency = torch.zeros(experts, dtype=torch.float64)
    outputs = torch.zeros(experts, moe.d_model, dtype=torch.float64)
    step = max(1, _PAIRS_PER_PASS // experts)
    for start in range(0, tokens, step):
        part = x[start : start + step]
        t = part.shape[0]
        every = Dispatch(
            token=torch.arange(t, device=x.device).repeat(experts),
            expert=torch.arange(experts, device=x.device).repeat_interleave(t),
            gate=x.new_ones(experts * t),
            counts=torch.full((experts,), t, device=x.device),
        )
        y = moe.pair_outputs(part, every).view(experts, t, moe.d_model)
        outputs += y.sum(1).double().cpu()
        mine = (dispatch.token >= start) & (dispatch.token < start + t)
        expert, token = dispatch.expert[mine], dispatch.token[mine] - start
        norms = y[expert, token].double().norm(dim=-1)
        saliency.index_add_(0, expert.cpu(), (dispatch.gate[mine].double() * norms).cpu())
    return saliency, outputs


@contextmanager
def record_usage(moes: dict[int, SparseMoE]):
    """Within the block, forwards of the model accumulate each layer's Usage (real tokens only):
    the router's choices and logits, and every expert's output on every token (computed beside
    the layer's forward from its own weights, so no second copy of the model)."""
    merged = [i for i, m in moes.items() if m.expert_map is not None]
    if merged:
        raise MoefyError(f"calibrate a full SMoE: MoE layers {merged} are merged already")
    grams = {i: torch.zeros(m.router_experts, m.router_experts, dtype=torch.float64) for i, m in moes.items()}
    saliency = {i: torch.zeros(m.num_experts, dtype=torch.float64) for i, m in moes.items()}
    outputs = {i: torch.zeros(m.num_experts, m.d_model, dtype=torch.float64) for i, m in moes.items()}
    tokens = {i: torch.zeros((), dtype=torch.long) for i in moes}

    def router_hook(index):
        def capture(module, args, logits):
            moe = moes[index]
            flat = logits.detach().reshape(-1, logits.shape[-1]).double()
            if moe.token_mask is not None and moe.token_mask.numel() == flat.shape[0]:
                flat = flat[moe.token_mask.reshape(-1).to(flat.device)]
            grams[index] += (flat.t() @ flat).cpu()

        return capture

    def layer_hook(index):
        def capture(moe, args, output):
            x = args[0].detach().reshape(-1, moe.d_model)
            dispatch = moe.dispatch
            token = dispatch.token
            if moe.valid is not None:  # keep the real tokens; the pairs' tokens index them
                x, token = x[moe.valid], (torch.cumsum(moe.valid.long(), 0) - 1)[token]
            real = Dispatch(token, dispatch.expert, dispatch.gate.detach(), dispatch.counts)
            with torch.no_grad():
                pairs, sums = expert_outputs(moe, x, real)
            saliency[index] += pairs
            outputs[index] += sums
            tokens[index] += x.shape[0]

        return capture

    for moe in moes.values():
        moe.reset_statistics()
    handles = [moe.router.register_forward_hook(router_hook(i)) for i, moe in moes.items()]
    handles += [moe.register_forward_hook(layer_hook(i)) for i, moe in moes.items()]
    usage: dict[int, Usage] = {}
    try:
        yield usage
    finally:
        for handle in handles:
            handle.remove()
    usage.update({i: Usage(moes[i].load.clone(), grams[i], saliency[i], outputs[i], tokens[i]) for i in moes})


def ranked(usage: Usage, score: str = "frequency") -> list[int]:
    """The layer's experts, highest `score` first (frequency: usage share; reap: REAP's saliency),
    ties to the lower expert."""
    values = usage.frequency if score == "frequency" else usage.reap
    return torch.argsort(values, descending=True, stable=True).tolist()


def layer_budgets(usage: dict[int, Usage], groups: float, grouping: str = "global") -> dict[int, int]:
    """Experts (or groups) each layer keeps. `groups`: per layer (global and reap grouping: on
    average over layers, rounded to a whole total, each layer at least 1, the rest going to the
    experts of highest share of their layer's usage (global) or REAP scores (reap), over all layers)."""
    if grouping not in GROUPINGS:
        raise MoefyError(f"grouping {grouping!r} is not one of {', '.join(GROUPINGS)}")
    sizes = {i: u.counts.numel() for i, u in usage.items()}
    if not 1 <= groups <= min(sizes.values()):
        raise MoefyError(f"groups per layer must be in 1-{min(sizes.values())} (the layers' expert counts), got {groups}")
    if grouping == "layer":
        if groups != int(groups):
            raise MoefyError(f"layer grouping keeps a whole number of groups per layer, got {groups}")
        return {i: int(groups) for i in usage}
    score = "frequency" if grouping == "global" else "reap"
    shares = {i: u.frequency if score == "frequency" else u.reap / u.reap.sum().clamp(min=1e-30) for i, u in usage.items()}
    budgets = {i: 1 for i in usage}  # every layer keeps at least its highest-scored expert
    # the highest shares over all layers, ties to the lower layer, then the lower expert
    candidates = sorted((-float(shares[i][e]), i, e) for i, u in usage.items() for e in ranked(u, score)[1:])
    for _, layer, _ in candidates[: round(groups * len(usage)) - len(usage)]:
        budgets[layer] += 1
    return budgets


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


def cluster_experts(features: torch.Tensor, count: int, frequency: torch.Tensor) -> list[list[int]]:
    """HC-SMoE's groups: average-linkage agglomerative clustering of the experts' features [E, F]
    (Euclidean distance) until `count` clusters remain; each group most-used first, groups by
    their most-used member's usage."""
    distance = torch.cdist(features.double(), features.double())
    distance.fill_diagonal_(float("inf"))
    clusters = [[e] for e in range(features.shape[0])]
    while len(clusters) > count:
        a, b = divmod(int(torch.argmin(distance)), distance.shape[0])
        a, b = min(a, b), max(a, b)
        # average linkage (Lance-Williams): the merged cluster's distance to any other is the
        # size-weighted mean of its two parts' distances, i.e. the mean over all pairs of members
        na, nb = len(clusters[a]), len(clusters[b])
        joined = (na * distance[a] + nb * distance[b]) / (na + nb)
        distance[a], distance[:, a] = joined, joined
        distance[a, a] = float("inf")
        keep = [i for i in range(distance.shape[0]) if i != b]
        distance = distance[keep][:, keep]
        clusters[a] += clusters.pop(b)
    groups = [sorted(c, key=lambda e: (-float(frequency[e]), e)) for c in clusters]
    return sorted(groups, key=lambda g: (-float(frequency[g[0]]), g[0]))


def layer_groups(moe: SparseMoE, usage: Usage, method: str, budget: int, similarity_kind: str) -> list[list[int]]:
    """The layer's `budget` groups, each its kept (dominant) expert first: REAP's highest-scored
    experts alone, HC-SMoE's clusters, or the most-used experts with the experts most similar to them."""
    if method == "reap":
        return [[e] for e in ranked(usage, "reap")[:budget]]
    if method == "hcsmoe":
        return cluster_experts(usage.mean_output, budget, usage.frequency)
    return group_experts(ranked(usage)[:budget], similarity(moe, usage, similarity_kind))


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
    if method in ("prune", "reap"):
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
    if method not in METHODS:
        raise MoefyError(f"merge method {method!r} is not one of {', '.join(METHODS)}")
    budgets = layer_budgets({i: usage[i] for i in moes}, groups, grouping)
    merged, grouped = {}, {}
    for index, moe in moes.items():
        grouped[index] = layer_groups(moe, usage[index], method, budgets[index], similarity_kind)
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
