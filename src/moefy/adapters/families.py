"""Model families: the one place that names them (by transformers' `model_type`) and says where each
keeps its FFNs, its attention projections and, for models that are MoEs already, its MoE blocks.

A locator here returns slots, (parent module, attribute) pairs and the modules found, never moefy's
own types, so the adapters that wrap them (ffn.py, attention.py, smoe.py) import this module and
not the other way round. Supporting a dense family is one `Family` in `_DENSE`; an MoE family one
`SMoEFamily` in `_SPARSE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from moefy.errors import MoefyError

Slot = tuple[nn.Module, str]  # (parent, attribute): where a module sits, so that it can be replaced


class FFNSlots(NamedTuple):
    """One FFN block: h = act(w_in(x)) (times act(w_gate(x)) when gated), y = w_out(h)."""

    w_in: Slot
    act: nn.Module
    w_out: Slot
    block: Slot  # what `install` replaces: the whole block computes the new module's output
    w_gate: Slot | None = None
    clear: Slot | None = None  # a sibling that must become the identity when the block is replaced (BERT)


class ProjectionSlot(NamedTuple):
    layer: int
    name: str  # q, k, v, o, or qkv where the family fuses them
    parent: nn.Module
    attribute: str


# -- dense families ------------------------------------------------------------------------------


def _bert_like_ffns(model: nn.Module) -> list[FFNSlots]:
    """BERT, RoBERTa, XLM-R, ELECTRA: layer.intermediate = (dense, act), layer.output.dense = W_out;
    replaced, layer.output.dense computes the block and layer.intermediate passes its input on."""
    return [
        FFNSlots(
            (layer.intermediate, "dense"),
            layer.intermediate.intermediate_act_fn,
            (layer.output, "dense"),
            (layer.output, "dense"),
            clear=(layer, "intermediate"),
        )
        for layer in model.base_model.encoder.layer
    ]


def _bert_like_projections(model: nn.Module) -> list[ProjectionSlot]:
    found = []
    for i, layer in enumerate(model.base_model.encoder.layer):
        attention = layer.attention
        found += [ProjectionSlot(i, n, attention.self, a) for a, n in (("query", "q"), ("key", "k"), ("value", "v"))]
        found.append(ProjectionSlot(i, "o", attention.output, "dense"))
    return found


def _distilbert_ffns(model: nn.Module) -> list[FFNSlots]:
    """DistilBERT: layer.ffn = (lin1, activation, lin2, dropout)."""
    return [
        FFNSlots((layer.ffn, "lin1"), layer.ffn.activation, (layer.ffn, "lin2"), (layer, "ffn"))
        for layer in model.base_model.transformer.layer
    ]


def _distilbert_projections(model: nn.Module) -> list[ProjectionSlot]:
    found = []
    for i, layer in enumerate(model.base_model.transformer.layer):
        attention = layer.attention
        found += [ProjectionSlot(i, n, attention, f"{n}_lin") for n in ("q", "k", "v")]
        found.append(ProjectionSlot(i, "o", attention, "out_lin"))
    return found


def _t5_blocks(model: nn.Module) -> list[nn.Module]:
    """Every encoder block, then every decoder block (indices run on)."""
    base = model.base_model
    return list(base.encoder.block) + (list(base.decoder.block) if getattr(base, "decoder", None) is not None else [])


def _t5_ffns(model: nn.Module) -> list[FFNSlots]:
    """T5: the last sub-layer of every block; DenseReluDense is (wi, act, wo), or in T5 v1.1
    (wi_0 = gate, wi_1 = up, act, wo)."""
    found = []
    for block in _t5_blocks(model):
        ff = block.layer[-1]
        dense = ff.DenseReluDense
        gated = hasattr(dense, "wi_0")
        w_in, w_gate = ((dense, "wi_1"), (dense, "wi_0")) if gated else ((dense, "wi"), None)
        found.append(FFNSlots(w_in, dense.act, (dense, "wo"), (ff, "DenseReluDense"), w_gate))
    return found


def _t5_projections(model: nn.Module) -> list[ProjectionSlot]:
    """Self-attention of every block; the decoder's cross-attention stays dense."""
    return [ProjectionSlot(i, n, block.layer[0].SelfAttention, n) for i, block in enumerate(_t5_blocks(model)) for n in "qkvo"]


