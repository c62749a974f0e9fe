"""A moefy MoE decoder written as a transformers MoE class that serving runtimes load unchanged.

A LLaMA-like decoder (llama, mistral, qwen2: the same attention, norms, RoPE and embedding names)
whose FFNs are moefy MoE layers (SparseMoE: converted, recovered, upcycled) becomes:
- Qwen2-MoE, where every form fits: E experts of s neurons (`moe_intermediate_size`), softmax
  top-k gates renormalised or not (`norm_topk_prob`), a shared expert (`shared_expert`, scaled by
  sigmoid(`shared_expert_gate`(x))), dense layers as `mlp_only_layers`;
- Mixtral where it is the exact form too and simpler: renormalised top-k, no shared experts.

How moefy's parts fold into that form, exactly:
- a softmax-gated conversion (moefy.conversion.routers.SoftmaxGate) weighs a pick by
  E * softmax(s * z) over the E routed experts' logits z = W x: the router becomes s * W (a
  softmax top-k picks the same experts iff s > 0), and the factor E goes into every routed
  expert's down projection;
- the shared experts' neurons become the shared expert, with a zero shared_expert_gate (sigmoid
  0 = 1/2) and its down projection doubled;
- without shared experts the Qwen2-MoE form gets a shared expert of one neuron whose weights are
  all 0 (it adds exactly 0), because the class always has one;
- a merged layer (MC-SMoE, HC-SMoE: router slots that share a merged expert) gets one expert per
  router slot, a copy of the slot's merged expert: moefy sums the gates of a token's picks that
  share an expert and computes it once, which equals the copies' sum. The served folder is as
  large as the unmerged model (`duplicated_experts` in the record says how many copies); the
  runtimes have no form that shares one expert between slots.

What has no exact form is refused, naming it: MoEfication's unweighted top-k (its gates are 1
whatever the logits), a gate scale s <= 0, an MLP / norm / representative router, dynamic-k,
expert choice, different k or expert sizes
across layers, biases in the FFNs or in the attention output, ungated or non-SiLU FFNs, distilled
attention projections. Every export is checked by loading it back and comparing its logits with
moefy's model on probe tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

from moefy.adapters.attention import PROJECTIONS_FILE
from moefy.adapters.families import SERVED_BASES
from moefy.errors import MoefyError
from moefy.files import atomic_dir, save_tensors
from moefy.moe.sparse import SparseMoE

PROBE_TOKENS = 48
TOLERANCE = 1e-4  # max |logit difference| / max(1, max |logit|) the export accepts
# The shared expert's gate: sigmoid(w x) = 1/2 for every token. Not w = 0: llama.cpp computes sigmoid(z)
# as silu(z) / z, 0 / 0 at z = 0; with w = 1e-20, z is ~1e-19 (a normal float) and sigmoid(z) = 1/2 exactly.
SHARED_GATE_WEIGHT = 1e-20


@dataclass(frozen=True)
class Layout:
    """The one expert layout every MoE layer of the export shares."""

    num_experts: int
    k: int
    expert_size: int
    shared_size: int  # 0: no shared experts
    renormalize: bool

    @property
    def architecture(self) -> str:
        return "MixtralForCausalLM" if self.renormalize and not self.shared_size else "Qwen2MoeForCausalLM"


def _refuse(what: str) -> MoefyError:
    return MoefyError(f"no exact Qwen2-MoE / Mixtral form: {what}; nothing was written")


def router_weight(moe: SparseMoE) -> torch.Tensor:
    """The served router's weight [E, d]: softmax(W' x) picks the experts moefy picks and gives
    the gates moefy gives (up to the factor E a softmax-gated layer folds into its experts)."""
    router = moe.router
    inner = getattr(router, "router", None)  # a converted layer's router, seen through _RouterScores
    if inner is not None:
        proj = getattr(inner, "proj", None)
        if not isinstance(proj, nn.Linear):
            raise _refuse(f"a {type(inner).__name__} routes (served routers are one linear map: recover with router linear)")
        router = proj
    if not isinstance(router, nn.Linear):
        raise _refuse(f"a {type(router).__name__} routes")
    if router.bias is not None:
        raise _refuse("the router has a bias")
    weight = router.weight.detach().float()
    if moe.routing.kind == "unweighted_top_k":
        if moe.gate is None:
            raise _refuse(
                "MoEfication's unweighted top-k sums its picks with gate 1 (recover with kd-softmax or task-softmax "
                "for softmax gates)"
            )
        scale = float(moe.gate.scale.detach())
        if scale <= 0:
            raise _refuse(
                f"the softmax gates' scale is {scale:.4g}: served routers weigh most the experts they pick, which "
                "needs a scale above 0"
            )
        return scale * weight
    if moe.routing.kind != "top_k":
        raise _refuse(f"{moe.routing.kind} routing")
    return weight


def is_silu(act: nn.Module) -> bool:
    """Whether `act` computes SiLU (transformers has its own SiLU modules)."""
    x = torch.linspace(-8, 8, 161)
    with torch.no_grad():
        return torch.allclose(act(x), F.silu(x), atol=1e-6)


def layout_of(moes: dict[int, SparseMoE]) -> Layout:
    """The layout of the export, refused where the layers differ or a layer has no served form."""
    layouts = set()
    for index, moe in moes.items():
        if not moe.gated or not is_silu(moe.act):
            raise _refuse(f"layer {index}'s experts are not gated SiLU FFNs")
        if any(t is not None for t in (moe.b_in, moe.b_gate, moe.expert_bias, moe.shared_bias)):
            raise _refuse(f"layer {index}'s FFN has biases")
        shared = 0 if moe.shared is None else moe.shared.w_in.shape[1]
        if moe.shared is not None and (moe.shared.b_in is not None or moe.shared.b_gate is not None):
            raise _refuse(f"layer {index}'s shared experts have biases")
        k = moe.routing.k
        renormalize = moe.routing.kind == "top_k" and moe.routing.renormalize
        layouts.add(Layout(moe.router_experts, k, moe.expert_size, shared, renormalize))
    if len(layouts) != 1:
        raise _refuse(f"the MoE layers differ in experts, k, expert size or shared neurons ({sorted(map(str, layouts))})")
    return layouts.pop()


def served_config(base, layout: Layout, dense_layers: list[int]):
    """The MoE class's config: the base decoder's attention, norms, RoPE and embeddings, the MoE layout."""
    model_type = getattr(base, "model_type", None)
    if model_type not in SERVED_BASES:
        raise _refuse(f"the base model is {model_type!r}, not one of {', '.join(SERVED_BASES)}")
    if getattr(base, "mlp_bias", False) or getattr(base, "hidden_act", "silu") != "silu":
        raise _refuse("the base FFNs are not bias-free SiLU FFNs")
    attention_bias = SERVED_BASES[model_type]
    if attention_bias is None and getattr(base, "attention_bias", False):
        raise _refuse("the attention output projection has a bias")
    windowed = getattr(base, "sliding_window", None) if not hasattr(base, "use_sliding_window") else base.use_sliding_window
    if windowed:
        raise _refuse("the base attends within a sliding window")
    common = dict(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=base.num_hidden_layers,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        head_dim=getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=base.max_position_embeddings,
        rms_norm_eps=base.rms_norm_eps,
        rope_parameters=copy.deepcopy(base.rope_parameters),
        # untied: llama.cpp loads no Qwen2-MoE without its own output matrix (the embeddings are copied)
        tie_word_embeddings=False,
        attention_dropout=0.0,
        bos_token_id=base.bos_token_id,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id,
        num_experts_per_tok=layout.k,
        dtype="float32",
    )
    if layout.architecture == "MixtralForCausalLM":
        if dense_layers:
            raise _refuse(f"layers {dense_layers} stay dense, which Mixtral cannot hold")
        return MixtralConfig(**common, num_local_experts=layout.num_experts, sliding_window=None)
    return Qwen2MoeConfig(
        **common,
        num_experts=layout.num_experts,
        moe_intermediate_size=layout.expert_size,
        shared_expert_intermediate_size=max(layout.shared_size, 1),
        norm_topk_prob=layout.renormalize,
        qkv_bias=bool(attention_bias),
        mlp_only_layers=dense_layers,
        decoder_sparse_step=1,
        use_sliding_window=False,
    )


def slot_experts(moe: SparseMoE) -> list[int]:
    """The stored expert each router slot computes: itself, or in a merged layer its merged expert."""
    if moe.expert_map is None:
        return list(range(moe.num_experts))
    return moe.expert_map.cpu().tolist()


def moe_tensors(prefix: str, moe: SparseMoE, mixtral: bool) -> dict[str, torch.Tensor]:
    """One MoE layer's weights under the MoE class's checkpoint names (hub per-expert layout), one
    expert per router slot."""
    w_in, w_gate, w_out = (moe.weight(name).detach().float() for name in ("w_in", "w_gate", "w_out"))  # [E, d, s] / [E, s, d]
    fold = float(moe.router_experts) if moe.gate is not None else 1.0  # E * softmax: E into the down projections
    out = {f"{prefix}.gate.weight": router_weight(moe).contiguous()}
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for slot, e in enumerate(slot_experts(moe)):
        weights = (w_gate[e].t(), w_in[e].t(), fold * w_out[e].t())
        out |= {f"{prefix}.experts.{slot}.{name}.weight": w.contiguous() for name, w in zip(names, weights)}
    if mixtral:
        return out
    d = moe.d_model
    if moe.shared is None:  # the class always has a shared expert: one neuron that adds 0
        shared = (torch.zeros(1, d), torch.zeros(1, d), torch.zeros(d, 1))
    else:  # the gate's sigmoid is 1/2: the down projection doubled
        shared = (moe.shared.w_gate.t(), moe.shared.w_in.t(), 2.0 * moe.shared.w_out.t())
    names = ("gate_proj", "up_proj", "down_proj")
    out |= {f"{prefix}.shared_expert.{n}.weight": w.detach().float().contiguous() for n, w in zip(names, shared)}
    out[f"{prefix}.shared_expert_gate.weight"] = torch.full((1, d), SHARED_GATE_WEIGHT)
    return out


def served_checkpoint(model: nn.Module, moes: dict[int, SparseMoE]) -> tuple[object, dict[str, torch.Tensor]]:
    """(config, weights under the hub checkpoint names) of the MoE class holding `model`: a decoder
    whose FFN i is moes[i], dense where absent."""
    base = model.config
    layers = base.num_hidden_layers
    if set(moes) - set(range(layers)):
        raise _refuse(f"MoE layers {sorted(set(moes) - set(range(layers)))} are not FFNs of the decoder's {layers} layers")
    layout = layout_of(moes)
    dense = [i for i in range(layers) if i not in moes]
    config = served_config(base, layout, dense)
    config.architectures = [layout.architecture]
    mixtral = layout.architecture == "MixtralForCausalLM"
    moe_blocks = tuple(f"model.layers.{i}.mlp." for i in moes)
    state = {k: t.detach().float().contiguous() for k, t in model.state_dict().items() if not k.startswith(moe_blocks)}
    for i, moe in moes.items():  # Qwen2-MoE's dense layers keep the base's MLP names
        state |= moe_tensors(f"model.layers.{i}.{'block_sparse_moe' if mixtral else 'mlp'}", moe, mixtral)
    # tied in the base: the output matrix is a copy of the embeddings (safetensors stores no shared tensors)
    state["lm_head.weight"] = state.get("lm_head.weight", state["model.embed_tokens.weight"]).clone()
    return config, state


def probe_ids(vocab_size: int) -> torch.Tensor:
    """Fixed random token ids [2, PROBE_TOKENS] for the logit check."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, PROBE_TOKENS), generator=generator)


