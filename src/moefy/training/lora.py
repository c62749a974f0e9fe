"""LoRA recovery (recover.trainable: lora): the converted model's experts train in full and its
attention projections get low-rank adapters from peft, so attention can adapt to the MoE layers at
a fraction of its weights' optimiser state; after training the adapters are merged into the
projections' weights (peft's merge_and_unload) and the recovered model is a standard checkpoint.

The projections are the ones the family registry lists (moefy.adapters.families: q, k, v and o,
or a fused qkv, of every self-attention; an encoder-decoder's cross-attention is not among them).
A projection distilled into an MLP and converted (D2DMoE's attention variant) is an MoE layer now,
whose experts train in full: it gets no adapter. Embeddings, norms and the task head stay as
fine-tuned.
"""

from __future__ import annotations

from collections.abc import Iterable

from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from moefy.adapters.families import family
from moefy.adapters.ffn import ProjectionMLP, as_linear
from moefy.errors import MoefyError


def attention_targets(model: nn.Module, moes: Iterable[nn.Module]) -> list[str]:
    """Module names (for peft's target_modules) of `model`'s attention projections that are still
    linear layers; a Conv1D becomes an nn.Linear first, its state dict keeping Conv1D's layout."""
    names = {id(module): name for name, module in model.named_modules()}
    converted = {id(moe) for moe in moes}
    targets = []
    for slot in family(model).projections(model):
        module = getattr(slot.parent, slot.attribute)
        if id(module) in converted or isinstance(module, ProjectionMLP):
            continue
        targets.append(names[id(module)])
        as_linear((slot.parent, slot.attribute))
    return targets


def add_lora(model: nn.Module, moes: Iterable[nn.Module], rank: int, alpha: float, dropout: float):
    """Put LoRA adapters on the attention projections of `model` (in place: `model` trains with them);
    returns peft's model, whose merge_and_unload() adds them into the projections' weights."""
    if rank < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise MoefyError(
            f"recover.lora_rank must be at least 1, recover.lora_alpha above 0 and recover.lora_dropout in [0, 1); "
            f"got {rank}, {alpha} and {dropout}"
        )
    targets = attention_targets(model, moes)
    if not targets:
        raise MoefyError(
            "recover.trainable lora puts LoRA adapters on the attention projections, but this model has none left as a "
            "linear layer (distilled and converted into MoE layers, whose experts train in full already): "
            "use recover.trainable experts"
        )
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    return get_peft_model(model, config)


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the LoRA adapters peft put in `model` ([] when it has none)."""
    found = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                found += list(getattr(module, name).parameters())
    return found
