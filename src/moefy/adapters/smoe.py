"""The SMoE adapter: the one place that knows where a Hugging Face MoE family keeps its experts and router.

ffn.py does this for dense FFNs; this module does it for models that are already sparse (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, Switch Transformers). Everything else sees a found block as a
`SparseMoE` (moefy.moe.sparse): `to_sparse` copies the block's experts and router into one (float
weights), `install` puts a SparseMoE where the block was, wrapped as the family needs. Where each
family keeps its blocks, how it stores them (`layout`) and what wraps them is in
moefy.adapters.families; this module reads each layout and builds each wrapper.

What each family's block maps to (transformers 5, whose experts are fused 3-D tensors):
- Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: `layer.mlp` with `gate.weight` [E, d] (the router, no
  bias; softmax in float32 over all experts, then top-k) and `experts.gate_up_proj` [E, 2 ff, d]
  whose first ff rows are the gate (what the activation reads: SparseMoE's w_gate) and the last ff
  the up projection (w_in); `experts.down_proj` [E, d, ff] is w_out transposed; the activation is
  `experts.act_fn`. Mixtral always renormalises the top-k gates, the others iff
  `config.norm_topk_prob`. Qwen2-MoE and Qwen3-MoE layers in `mlp_only_layers` (or off
  `decoder_sparse_step`) are dense MLPs and are not listed.
- Qwen2-MoE adds a shared expert to every token: y = moe(x) + sigmoid(shared_expert_gate(x)) *
  shared_expert(x). The installed `SharedExpertMoE` keeps both as submodules under their own names,
  so their state_dict keys stay those of the checkpoint.
- Switch Transformers: `block.layer[-1].mlp` of every sparse encoder block, then decoder block,
  with `router.classifier` (a Linear, biased iff `config.router_bias`) and experts
  `experts.expert_{i}` = (wi, act, wo), not gated; top-1 with the raw top probability as gate
  (Routing("top_k", k=1, renormalize=False)).

Switch's expert capacity: Hugging Face drops, per sequence, the tokens an expert receives beyond
`config.expert_capacity` (counted along the sequence, padding included); a dropped token gets 0
from the layer and goes on through the residual alone. SparseMoE has no capacity, so the bare
layer `to_sparse` returns routes every token: identical to the block whenever no expert of a
sequence exceeds its capacity. `install` wraps it in `CapacityLimited`, which drops exactly the
tokens Hugging Face drops (through the SparseMoE's token mask), so an installed top-1 layer stays
equal to the block in every case.

Other differences from Hugging Face, all outside eval-mode forwards: the router jitter noise of
training mode (Mixtral `router_jitter_noise`, Switch `router_jitter_noise`) and the dropout inside
Switch experts are not applied; the router runs in float32 whatever Switch's `router_dtype`; and a
converted model cannot be called with `output_router_logits=True`: transformers records router
logits from modules of the family's router class, finds none, and its auxiliary loss fails on the
empty tuple. The converted layers keep their last router logits (SparseMoE.logits) and give their
losses with `auxiliary_losses()` (moefy.training.moe_training adds them to the task loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from moefy.adapters import families
from moefy.adapters.families import SMoEFamily
from moefy.adapters.models import load_config, load_tokenizer
from moefy.config import TASKS
from moefy.errors import MoefyError
from moefy.moe.sparse import Routing, SparseMoE, mask_padding


@dataclass
class SMoEBlock:
    index: int  # position among the model's MoE blocks, in layer order (encoder before decoder)
    name: str  # module path, e.g. "model.layers.1.mlp"
    block: nn.Module  # the family's own module
    to_sparse: Callable[[], SparseMoE]  # the block's experts and router as a SparseMoE (weights copied, float)
    install: Callable[[SparseMoE], None]  # the SparseMoE in the block's place, wrapped as the family needs


# -- wrappers ----------------------------------------------------------------------------------------


class SharedExpertMoE(nn.Module):
    """Qwen2-MoE's block around a SparseMoE: every token also goes through the shared expert, scaled
    by a sigmoid gate of its own. The two stay submodules named as in the checkpoint
    (`shared_expert`, `shared_expert_gate`), so their state_dict keys do not change."""

    def __init__(self, moe: SparseMoE, shared_expert: nn.Module, shared_expert_gate: nn.Module):
        super().__init__()
        self.moe = moe
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class CapacityLimited(nn.Module):
    """Switch's expert capacity around a top-1 SparseMoE, which has none: along each sequence, a
    token beyond the first `expert_capacity` sent to its router's choice goes to no expert (output
    0), as in Hugging Face. Padding counts towards capacity, as there; a token the SparseMoE's own
    token mask excludes (mask_padding) stays excluded. Capacity is counted per router output (a
    merged layer's expert_map does not change it), and dropped real tokens add to the SparseMoE's
    `tokens_dropped`. Other routings pass through unchanged."""

    def __init__(self, moe: SparseMoE, expert_capacity: int):
        super().__init__()
        self.moe = moe
        self.expert_capacity = int(expert_capacity)

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """bool [..., S]: the tokens of x [..., S, d] that their top-1 expert still has room for."""
        with torch.no_grad():
            probs = self.moe.router(x.reshape(-1, x.shape[-1])).float().softmax(-1)
            choice = F.one_hot(probs.argmax(-1), probs.shape[-1]).view(*x.shape[:-1], -1)
            priority = (choice.cumsum(dim=-2) * choice).sum(-1)
            return priority <= self.expert_capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.moe.routing
        if routing.kind != "top_k" or routing.k != 1:
            return self.moe(x)
        kept = self.kept(x)
        mask = self.moe.token_mask
        real = mask.to(kept.device) if mask is not None and mask.shape == kept.shape else torch.ones_like(kept)
        self.moe.token_mask = kept & real
        try:
            out = self.moe(x)
        finally:
            self.moe.token_mask = mask
        self.moe.tokens_dropped += int((real & ~kept).sum())
        return out


# -- reading each layout (families.py says which a family has) ----------------------------------------


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def _router(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    num_experts, d_model = weight.shape
    router = nn.Linear(d_model, num_experts, bias=bias is not None, device=weight.device)
    with torch.no_grad():
        router.weight.copy_(_float(weight))
        if bias is not None:
            router.bias.copy_(_float(bias))
    return router


def _fused_to_sparse(block: nn.Module, renormalize: Callable[[nn.Module], bool]) -> SparseMoE:
    """Fused experts: gate_up_proj [E, 2 ff, d] = [gate; up], down_proj [E, d, ff]; router gate.weight [E, d]."""
    experts, gate = block.experts, block.gate
    layout = (getattr(experts, "is_transposed", False), getattr(experts, "is_concatenated", True))
    if layout != (False, True) or getattr(experts, "has_bias", False):
        raise MoefyError(
            f"{type(experts).__name__} stores its experts transposed, interleaved or with biases, which this "
            "moefy does not read; use the transformers version moefy pins (transformers>=5,<6)"
        )
    gate_up = _float(experts.gate_up_proj)
    size = gate_up.shape[1] // 2
    return SparseMoE(
        w_in=gate_up[:, size:].transpose(1, 2),
        w_gate=gate_up[:, :size].transpose(1, 2),
        w_out=_float(experts.down_proj).transpose(1, 2),
        act=experts.act_fn,
        router=_router(gate.weight, None),
        routing=Routing("top_k", k=int(gate.top_k), renormalize=renormalize(gate)),
    )


def _bare(block: nn.Module, moe: SparseMoE) -> nn.Module:
    return moe


def _qwen2_moe_wrap(block: nn.Module, moe: SparseMoE) -> nn.Module:
    return SharedExpertMoE(moe, block.shared_expert, block.shared_expert_gate)


def _switch_to_sparse(block: nn.Module, renormalize: Callable[[nn.Module], bool]) -> SparseMoE:
    """experts.expert_{i} = (wi [ff, d], act, wo [d, ff]), router.classifier [E, d]; top-1, raw gate."""
    classifier = block.router.classifier
    experts = [block.experts[f"expert_{i}"] for i in range(classifier.out_features)]

    def stacked(get) -> torch.Tensor | None:
        parts = [get(expert) for expert in experts]
        return None if parts[0] is None else torch.stack([_float(p) for p in parts])

    return SparseMoE(
        w_in=stacked(lambda e: e.wi.weight.t()),
        w_out=stacked(lambda e: e.wo.weight.t()),
        act=experts[0].act,
        router=_router(classifier.weight, classifier.bias),
        routing=Routing("top_k", k=1, renormalize=renormalize(block.router)),
        b_in=stacked(lambda e: e.wi.bias),
        expert_bias=stacked(lambda e: e.wo.bias),
    )


def _switch_wrap(block: nn.Module, moe: SparseMoE) -> nn.Module:
    return CapacityLimited(moe, block.router.expert_capacity)


# (block, renormalize: the family's rule, read from the block's router) -> SparseMoE
_TO_SPARSE: dict[str, Callable[[nn.Module, Callable[[nn.Module], bool]], SparseMoE]] = {
    "fused": _fused_to_sparse,
    "switch": _switch_to_sparse,
}
_WRAPS: dict[str, Callable[[nn.Module, SparseMoE], nn.Module]] = {
    "bare": _bare,
    "shared_expert": _qwen2_moe_wrap,
    "capacity": _switch_wrap,
}


def _to_sparse(fam: SMoEFamily, block: nn.Module) -> SparseMoE:
    return _TO_SPARSE[fam.layout](block, fam.renormalize)


def find_smoe_blocks(model: nn.Module) -> list[SMoEBlock]:
    """Every MoE block of `model`, in layer order (encoder before decoder), indices 0, 1, ..."""
    model_type = families.model_type(model)
    fam = families.smoe_family(model)
    names = {id(module): name for name, module in model.named_modules()}
    blocks = []
    for index, (parent, attribute) in enumerate(fam.locate(model)):
        block = getattr(parent, attribute)

        def install(moe: SparseMoE, parent=parent, attribute=attribute, block=block) -> None:
            d_model = _d_model(block)
            if moe.d_model != d_model:
                raise MoefyError(f"a SparseMoE on d_model {moe.d_model} cannot replace an MoE block of d_model {d_model}")
            module = _WRAPS[fam.wrap](block, moe)
            module.train(block.training)
            setattr(parent, attribute, module)

        blocks.append(SMoEBlock(index, names[id(block)], block, lambda block=block: _to_sparse(fam, block), install))
    if not blocks:
        raise MoefyError(
            f"this {model_type!r} model has no MoE block left to convert (convert_smoes replaces them all; "
            "load the model again for a fresh copy)"
        )
    return blocks


def _d_model(block: nn.Module) -> int:
    """The hidden size a family's MoE block reads (from its router)."""
    router = block.gate.weight if hasattr(block, "gate") else block.router.classifier.weight
    return router.shape[1]


def convert_smoes(model: nn.Module) -> dict[int, SparseMoE]:
    """Replace every MoE block of `model` in place by its SparseMoE (wrapped as its family needs);
    returns the SparseMoE layers by block index. The model computes what it computed before."""
    blocks = find_smoe_blocks(model)
    dtypes = {p.dtype for found in blocks for p in found.block.parameters()}
    if dtypes != {torch.float32}:
        raise MoefyError(
            f"convert_smoes makes float32 SparseMoE layers, but this model's MoE blocks are {sorted(map(str, dtypes))}: "
            "load it with dtype=torch.float32 (load_hf_smoe does) or call model.float() first"
        )
    moes = {}
    for found in blocks:
        moe = found.to_sparse()
        found.install(moe)
        moes[found.index] = moe
    return moes


_HEAD_NAMES = {"classification": "a sequence-classification head", "causal_lm": "a causal-LM head"}


def _looks_local(name_or_path: str) -> bool:
    """True for what can only be a path (a hub id is `name` or `owner/name`)."""
    return name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path


def load_hf_model(name_or_path: str, task: str) -> nn.Module:
    """A Hugging Face MoE model (hub id or folder) with `task`'s head, float32, its MoE blocks as
    the family has them (a saved merged model's blocks are then replaced from its own file)."""
    if task not in TASKS:
        raise MoefyError(f"task {task!r} is unknown; choose one of {', '.join(TASKS)}")
    if _looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise MoefyError(f"model folder {name_or_path} does not exist; fix the path (a folder with config.json and weights)")
    config = load_config(name_or_path)
    model_type = families.model_type(config)
    fam = families.smoe_family(config)
    if task not in fam.tasks:
        has = ", ".join(fam.tasks) if fam.tasks else "none of them (it has only sequence-to-sequence heads)"
        raise MoefyError(
            f"{name_or_path} is a {model_type!r} model, and transformers has no {_HEAD_NAMES[task]} for that family: "
            f"of moefy's tasks ({', '.join(TASKS)}) it supports {has}. Choose a supported task, or load the model "
            "with its own class and call moefy.adapters.smoe.convert_smoes on it."
        )
    if task == "classification" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = load_tokenizer(name_or_path).pad_token_id  # decoder classifiers read the last non-pad token
    head = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a fresh classification head (or a merged model's absent experts) is expected here
    try:
        return head.from_pretrained(name_or_path, config=config, dtype=torch.float32).eval()
    except (OSError, ValueError) as err:
        raise MoefyError(
            f"cannot load the model from {name_or_path!r}: {str(err).splitlines()[0]}. Point it at a folder with "
            "config.json and weights, or a hub id this machine can reach"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_hf_smoe(name_or_path: str, task: str) -> tuple[nn.Module, dict[int, SparseMoE], object]:
    """A Hugging Face MoE model (hub id or folder) with `task`'s head, float32, every MoE block
    converted (convert_smoes) and padding sent to no expert (mask_padding, from the attention mask):
    (model in eval mode, SparseMoE layers by block index, tokenizer)."""
    model = load_hf_model(name_or_path, task)
    moes = convert_smoes(model)
    mask_padding(model, moes.values())
    return model.eval(), moes, load_tokenizer(name_or_path)


assert all(set(fam.tasks) <= set(TASKS) for fam in map(families.smoe_family, families.smoe_families()))
assert {families.smoe_family(name).wrap for name in families.smoe_families()} <= set(_WRAPS)
assert {families.smoe_family(name).layout for name in families.smoe_families()} <= set(_TO_SPARSE)
