"""Whole-model compute per token: what a conversion saves on the model, not only on its FFNs.

FLOPs are 2 per multiply-add. Per token: every projection matrix of the layers (attention q, k, v,
o and the FFNs; nn.Linear and transformers' Conv1D alike), the attention scores (Q K^T and the
weighted sum of V: 4 x width x the keys a token attends to, the test set's mean length L for
an encoder, (L + 1) / 2 for a causal decoder), and the head: a next-token head per token, a
classifier (with its pooler) once per sequence, so 1 / L per token. Embeddings, norms, biases
and softmaxes aside.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from moefy.adapters.ffn import find_ffns, self_attention


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs per token of the dense model, by part."""

    ffn: float
    projections: float  # every other matrix of the layers (attention q, k, v, o)
    attention_scores: float
    head: float

    @property
    def total(self) -> float:
        return self.ffn + self.projections + self.attention_scores + self.head

    def fraction_with(self, ffn_fraction: float) -> float:
        """The whole model's FLOPs with its FFNs at `ffn_fraction` of dense (routers included), over dense."""
        return (self.total - self.ffn + ffn_fraction * self.ffn) / self.total


def _matrices(model: nn.Module):
    """(name, multiply-adds per application) of every projection matrix: nn.Linear and Conv1D."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and weight is not None):
            yield name, module, weight.numel()


def model_flops(model: nn.Module, mean_length: float, causal: bool) -> ModelFlops:
    """The dense model's FLOPs per token at the test set's mean length (in tokens)."""
    ffn_modules = {id(m) for f in find_ffns(model) for m in (f.w_in, f.w_gate, f.w_out) if m is not None}
    base = getattr(model, "base_model_prefix", "")
    ffn = projections = head = 0.0
    for name, module, macs in _matrices(model):
        if id(module) in ffn_modules:
            ffn += 2 * macs
        elif name.startswith(base + ".") and "pooler" not in name:
            projections += 2 * macs
        else:  # the task head (and a pooler): per token for a next-token head, else once per sequence
            head += 2 * macs if causal else 2 * macs / max(mean_length, 1.0)
    layers, width = self_attention(model.config)
    keys = (mean_length + 1) / 2 if causal else mean_length
    return ModelFlops(ffn, projections, 4.0 * width * keys * layers, head)


class ForwardTimer:
    """Wall-clock of a model's whole forward passes (CUDA synchronised), via hooks on the model."""

    def __init__(self):
        self.seconds = 0.0
        self._started = 0.0

    def _sync(self, tensor_device) -> None:
        if tensor_device is not None and tensor_device.type == "cuda":
            torch.cuda.synchronize(tensor_device)

    @contextmanager
    def attached(self, model: nn.Module):
        device = next(model.parameters()).device

        def before(module, args, kwargs):
            self._sync(device)
            self._started = time.perf_counter()

        def after(module, args, kwargs, output):
            self._sync(device)
            self.seconds += time.perf_counter() - self._started

        handles = [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
