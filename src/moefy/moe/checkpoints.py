"""An MoEfied model as one folder that runs outside the workflow.

The folder is the fine-tuned Hugging Face model (config, tokenizer, weights in safetensors)
plus `moe.safetensors`: each layer's expert layout (neuron -> expert labels) and router
weights, with the router, expert count and selection rule in its metadata. Loading rebuilds
exactly the MoE layers evaluate measured, so the logits are the same bit for bit.

    from moefy.moe.checkpoints import load_moe
    model, tokenizer = load_moe("results/<study>/export/kmeans-E48-mlp-b0.2")
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import TRAINING_FILE, load_config, load_model, load_tokenizer
from moefy.config import TASKS
from moefy.conversion.routers import budget_to_k, build_routers, gates_of, router_tensors
from moefy.conversion.shared import check_labels_shared, shared_experts_of
from moefy.errors import MoefyError
from moefy.files import atomic_dir, load_tensors, save_tensors, tensors_metadata, write_json
from moefy.moe.compression import LowRankSparse
from moefy.moe.layer import MoEFFN, moefy_model, set_experts_per_token
from moefy.moe.sparse import Routing, SparseMoE, mask_padding

FORMAT = "moefy-moe/2"  # /2: the router kind is metadata key `router` (/1 called it `selector`)
MOE_FILE = "moe.safetensors"


def read_moe_parts(
    labels_path: Path, router_path: Path, router: str, num_experts: int, shared_experts: int
) -> tuple[dict[int, torch.Tensor], dict[int, torch.nn.Module]]:
    """The balance step's labels and the router step's routers, checked against each other and
    against what the job was asked for."""
    labels = {int(k.split(".")[1]): v.long() for k, v in load_tensors(labels_path).items()}
    check_labels_shared(labels_path, shared_experts)
    meta = tensors_metadata(router_path)
    if meta.get("router") != router or meta.get("num_experts") != str(num_experts) or shared_experts_of(meta) != shared_experts:
        raise MoefyError(
            f"{router_path} holds {meta.get('router')} routers for {meta.get('num_experts')} experts "
            f"({shared_experts_of(meta)} shared), not {router} for {num_experts} ({shared_experts} shared, as {labels_path}); "
            "rerun its router job"
        )
    try:
        routers = build_routers(router, load_tensors(router_path), labels, num_experts, shared_experts)
    except (KeyError, RuntimeError) as err:
        raise MoefyError(f"{router_path} does not match {labels_path} ({err}); rerun the router job") from None
    return labels, routers


def read_gates(router_path: Path) -> dict[int, torch.nn.Module]:
    """The softmax gates a softmax-gated recovery wrote beside its routers, by layer (none: unweighted)."""
    return gates_of(load_tensors(router_path))


def read_error_curves(router_path: Path) -> dict[int, torch.Tensor]:
    """Each layer's error curve from the router step (moefy.conversion.budgets.error_curve)."""
    curves = {int(k.split(".")[1]): t for k, t in load_tensors(router_path).items() if k.startswith("error_curve.")}
    if not curves:
        raise MoefyError(f"{router_path} has no error curves for per-layer budgets; rerun its router job with this moefy")
    return curves


def save_moe(
    model_folder: str | os.PathLike,
    labels: dict[int, torch.Tensor],
    routers: dict[int, torch.nn.Module],
    router: str,
    num_experts: int,
    budget: float,
    out: str | os.PathLike,
    task: str = "classification",
    shared_experts: int = 0,
) -> Path:
    """Write `out`: the model folder's files plus the expert layout, routers, top-k rule and task."""
    if task not in TASKS:
        raise MoefyError(f"task {task!r} is unknown; choose one of {', '.join(TASKS)}")
    if router == "groundtruth":
        raise MoefyError(
            "the groundtruth router is an oracle that computes every neuron, so it saves nothing at "
            "inference; export a similarity or mlp router instead"
        )
    model_folder, out = Path(model_folder), Path(out)
    tensors = {f"labels.{i}": t.to(torch.int32) for i, t in labels.items()}
    tensors |= {f"router.{key}": t for key, t in router_tensors(routers).items()}
    metadata = {
        "format": FORMAT,
        "task": task,
        "router": router,
        "num_experts": str(num_experts),
        "shared_experts": str(shared_experts),
        "rule": "top_k",
        "budget": repr(float(budget)),
        "k": str(budget_to_k(budget, num_experts, shared_experts)),
    }
    with atomic_dir(out) as tmp:
        shutil.copytree(model_folder, tmp, dirs_exist_ok=True)
        save_tensors(tmp / MOE_FILE, tensors, metadata)
    return out


