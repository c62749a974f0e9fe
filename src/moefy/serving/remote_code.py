"""A converted model exported by moefy (moefy.moe.checkpoints.save_moe) as a folder that transformers loads
with its custom-code convention, so that running it needs no moefy:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=...)  # on

The folder holds the model's config and tokenizer, `modeling_moefy.py` (the template beside this module,
which imports only torch and transformers), config.json's `auto_map` naming its classes and a `moefy`
section saying which blocks are MoE layers and how they route, and one model.safetensors with every
weight, the MoE layers' as stacked expert tensors. Its logits are moefy's own (load_moe) up to float
rounding. What the template cannot compute exactly is refused, before anything is written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from moefy.adapters.attention import PROJECTIONS_FILE
from moefy.adapters.ffn import FFNPath, ffn_paths
from moefy.adapters.models import load_model
from moefy.conversion.shared import shared_experts_of
from moefy.errors import MoefyError
from moefy.files import atomic_dir, read_json, save_tensors, write_json
from moefy.moe.checkpoints import MOE_FILE, SPARSE_FILE, moe_metadata, read_moe
from moefy.moe.layer import MoEFFN, moefy_model, set_experts_per_token
from moefy.serving.remote import modeling_moefy

FORMAT = "moefy-remote/1"
MODELING_FILE = "modeling_moefy.py"
TEMPLATE = Path(modeling_moefy.__file__)
AUTO_MAP = {
    "AutoConfig": "modeling_moefy.MoefyConfig",
    "AutoModelForSequenceClassification": "modeling_moefy.MoefyForSequenceClassification",
}
# moefy.native's activation codes (the representative router's) by the template's names for them.
ACTIVATION_NAMES = {0: "relu", 1: "gelu", 2: "gelu_tanh", 3: "silu"}
# Written anew (config, weights) or not carried over (moefy's own MoE file, distilled projections: refused).
NOT_COPIED = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt", "*.pth")


def check_representable(folder: Path, meta: dict[str, str]) -> None:
    """Refuse, naming it, what the template does not compute exactly."""
    if meta.get("task", "classification") != "classification":
        raise MoefyError(f"{folder} is a {meta['task']} model; the remote-code export writes sequence classifiers only")
    if meta.get("rule") != "top_k":
        raise MoefyError(f"{folder} selects experts by rule {meta.get('rule')!r}; the remote-code model computes top-k only")
    if meta["router"] not in modeling_moefy.ROUTERS:
        raise MoefyError(
            f"{folder} has {meta['router']!r} routers; the remote-code model computes {', '.join(modeling_moefy.ROUTERS)}"
        )
    if (folder / PROJECTIONS_FILE).is_file():
        raise MoefyError(f"{folder} has distilled attention projections, which the remote-code model does not compute")


def write_remote_code(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write `out`: the exported MoE model in `folder` as a custom-code folder for transformers."""
    folder, out = Path(folder), Path(out)
    if (folder / SPARSE_FILE).is_file():
        raise MoefyError(
            f"{folder} is an upcycled or merged MoE ({SPARSE_FILE}); the remote-code export writes converted models ({MOE_FILE})"
        )
    check_representable(folder, moe_metadata(folder))
    meta, labels, routers = read_moe(folder)
    model = load_model(str(folder), "classification").eval()
    paths = ffn_paths(model)
    layers = moefy_model(model, labels, routers, int(meta["num_experts"]), shared_experts=shared_experts_of(meta))
    set_experts_per_token(layers, int(meta["k"]))
    blocks = {path.block for path in paths}
    tensors = {key: t for key, t in model.state_dict().items() if not _inside(key, blocks)}
    for path, layer in zip(paths, layers):
        tensors |= {f"{path.block}.{name}": t for name, t in layer_tensors(layer).items()}
    config = read_json(folder / "config.json")
    config["moefy"] = spec(config["model_type"], meta, layers, paths)
    config |= {"model_type": "moefy", "architectures": ["MoefyForSequenceClassification"], "auto_map": AUTO_MAP}
    with atomic_dir(out) as tmp:
        shutil.copytree(folder, tmp, ignore=shutil.ignore_patterns(*NOT_COPIED), dirs_exist_ok=True)
        shutil.copyfile(TEMPLATE, tmp / MODELING_FILE)
        write_json(tmp / "config.json", config)
        save_tensors(
            tmp / "model.safetensors", {k: t.detach().contiguous().clone() for k, t in tensors.items()}, {"format": "pt"}
        )
    return out


def _inside(key: str, blocks: set[str]) -> bool:
    return any(key.startswith(block + ".") for block in blocks)


def layer_tensors(layer: MoEFFN) -> dict[str, torch.Tensor]:
    """One MoE layer's weights in the template's layout (MoELayer): routed experts stacked [E, ...]."""
    E, s, d = layer.num_experts, layer.expert_size, layer.d_model
    stacked = {
        "w_in": layer.w_in.view(d, E, s).permute(1, 0, 2),
        "b_in": layer.b_in,
        "w_gate": None if layer.w_gate is None else layer.w_gate.view(d, E, s).permute(1, 0, 2),
        "b_gate": layer.b_gate,
        "w_out": layer.w_out.view(E, s, -1),
        "b_out": layer.b_out,
        "shared_w_in": layer.shared_w_in,
        "shared_b_in": None if layer.shared_b_in is None else layer.shared_b_in.reshape(-1),
        "shared_w_gate": layer.shared_w_gate,
        "shared_b_gate": None if layer.shared_b_gate is None else layer.shared_b_gate.reshape(-1),
        "shared_w_out": layer.shared_w_out,
    }
    router = {f"router.{key}": t for key, t in layer.router.state_dict().items() if key != "act_code"}
    return {name: t for name, t in stacked.items() if t is not None} | router


def spec(base_model_type: str, meta: dict[str, str], layers: list[MoEFFN], paths: list[FFNPath]) -> dict:
    """config.json's `moefy` section: what the template builds (one set of shapes for every layer)."""
    first = layers[0]
    router: dict = {"kind": meta["router"]}
    if meta["router"] == "norm":
        router["hidden"] = first.router.fc1.out_features
    if meta["router"] == "representative":
        router["per_expert"] = first.router.w_in.shape[0] // first.num_experts
        router["activation"] = ACTIVATION_NAMES[int(first.router.act_code)]
    return {
        "format": FORMAT,
        "base_model_type": base_model_type,
        "router": router,
        "experts": first.num_experts,
        "shared_experts": first.shared_experts,
        "expert_size": first.expert_size,
        "k": first.k,
        "budget": float(meta["budget"]),
        "gated": first.w_gate is not None,
        "bias_in": first.b_in is not None,
        "bias_gate": first.b_gate is not None,
        "bias_out": first.b_out is not None,
        "layers": [
            {"block": path.block, "activation": path.act, "clear": path.clear, "d_model": layer.d_model, "d_out": layer.d_out}
            for path, layer in zip(paths, layers)
        ],
    }
