"""The FFN adapter: the one place that knows where a model family keeps its feed-forward blocks.

Everything else sees an FFN as neurons, h = act(w_in(x)) and y = w_out(h), and never names an
architecture. A gated FFN (LLaMA's SwiGLU, T5 v1.1's gated GELU) has one more projection:
h = act(w_gate(x)) * w_in(x), so neuron i is row i of w_gate and w_in together. Supporting a new
family means adding one `Family` to `_FAMILIES`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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

    def replace(self, module: nn.Module) -> None:
        """Make the block compute `module(x)` in place of w_out(act(w_in(x)))."""
        self._install(module)


def _bert_like(model: nn.Module) -> list[FFN]:
    """BERT, RoBERTa, XLM-R, ELECTRA: layer.intermediate = (dense, act), layer.output.dense = W_out."""
    ffns = []
    for i, layer in enumerate(model.base_model.encoder.layer):

        def install(module: nn.Module, layer=layer) -> None:
            layer.intermediate = nn.Identity()
            layer.output.dense = module

        ffns.append(FFN(i, layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense, install))
    return ffns


@dataclass(frozen=True)
class Family:
    """What moefy needs to know about one model family."""

    find: Callable[[nn.Module], list[FFN]]
    set_activation: Callable[[Any, str], None]  # on a config, before the weights are loaded
    d_ff: Callable[[Any], int]  # from a config, to check expert counts before any job runs


def _bert_like_activation(config, name: str) -> None:
    config.hidden_act = name


BERT_LIKE = Family(find=_bert_like, set_activation=_bert_like_activation, d_ff=lambda config: config.intermediate_size)
_FAMILIES = {name: BERT_LIKE for name in ("bert", "roberta", "xlm-roberta", "electra", "camembert")}


def family(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise MoefyError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(sorted(_FAMILIES))}. "
            "Point model.name_or_path at a model of one of these families."
        )
    return _FAMILIES[model_type]


def find_ffns(model: nn.Module) -> list[FFN]:
    """All FFN blocks of `model`, in layer order."""
    return family(model.config).find(model)


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
