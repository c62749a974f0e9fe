"""The FFN adapter: a model's feed-forward blocks as FFNs, wherever its family keeps them.

Everything else sees an FFN as neurons, h = act(w_in(x)) and y = w_out(h), and never names an
architecture (moefy.adapters.families says where each family keeps its blocks). A gated FFN
(LLaMA's SwiGLU, T5 v1.1's gated GELU) has one more projection: h = act(w_gate(x)) * w_in(x), so
neuron i is row i of w_gate and w_in together (and column i of w_out). An attention projection
distilled into a ProjectionMLP (D2DMoE) is an FFN too, numbered after the model's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moefy.adapters.families import Slot, family, is_dense_family
from moefy.errors import MoefyError


@dataclass
class FFN:
    index: int
    w_in: nn.Linear
    act: nn.Module
    w_out: nn.Linear
    _install: Callable[[nn.Module], None]
    w_gate: nn.Linear | None = None
    projection: bool = False  # a distilled attention projection (moefy.adapters.attention), not one of the model's FFNs

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


def as_linear(slot: Slot) -> nn.Linear:
    """The module in `slot` as an nn.Linear, converting a GPT-2 Conv1D in place (idempotent)."""
    parent, name = slot
    module = getattr(parent, name)
    if not isinstance(module, nn.Linear):
        module = TransposedLinear.from_conv1d(module)
        setattr(parent, name, module)
    return module


def _installer(block: Slot, clear: Slot | None) -> Callable[[nn.Module], None]:
    def install(module: nn.Module) -> None:
        if clear is not None:
            setattr(*clear, nn.Identity())
        setattr(*block, module)

    return install


class ProjectionMLP(nn.Module):
    """y = w_out(relu(w_in(x))): the stand-in for one distilled attention projection, shaped like an
    FFN (moefy.conversion.distillation trains it)."""

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


def distilled_ffns(model: nn.Module, start: int) -> list[FFN]:
    """The projections replaced by a ProjectionMLP so far, as FFNs numbered from `start` (layer,
    then q, k, v, o), so that split, routers and MoE layers treat them like any FFN."""
    if not is_dense_family(model):
        return []
    modules = [((s.parent, s.attribute), getattr(s.parent, s.attribute)) for s in family(model).projections(model)]
    mlps = [(slot, module) for slot, module in modules if isinstance(module, ProjectionMLP)]
    return [
        FFN(start + i, mlp.w_in, mlp.act, mlp.w_out, _installer(slot, None), projection=True)
        for i, (slot, mlp) in enumerate(mlps)
    ]


def find_ffns(model: nn.Module) -> list[FFN]:
    """All FFN blocks of `model`, in layer order (encoder before decoder), indices unique; then the
    attention projections distilled into MLPs (moefy.adapters.attention), indices running on, so that
    every step converts them like FFNs."""
    ffns = [
        FFN(
            i,
            as_linear(s.w_in),
            s.act,
            as_linear(s.w_out),
            _installer(s.block, s.clear),
            as_linear(s.w_gate) if s.w_gate else None,
        )
        for i, s in enumerate(family(model).ffns(model))
    ]
    return ffns + distilled_ffns(model, start=len(ffns))


@dataclass(frozen=True)
class FFNPath:
    """Where one of a model's FFN blocks sits, as dotted module names: what a model file written for
    another runtime replaces (moefy.serving.remote_code). `clear` is the sibling that becomes the
    identity when the block is replaced (None where there is none)."""

    block: str
    act: str
    clear: str | None


def ffn_paths(model: nn.Module) -> list[FFNPath]:
    """The model's own FFN blocks (not distilled projections), in find_ffns order, before any is replaced."""
    names = {id(module): name for name, module in model.named_modules()}

    def path(slot: Slot) -> str:
        parent, attribute = slot
        return f"{names[id(parent)]}.{attribute}".lstrip(".")

    found = []
    for slots in family(model).ffns(model):
        if id(slots.act) not in names:
            raise MoefyError(f"the activation of {path(slots.block)} is not a module of the model, so no model file can name it")
        found.append(FFNPath(path(slots.block), names[id(slots.act)], None if slots.clear is None else path(slots.clear)))
    return found


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