def _gpt2_ffns(model: nn.Module) -> list[FFNSlots]:
    """GPT-2: block.mlp = (c_fc, act, c_proj, dropout), Conv1D weights (the FFN adapter makes them nn.Linear)."""
    return [FFNSlots((block.mlp, "c_fc"), block.mlp.act, (block.mlp, "c_proj"), (block, "mlp")) for block in model.base_model.h]


def _gpt2_projections(model: nn.Module) -> list[ProjectionSlot]:
    """GPT-2 computes q, k and v with one fused matrix (c_attn), distilled as one projection."""
    found = []
    for i, block in enumerate(model.base_model.h):
        found += [ProjectionSlot(i, "qkv", block.attn, "c_attn"), ProjectionSlot(i, "o", block.attn, "c_proj")]
    return found


def _llama_like_ffns(model: nn.Module) -> list[FFNSlots]:
    """LLaMA, Mistral, Qwen2: layer.mlp = down(act(gate(x)) * up(x))."""
    return [
        FFNSlots((layer.mlp, "up_proj"), layer.mlp.act_fn, (layer.mlp, "down_proj"), (layer, "mlp"), (layer.mlp, "gate_proj"))
        for layer in model.base_model.layers
    ]


def _llama_like_projections(model: nn.Module) -> list[ProjectionSlot]:
    return [ProjectionSlot(i, n, layer.self_attn, f"{n}_proj") for i, layer in enumerate(model.base_model.layers) for n in "qkvo"]


def _set(attribute: str) -> Callable[[Any, str], None]:
    return lambda config, name: setattr(config, attribute, name)


def _t5_activation(config, name: str) -> None:
    # T5Config derives dense_act_fn from feed_forward_proj when a saved config is read back.
    config.feed_forward_proj = ("gated-" if config.is_gated_act else "") + name
    config.dense_act_fn = name


@dataclass(frozen=True)
class Family:
    """What moefy needs to know about one dense model family."""

    ffns: Callable[[nn.Module], list[FFNSlots]]  # layer order, encoder before decoder
    projections: Callable[[nn.Module], list[ProjectionSlot]]  # by layer, then q, k, v, o
    set_activation: Callable[[Any, str], None]  # on a config, before the weights are loaded
    d_ff: Callable[[Any], int]  # from a config, to check expert counts before any job runs
    causal_lm: bool = False  # has a next-token head (decoder-only)


_BERT_LIKE = Family(_bert_like_ffns, _bert_like_projections, _set("hidden_act"), lambda config: config.intermediate_size)
_DISTILBERT = Family(_distilbert_ffns, _distilbert_projections, _set("activation"), lambda config: config.hidden_dim)
_T5 = Family(_t5_ffns, _t5_projections, _t5_activation, lambda config: config.d_ff)
_GPT2 = Family(
    _gpt2_ffns, _gpt2_projections, _set("activation_function"), lambda config: config.n_inner or 4 * config.n_embd, causal_lm=True
)
_LLAMA_LIKE = Family(
    _llama_like_ffns, _llama_like_projections, _set("hidden_act"), lambda config: config.intermediate_size, causal_lm=True
)