def load_moe(folder: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, object]:
    """The exported model, in eval mode with its MoE layers at the exported budget, and its tokenizer."""
    meta, labels, routers = read_moe(folder)
    model = load_model(str(folder), meta.get("task", "classification")).to(device).eval()
    layers: list[MoEFFN] = moefy_model(model, labels, routers, int(meta["num_experts"]), shared_experts=shared_experts_of(meta))
    set_experts_per_token(layers, int(meta["k"]))
    return model, load_tokenizer(str(folder))


def moe_metadata(folder: str | os.PathLike) -> dict[str, str]:
    """An exported folder's MoE metadata (router, expert counts, rule, k, task), its format checked."""
    moe_file = Path(folder) / MOE_FILE
    if not moe_file.is_file():
        raise MoefyError(f"{folder} has no {MOE_FILE}: it is not a model exported by moefy (python -m moefy.steps.export)")
    meta = tensors_metadata(moe_file)
    if meta.get("format") != FORMAT:
        raise MoefyError(
            f"{moe_file} is format {meta.get('format')!r}; this moefy reads {FORMAT!r}. Export it again with this version"
        )
    return meta


def read_moe(folder: str | os.PathLike) -> tuple[dict[str, str], dict[int, torch.Tensor], dict[int, torch.nn.Module]]:
    """An exported folder's metadata (moe_metadata), expert labels and routers by layer."""
    meta = moe_metadata(folder)
    tensors = load_tensors(Path(folder) / MOE_FILE)
    labels = {int(key.split(".")[1]): t.long() for key, t in tensors.items() if key.startswith("labels.")}
    num_experts, shared = int(meta["num_experts"]), shared_experts_of(meta)
    router_weights = {key.removeprefix("router."): t for key, t in tensors.items() if key.startswith("router.")}
    return meta, labels, build_routers(meta["router"], router_weights, labels, num_experts, shared)


# -- trained MoE models (upcycled) ----------------------------------------------------------------

SPARSE_FORMAT = "moefy-sparse-moe/1"
SPARSE_FILE = "sparse_moe.safetensors"


SITES = ("ffn", "smoe")  # where a layer goes back: the dense FFN of that index, or the Hugging Face MoE block


def _site(path: Path, layers: dict) -> str:
    """Where a saved file's MoE layers go back: one site for every layer."""
    sites = {spec.get("site", "ffn") for spec in layers.values()}
    if len(sites) != 1:
        raise MoefyError(f"{path} mixes MoE layer sites {sorted(sites)}; save it again with this moefy")
    return sites.pop()


def save_sparse_moe(
    model: torch.nn.Module,
    moes: dict[int, SparseMoE],
    tokenizer,
    out: str | os.PathLike,
    task: str,
    training: dict | None = None,
    site: str = "ffn",
) -> Path:
    """Write `out`: a standard Hugging Face folder holding every weight but the MoE layers', plus
    `sparse_moe.safetensors` with each MoE layer (by FFN index, or with site "smoe" by the index
    of the Hugging Face MoE block it replaces, moefy.adapters.smoe), its routing and its shapes (merged:
    its expert map; compressed: its factors), and the model's training record (training.json)."""
    if site not in SITES:
        raise MoefyError(f"site {site!r} is not one of {', '.join(SITES)}")
    if task not in TASKS:
        raise MoefyError(f"task {task!r} is unknown; choose one of {', '.join(TASKS)}")
    inside = {name for name, module in model.named_modules() if isinstance(module, SparseMoE)}
    rest = {k: v for k, v in model.state_dict().items() if not any(k.startswith(prefix + ".") for prefix in inside)}
    tensors, layers = {}, {}
    for index, moe in moes.items():
        tensors |= {f"layer.{index}.{name}": t.detach().contiguous() for name, t in moe.state_dict().items()}
        if not isinstance(moe.router, torch.nn.Linear):
            raise MoefyError(
                "save_sparse_moe saves upcycled layers (a Linear router); a converted layer goes back with write_back"
            )
        layers[str(index)] = {
            "routing": asdict(moe.routing),
            "num_experts": moe.num_experts,
            "router_experts": moe.router_experts,
            "expert_size": moe.expert_size,
            "gated": moe.gated,
            "factored": sorted(moe.factored),
            "site": site,
        }
    metadata = {"format": SPARSE_FORMAT, "task": task, "layers": json.dumps(layers, sort_keys=True)}
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, state_dict=rest, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_tensors(tmp / SPARSE_FILE, tensors, metadata)
        if training is not None:
            write_json(tmp / TRAINING_FILE, training)
    return Path(out)


