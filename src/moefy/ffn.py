"""The FFN adapter: the one place that knows where a model family keeps its feed-forward blocks.

Everything else sees an FFN as neurons, h = act(w_in(x)) and y = w_out(h), and never names an
architecture. A gated FFN (LLaMA's SwiGLU, T5 v1.1's gated GELU) has one more projection:
h = act(w_gate(x)) * w_in(x), so neuron i is row i of w_gate and w_in together (and column i of
w_out). Supporting a new family means adding one `Family` to `_FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moefy.errors import MoefyError


@dataclass
class FFN:
    index: int
    w_in: nn.Linear
    act: nn.Module
    w_out: nn.Linear
    _install: Callable[[nn.Module], None]
    w_gate: nn.Linear | None = None
    projection: bool = False  # a distilled attention projection (moefy.projections), not one of the model's FFNs

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """The neurons' values h [..., d_ff] for inputs x [..., d_model]: what w_out reads."""
        if self.w_gate is None:
            return self.act(self.w_in(x))
        return self.act(self.w_gate(x)) * self.w_in(x)

    @property
    def d_model(self) -> int:
        return self.w_in.in_features

    @property
    def d_ff(self) -> int:
        return self.w_in.out_features

    @property
    def flops_per_token(self) -> int:
        """2 FLOPs per multiply-add of the dense FFN's matmuls (2 projections, 3 if gated)."""
        return 2 * (2 if self.w_gate is None else 3) * self.d_model * self.d_ff

    @property
    def keys(self) -> torch.Tensor:
        """[d_ff, d_model]: the rows that decide whether a neuron is on for an input.

        The activation reads w_gate(x) in a gated FFN, so its rows (not the up projection's, whose
        sign only flips h) say which inputs turn a neuron on; k-means splits and router centroids
        use them.
        """
        return (self.w_in if self.w_gate is None else self.w_gate).weight.detach()

    @property
    def exact_zeros(self) -> bool:
        """True when the activation is exactly 0 for every negative input (ReLU and kin).

        Then h == 0 means the neuron is off. SiLU and GELU are never exactly 0, so "off" needs a
        definition (see `fired`).
        """
        probe = torch.tensor([-4.0, -1.0, -1e-3])
        with torch.no_grad():
            return bool((self.act(probe) == 0).all())

    def fired(self, h: torch.Tensor, fire_fraction: float) -> torch.Tensor:
        """Which neurons fire on each token, bool [..., d_ff].

        With exact zeros: h != 0 (a gated neuron whose up projection is negative fires too).
        Otherwise: the top `fire_fraction` of the token's neurons by |h|, the ones that carry
        most of its output.
        """
        if self.exact_zeros:
            return h != 0
        k = max(1, min(h.shape[-1], round(fire_fraction * h.shape[-1])))
        top = h.abs().topk(k, dim=-1).indices
        return torch.zeros_like(h, dtype=torch.bool).scatter_(-1, top, True)

    def replace(self, module: nn.Module) -> None:
        """Make the block compute `module(x)` in place of w_out(act(w_in(x)))."""
        self._install(module)


