"""The attention-projection adapter: a model's attention projections (q, k, v, o), wherever its
family keeps them (moefy.adapters.families), and the distilled ones saved beside a model.

D2DMoE converts a projection into experts by first replacing it with a two-layer ReLU MLP that
reproduces its output (moefy.conversion.distillation trains it); the MLP is then an FFN like any
other (moefy.adapters.ffn lists it) and can be split and routed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from moefy.adapters.families import family, is_dense_family
from moefy.adapters.ffn import ProjectionMLP, as_linear
from moefy.errors import MoefyError
from moefy.files import load_tensors, save_tensors

PROJECTIONS_FILE = "projections.safetensors"  # beside a model's own weights: its distilled projections


@dataclass
class Projection:
    """One attention projection: layer index, which one (q, k, v, o, or qkv where fused), and its
    slot (parent module and attribute), which holds the nn.Linear or, once distilled, its MLP."""

    layer: int
    name: str
    parent: nn.Module
    attribute: str

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def mlp(self) -> ProjectionMLP | None:
        module = getattr(self.parent, self.attribute)
        return module if isinstance(module, ProjectionMLP) else None

    @property
    def linear(self) -> nn.Linear:
        if self.mlp is not None:
            raise MoefyError(f"projection {self.key} is distilled already: it has no nn.Linear")
        return as_linear((self.parent, self.attribute))

    def replace(self, module: nn.Module) -> None:
        setattr(self.parent, self.attribute, module)


def find_projections(model: nn.Module) -> list[Projection]:
    """Every attention projection of `model`, by layer then q, k, v, o (a GPT-2 Conv1D becomes an
    nn.Linear now, before any optimizer sees it)."""
    found = [Projection(s.layer, s.name, s.parent, s.attribute) for s in family(model).projections(model)]
    for projection in found:
        if projection.mlp is None:
            projection.linear  # noqa: B018
    return found


def save_projections(model: nn.Module, folder: str | os.PathLike) -> None:
    """The distilled MLPs of `model` into <folder>/projections.safetensors (none distilled, or a
    family without a projection adapter, such as an SMoE checkpoint: no file)."""
    if not is_dense_family(model):
        return
    tensors = {f"{p.key}.{k}": v for p in find_projections(model) if p.mlp is not None for k, v in p.mlp.state_dict().items()}
    if tensors:
        save_tensors(Path(folder) / PROJECTIONS_FILE, tensors, {"format": "moefy-projections/1"})


def install_saved_projections(model: nn.Module, folder: str | os.PathLike) -> int:
    """Put the MLPs saved in <folder>/projections.safetensors in their projections' place; how many."""
    path = Path(folder) / PROJECTIONS_FILE
    if not path.is_file():
        return 0
    tensors = load_tensors(path)
    installed = 0
    for projection in find_projections(model):
        part = {k[len(projection.key) + 1 :]: v for k, v in tensors.items() if k.startswith(projection.key + ".")}
        if not part:
            continue
        try:
            width, d_in = part["w_in.weight"].shape
            mlp = ProjectionMLP(d_in, width, part["w_out.weight"].shape[0])
            mlp.load_state_dict(part)
        except (KeyError, RuntimeError) as err:
            raise MoefyError(
                f"{path} does not hold a projection MLP for {projection.key} ({err}); rerun its distill job"
            ) from None
        projection.replace(mlp.to(next(model.parameters()).dtype))
        installed += 1
    if installed * 4 < len(tensors):  # each MLP has 4 tensors
        raise MoefyError(f"{path} holds projections this model does not have; it belongs to another model: rerun its distill job")
    return installed
