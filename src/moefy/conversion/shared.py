"""Shared experts: the neurons that fire on most tokens, computed for every token (CMoE, 2025).

A gated SiLU FFN is not ReLU-sparse: some neurons carry a large |h| on almost every token, and
leaving them to a router loses on every token what any expert without them would. They become
`S` always-on experts; the other neurons are split into the `E - S` routed experts.

Which neurons (config split.shared_by):
- firing: those firing on the most calibration tokens, where a neuron fires on a token when its |h|
  is among the token's top `activations.fire_fraction` (h != 0 for ReLU-like activations): the
  diagonal of the activations step's co-activation counts, scale-free per token, CMoE's rule.
- mass: those with the largest summed |h| over the token sample. Decoder LLMs have a few massive
  activations (SmolLM2's layer 11: one neuron's |h| reaches 3,300 where the layer's median neuron
  peaks at 1.8) on rare tokens; firing never ranks them shared, and a router that misses them on
  those tokens wrecks the output, where mass ranks them first.

Labels keep their meaning (expert id per neuron, every expert d_ff / E neurons): routed experts
are 0..E-S-1 and the shared ones E-S..E-1, so the balance step, the layer's neuron order and the
checkpoints read them unchanged; the routers score the routed experts only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moefy.errors import MoefyError
from moefy.files import tensors_metadata


def shared_neurons(scores: torch.Tensor | np.ndarray, shared_experts: int, num_experts: int) -> np.ndarray:
    """The ids (sorted) of the shared_experts * d_ff / E neurons of the highest scores (firing
    counts, or mass); ties go to the lower id, so the choice is deterministic."""
    counts = np.asarray(torch.as_tensor(scores).double().cpu().numpy())
    d_ff = len(counts)
    check_shared(shared_experts, num_experts)
    size = d_ff // num_experts
    order = np.lexsort((np.arange(d_ff), -counts))  # most firing first, then lower id
    return np.sort(order[: shared_experts * size])


@torch.no_grad()
def neuron_mass(ffn, x: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """Each neuron's summed |h| [d_ff] (float64) over the FFN inputs x [N, d]."""
    mass = torch.zeros(ffn.d_ff, dtype=torch.float64)
    for part in x.split(chunk_tokens):
        mass += ffn.activations(part.to(ffn.w_in.weight.dtype)).abs().double().sum(0).cpu()
    return mass


def check_shared(shared_experts: int, num_experts: int) -> None:
    if not 0 <= shared_experts < num_experts:
        raise MoefyError(
            f"shared_experts={shared_experts} must be at least 0 and below num_experts={num_experts}: "
            "at least one expert must be routed"
        )


def with_shared(routed_labels: np.ndarray, shared: np.ndarray, d_ff: int, num_experts: int, shared_experts: int) -> np.ndarray:
    """Labels for all d_ff neurons from the routed neurons' split (values 0..E-S-1, in the order of
    the neurons that are not in `shared`) and the shared neuron ids, which fill experts E-S..E-1."""
    routed_count = num_experts - shared_experts
    size = d_ff // num_experts
    routed = routed_neurons(shared, d_ff)
    routed_labels = np.asarray(routed_labels, dtype=np.int64)
    if len(routed_labels) != len(routed) or (len(routed) and not 0 <= routed_labels.min() <= routed_labels.max() < routed_count):
        raise MoefyError(
            f"the routed split has {len(routed_labels)} labels in {routed_labels.min() if len(routed_labels) else '-'}.."
            f"{routed_labels.max() if len(routed_labels) else '-'}; expected {len(routed)} in 0..{routed_count - 1}"
        )
    labels = np.empty(d_ff, dtype=np.int64)
    labels[routed] = routed_labels
    labels[shared] = routed_count + np.arange(len(shared)) // size
    return labels


def routed_neurons(shared: np.ndarray, d_ff: int) -> np.ndarray:
    """The ids (sorted) of the neurons not in `shared`."""
    keep = np.ones(d_ff, dtype=bool)
    keep[shared] = False
    return np.flatnonzero(keep)


def labels_metadata(split: str, num_experts: int, shared_experts: int) -> dict[str, str]:
    """The metadata of a labels file (split and balance steps): what made it, and how many of its
    experts are shared."""
    return {"split": split, "num_experts": str(num_experts), "shared_experts": str(shared_experts)}


def shared_experts_of(metadata: dict[str, str]) -> int:
    """How many experts of a labels file are shared (files from before shared experts: none)."""
    return int(metadata.get("shared_experts", 0))


def check_labels_shared(path: Path, shared_experts: int) -> None:
    """A labels file (split or balance step) must hold the shared experts its reader was asked for."""
    made_with = shared_experts_of(tensors_metadata(path))
    if made_with != shared_experts:
        raise MoefyError(f"{path} has {made_with} shared experts, not {shared_experts}; rerun its split job")