class TransposedLinear(nn.Linear):
    """An nn.Linear made from a GPT-2 style Conv1D (weight stored [in, out]).

    The rest of moefy (and the MoE kernel) sees a plain nn.Linear; state dicts keep the Conv1D
    layout, so a saved model is still a standard checkpoint that its own class loads.
    """

    @classmethod
    def from_conv1d(cls, conv: nn.Module) -> TransposedLinear:
        d_in, d_out = conv.weight.shape
        linear = cls(d_in, d_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            if conv.bias is not None:
                linear.bias.copy_(conv.bias)
        linear.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            linear.bias.requires_grad_(conv.bias.requires_grad)
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = destination[prefix + "weight"]
        destination[prefix + "weight"] = weight.t() if keep_vars else weight.t().contiguous()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:  # torch hands each module its own copy of the dict
            state_dict[key] = state_dict[key].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _as_linear(parent: nn.Module, name: str) -> nn.Linear:
    """parent.<name> as an nn.Linear, converting a Conv1D in place (idempotent)."""
    module = getattr(parent, name)
    if not isinstance(module, nn.Linear):
        module = TransposedLinear.from_conv1d(module)
        setattr(parent, name, module)
    return module


def _setter(parent: nn.Module, name: str) -> Callable[[nn.Module], None]:
    return lambda module: setattr(parent, name, module)


def _bert_like(model: nn.Module) -> list[FFN]:
    """BERT, RoBERTa, XLM-R, ELECTRA: layer.intermediate = (dense, act), layer.output.dense = W_out."""
    ffns = []
    for i, layer in enumerate(model.base_model.encoder.layer):

        def install(module: nn.Module, layer=layer) -> None:
            layer.intermediate = nn.Identity()
            layer.output.dense = module

        ffns.append(FFN(i, layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense, install))
    return ffns


def _distilbert(model: nn.Module) -> list[FFN]:
    """DistilBERT: layer.ffn = (lin1, activation, lin2, dropout)."""
    return [
        FFN(i, layer.ffn.lin1, layer.ffn.activation, layer.ffn.lin2, _setter(layer, "ffn"))
        for i, layer in enumerate(model.base_model.transformer.layer)
    ]


def _t5(model: nn.Module) -> list[FFN]:
    """T5: the last sub-layer of every encoder block, then every decoder block (indices run on).

    DenseReluDense is (wi, act, wo), or in T5 v1.1 (wi_0 = gate, wi_1 = up, act, wo).
    """
    base = model.base_model
    blocks = list(base.encoder.block) + (list(base.decoder.block) if getattr(base, "decoder", None) is not None else [])
    ffns = []
    for i, block in enumerate(blocks):
        ff = block.layer[-1]
        dense = ff.DenseReluDense
        gated = hasattr(dense, "wi_0")
        w_in, w_gate = (dense.wi_1, dense.wi_0) if gated else (dense.wi, None)
        ffns.append(FFN(i, w_in, dense.act, dense.wo, _setter(ff, "DenseReluDense"), w_gate))
    return ffns


def _gpt2(model: nn.Module) -> list[FFN]:
    """GPT-2: block.mlp = (c_fc, act, c_proj, dropout) with Conv1D weights, made nn.Linear here."""
    return [
        FFN(i, _as_linear(block.mlp, "c_fc"), block.mlp.act, _as_linear(block.mlp, "c_proj"), _setter(block, "mlp"))
        for i, block in enumerate(model.base_model.h)
    ]


def _llama_like(model: nn.Module) -> list[FFN]:
    """LLaMA, Mistral, Qwen2: layer.mlp = down(act(gate(x)) * up(x))."""
    return [
        FFN(i, layer.mlp.up_proj, layer.mlp.act_fn, layer.mlp.down_proj, _setter(layer, "mlp"), layer.mlp.gate_proj)
        for i, layer in enumerate(model.base_model.layers)
    ]


@dataclass(frozen=True)
class Family:
    """What moefy needs to know about one model family."""

    find: Callable[[nn.Module], list[FFN]]
    set_activation: Callable[[Any, str], None]  # on a config, before the weights are loaded
    d_ff: Callable[[Any], int]  # from a config, to check expert counts before any job runs
    causal_lm: bool = False  # has a next-token head (decoder-only)


def _set(attribute: str) -> Callable[[Any, str], None]:
    return lambda config, name: setattr(config, attribute, name)


def _t5_activation(config, name: str) -> None:
    # T5Config derives dense_act_fn from feed_forward_proj when a saved config is read back.
    config.feed_forward_proj = ("gated-" if config.is_gated_act else "") + name
    config.dense_act_fn = name


BERT_LIKE = Family(_bert_like, _set("hidden_act"), lambda config: config.intermediate_size)
DISTILBERT = Family(_distilbert, _set("activation"), lambda config: config.hidden_dim)
T5 = Family(_t5, _t5_activation, lambda config: config.d_ff)
GPT2 = Family(_gpt2, _set("activation_function"), lambda config: config.n_inner or 4 * config.n_embd, causal_lm=True)
LLAMA_LIKE = Family(_llama_like, _set("hidden_act"), lambda config: config.intermediate_size, causal_lm=True)

_FAMILIES = {
    **{name: BERT_LIKE for name in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    "distilbert": DISTILBERT,
    "t5": T5,
    "gpt2": GPT2,
    **{name: LLAMA_LIKE for name in ("llama", "mistral", "qwen2")},
}


def supported() -> list[str]:
    return sorted(_FAMILIES)


def family(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise MoefyError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(supported())}. "
            "Point model.name_or_path at a model of one of these families."
        )
    return _FAMILIES[model_type]


def causal_lm_families() -> list[str]:
    return sorted(name for name, fam in _FAMILIES.items() if fam.causal_lm)


def find_ffns(model: nn.Module) -> list[FFN]:
    """All FFN blocks of `model`, in layer order (encoder before decoder), indices unique; then the
    attention projections distilled into MLPs (moefy.projections), indices running on, so that
    every step converts them like FFNs."""
    from moefy.projections import distilled_ffns  # it builds on this module's helpers

    ffns = family(model.config).find(model)
    return ffns + distilled_ffns(model, start=len(ffns))


def self_attention(config) -> tuple[int, int]:
    """(self-attention layers, their width heads x head_dim), from the config's standard names
    (an encoder-decoder's decoder layers counted too, at the same length)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    layers = config.num_hidden_layers + (getattr(config, "num_decoder_layers", None) or 0)
    return layers, heads * head_dim


def dense_ffn_flops(model: nn.Module) -> dict[int, int]:
    """FLOPs per token of each dense FFN, by index (of a model whose FFNs are not replaced yet)."""
    return {f.index: f.flops_per_token for f in find_ffns(model)}


@contextmanager
def capture(ffns: list[FFN], inputs: bool = True, activations: bool = True) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
    """Record each FFN's last input x (of w_in) and activations h (input of w_out) during a forward.

    Yields a dict layer -> {"x": tensor, "h": tensor}, overwritten by every forward pass.
    """
    seen: dict[int, dict[str, torch.Tensor]] = {f.index: {} for f in ffns}
    handles = []
    for ffn in ffns:
        if inputs:
            handles.append(ffn.w_in.register_forward_pre_hook(lambda m, args, i=ffn.index: seen[i].__setitem__("x", args[0])))
        if activations:
            handles.append(ffn.w_out.register_forward_pre_hook(lambda m, args, i=ffn.index: seen[i].__setitem__("h", args[0])))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
