"""The FFN adapter: the one place that knows where a model family keeps its feed-forward blocks.

Everything else sees an FFN as neurons, h = act(w_in(x)) and y = w_out(h), and never names an
architecture. Supporting a new family means adding one finder to `_FINDERS`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

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


def _bert_like_activation(config, name: str) -> None:
    config.hidden_act = name


_FINDERS = {name: _bert_like for name in ("bert", "roberta", "xlm-roberta", "electra", "camembert")}
_ACTIVATION_SETTERS = {name: _bert_like_activation for name in _FINDERS}


def _model_type(config) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in _FINDERS:
        raise MoefyError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(sorted(_FINDERS))}. "
            "Point model.name_or_path at a model of one of these families."
        )
    return model_type


def find_ffns(model: nn.Module) -> list[FFN]:
    """All FFN blocks of `model`, in layer order."""
    return _FINDERS[_model_type(model.config)](model)


def set_activation(config, name: str) -> None:
    """Set the FFN activation in a model config (e.g. 'relu' for relufication) before loading weights."""
    _ACTIVATION_SETTERS[_model_type(config)](config, name)


def check_supported(config) -> None:
    _model_type(config)


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