_DENSE = {
    **{name: _BERT_LIKE for name in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    "distilbert": _DISTILBERT,
    "t5": _T5,
    "gpt2": _GPT2,
    **{name: _LLAMA_LIKE for name in ("llama", "mistral", "qwen2")},
}


def model_type(config_or_model) -> str | None:
    """A model_type as given, a config's, or that of a model's config (None when there is none)."""
    if config_or_model is None or isinstance(config_or_model, str):
        return config_or_model
    config = getattr(config_or_model, "config", config_or_model)
    return getattr(config, "model_type", None)


def supported() -> list[str]:
    """The dense families moefy converts, sorted."""
    return sorted(_DENSE)


def is_dense_family(config_or_model) -> bool:
    return model_type(config_or_model) in _DENSE


def family(config_or_model) -> Family:
    name = model_type(config_or_model)
    if name not in _DENSE:
        raise MoefyError(
            f"model type {name!r} is not supported yet; supported: {', '.join(supported())}. "
            "Point model.name_or_path at a model of one of these families."
        )
    return _DENSE[name]


def causal_lm_families() -> list[str]:
    return sorted(name for name, fam in _DENSE.items() if fam.causal_lm)


# -- MoE families ----------------------------------------------------------------------------------


def _is_fused_moe(module: nn.Module) -> bool:
    return hasattr(module, "gate") and hasattr(getattr(module, "experts", None), "gate_up_proj")


def _decoder_blocks(model: nn.Module) -> list[Slot]:
    """layer.mlp of every decoder layer whose mlp is an MoE block (Qwen's dense layers are skipped)."""
    return [(layer, "mlp") for layer in model.base_model.layers if _is_fused_moe(layer.mlp)]


def _switch_blocks(model: nn.Module) -> list[Slot]:
    """The FF sub-layer (block.layer[-1]) of every sparse encoder block, then decoder block."""
    base = model.base_model
    found = []
    for stack in (getattr(base, "encoder", None), getattr(base, "decoder", None)):
        for block in [] if stack is None else stack.block:
            ff = block.layer[-1]
            if hasattr(ff.mlp, "router") and hasattr(ff.mlp, "experts"):
                found.append((ff, "mlp"))
    return found


@dataclass(frozen=True)
class SMoEFamily:
    """What moefy needs to know about one MoE family; the SMoE adapter reads each `layout` and `wrap`."""

    locate: Callable[[nn.Module], list[Slot]]  # each block's slot, layer order
    layout: str  # "fused": experts.gate_up_proj / down_proj, router gate.weight; "switch": experts.expert_{i}, router.classifier
    renormalize: Callable[[nn.Module], bool]  # from the block's router: are the top-k gates renormalised
    wrap: str  # what takes the block's place around the SparseMoE: "bare", "shared_expert" (Qwen2-MoE), "capacity" (Switch)
    tasks: tuple[str, ...]  # moefy tasks transformers has a head for


def _always(gate: nn.Module) -> bool:
    return True


def _norm_topk_prob(gate: nn.Module) -> bool:
    return bool(gate.norm_topk_prob)


def _never(gate: nn.Module) -> bool:
    return False


_DECODER_TASKS = ("causal_lm", "classification")
_SPARSE = {
    "mixtral": SMoEFamily(_decoder_blocks, "fused", _always, "bare", _DECODER_TASKS),
    "qwen2_moe": SMoEFamily(_decoder_blocks, "fused", _norm_topk_prob, "shared_expert", _DECODER_TASKS),
    "qwen3_moe": SMoEFamily(_decoder_blocks, "fused", _norm_topk_prob, "bare", _DECODER_TASKS),
    "olmoe": SMoEFamily(_decoder_blocks, "fused", _norm_topk_prob, "bare", ("causal_lm",)),
    # transformers has only seq2seq heads for Switch: load it yourself and call convert_smoes
    "switch_transformers": SMoEFamily(_switch_blocks, "switch", _never, "capacity", ()),
}


def smoe_families() -> list[str]:
    """The model_type names whose MoE blocks moefy reads, sorted."""
    return sorted(_SPARSE)


def smoe_family(config_or_model) -> SMoEFamily:
    name = model_type(config_or_model)
    if name not in _SPARSE:
        raise MoefyError(
            f"model type {name!r} is not a Mixture-of-Experts family moefy reads; supported: "
            f"{', '.join(smoe_families())}. Point it at a model of one of these families (a dense model goes "
            "through moefy.adapters.ffn instead)."
        )
    return _SPARSE[name]


# Decoders whose non-FFN weights the served MoE classes (moefy.adapters.served) hold under the same
# names, and whether their q, k, v projections carry biases (None: the config's attention_bias says,
# which then puts one on the output projection too).
SERVED_BASES: dict[str, bool | None] = {"llama": None, "mistral": False, "qwen2": True}