def load_sparse_moe(
    folder: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[int, SparseMoE], object]:
    """The saved model with its MoE layers in place (eval mode; padding, from the attention mask,
    goes to no expert), the layers by FFN index, and its tokenizer."""
    folder = Path(folder)
    path = folder / SPARSE_FILE
    if not path.is_file():
        raise MoefyError(
            f"{folder} has no {SPARSE_FILE}: it is not an MoE model trained by moefy (python -m moefy.steps.train_moe)"
        )
    meta = tensors_metadata(path)
    if meta.get("format") != SPARSE_FORMAT:
        raise MoefyError(
            f"{path} is format {meta.get('format')!r}; this moefy reads {SPARSE_FORMAT!r}. Train it again with this version"
        )
    tensors = load_tensors(path)
    layers = json.loads(meta["layers"])
    if _site(path, layers) == "smoe":
        from moefy.adapters.smoe import find_smoe_blocks, load_hf_model  # the HF families' own MoE blocks

        model = load_hf_model(str(folder), meta["task"])
        # the activation of each block, read off its own conversion (one layer's copy at a time)
        slots = {block.index: (lambda b=block: b.to_sparse().act, block.install) for block in find_smoe_blocks(model)}
    else:
        model = load_model(str(folder), meta["task"])
        slots = {ffn.index: (lambda f=ffn: f.act, ffn.replace) for ffn in find_ffns(model)}
    moes = {}
    for key, spec in layers.items():
        index = int(key)
        if index not in slots:
            raise MoefyError(f"{path} has an MoE for layer {index}, but the model has {sorted(slots)}")
        part = {name.removeprefix(f"layer.{index}."): t for name, t in tensors.items() if name.startswith(f"layer.{index}.")}
        act, install = slots[index]
        moe = sparse_moe_from_tensors(part, act(), Routing(**spec["routing"]))
        install(moe)
        moes[index] = moe
    mask_padding(model, moes.values())
    return model.to(device).eval(), moes, load_tokenizer(str(folder))


def sparse_moe_from_tensors(part: dict[str, torch.Tensor], act: torch.nn.Module, routing: Routing) -> SparseMoE:
    """A SparseMoE from its state_dict (a Linear router; compressed weights as their factors)."""
    weight = part.pop("router.weight")
    bias = part.pop("router.bias", None)
    router = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    router.weight.data = weight
    if bias is not None:
        router.bias.data = bias
    factored = {}
    for name in ("w_in", "w_gate", "w_out"):
        prefix = f"factored.{name}."
        pieces = {k.removeprefix(prefix): part.pop(k) for k in list(part) if k.startswith(prefix)}
        if pieces:
            factored[name] = LowRankSparse(**pieces)
            part[name] = factored[name]().detach()
    moe = SparseMoE(act=act, router=router, routing=routing, **part)
    for name, factors in factored.items():
        moe.compress(name, factors)
    return moe


def load_smoe(
    folder: str | os.PathLike, task: str, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[int, SparseMoE], object, str]:
    """(model, MoE layers by index, tokenizer, site) of a sparse MoE: a folder moefy wrote (upcycled,
    merged, compressed), or a Hugging Face SMoE checkpoint (Mixtral, Switch, ...: moefy.adapters.smoe)."""
    folder = Path(folder)
    if (folder / SPARSE_FILE).is_file():
        site = _site(folder / SPARSE_FILE, json.loads(tensors_metadata(folder / SPARSE_FILE)["layers"]))
        model, moes, tokenizer = load_sparse_moe(folder, device)
        return model, moes, tokenizer, site
    from moefy.adapters.families import smoe_families
    from moefy.adapters.smoe import load_hf_smoe

    model_type = getattr(load_config(str(folder)), "model_type", None)
    if model_type not in smoe_families():
        raise MoefyError(
            f"{folder} is not an MoE model trained by moefy (it has no {SPARSE_FILE}: python -m moefy.steps.upcycle and "
            f"train_moe write one), nor a Hugging Face MoE checkpoint (its model type is {model_type!r}; MoE families: "
            f"{', '.join(smoe_families())})"
        )
    model, moes, tokenizer = load_hf_smoe(str(folder), task)
    return model.to(device).eval(), moes, tokenizer, "smoe"


def bytes_on_disk(folder: str | os.PathLike) -> int:
    """Bytes of a model folder's weight files (*.safetensors): what a user stores and loads."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))