@torch.no_grad()
def logit_difference(reference: nn.Module, served: nn.Module, vocab_size: int) -> float:
    """max |logit difference| / max(1, max |logit|) on the probe tokens."""
    ids = probe_ids(vocab_size)
    expected = reference(input_ids=ids).logits.float()
    got = served(input_ids=ids).logits.float()
    return float((expected - got).abs().max() / expected.abs().max().clamp(min=1.0))


def write_served(model: nn.Module, moes: dict[int, SparseMoE], tokenizer, source: str | Path, out: str | Path) -> dict:
    """Write `out` as the MoE class's folder (safetensors, config, tokenizer, generation config),
    loaded back with AutoModelForCausalLM and checked against `model`; returns what was written."""
    if (Path(source) / PROJECTIONS_FILE).is_file():
        raise _refuse("attention projections are distilled into MLPs")
    model = model.float().eval()
    config, state = served_checkpoint(model, moes)
    with atomic_dir(out) as tmp:
        config.save_pretrained(tmp)
        save_tensors(tmp / "model.safetensors", state, {"format": "pt"})
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        loaded, info = AutoModelForCausalLM.from_pretrained(
            tmp, trust_remote_code=False, dtype=torch.float32, output_loading_info=True
        )
        unmapped = {name: keys for name, keys in info.items() if keys and name != "error_msgs"}
        if unmapped or info.get("error_msgs"):
            raise _refuse(f"weights that do not load as {config.architectures[0]}: {unmapped or info['error_msgs']}")
        difference = logit_difference(model, loaded.eval(), config.vocab_size)
        if difference > TOLERANCE:
            raise _refuse(f"its logits differ from moefy's by {difference:.3g} (relative; at most {TOLERANCE:g} accepted)")
    return {
        "architecture": config.architectures[0],
        "routed_experts": getattr(config, "num_experts", None) or config.num_local_experts,
        "experts_per_token": config.num_experts_per_tok,
        "logit_difference": difference,
        "duplicated_experts": sum(len(slot_experts(m)) - len(set(slot_experts(m))) for m in moes.values()),
        "bytes": sum(p.stat().st_size for p in Path(out).glob("*.safetensors")),
    }
