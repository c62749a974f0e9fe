"""A sequence classifier whose feed-forward blocks moefy converted into Mixture-of-Experts layers.

moefy writes this file into the model folder, so that transformers loads the folder with its custom-code
convention (config.json's `auto_map`, `trust_remote_code` on) and nothing of moefy installed: it imports
only torch and transformers. The model is the base family's own classifier, named in config.json
(`moefy.base_model_type`), with each feed-forward block listed there replaced by an MoE layer: a router
scores the routed experts, every token runs its top k of them plus all shared experts, unweighted (the
rule moefy evaluated).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

# -- config and model: the base family's classes, resolved from config.json --------------------------


class MoefyConfig(PretrainedConfig):
    """The base family's config under model type "moefy": a type transformers does not know, so the
    folder fails to load without its code rather than loading the dense classifier with its
    feed-forward weights missing."""

    model_type = "moefy"

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        if cls is not MoefyConfig:
            return super().from_dict(config_dict, **kwargs)
        # A subclass of the base family's config class, so that its model code reads it as its own, and of
        # its name, which transformers' auto classes look classes up by (a classifier may build its body
        # with AutoModel).
        # Saving it keeps config.json's auto_map as it is (no _auto_class to write under that name).
        base = CONFIG_MAPPING[config_dict["moefy"]["base_model_type"]]
        return type(base.__name__, (MoefyConfig, base), {"_auto_class": None}).from_dict(config_dict, **kwargs)


class MoefyForSequenceClassification(PreTrainedModel):
    """What auto_map names: loading builds the base family's classifier with MoE layers (moe_classifier)."""

    config_class = MoefyConfig

    @classmethod
    def from_pretrained(cls, *args, config, **kwargs):
        return moe_classifier(config).from_pretrained(*args, config=config, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return moe_classifier(config)._from_config(config, **kwargs)


def moe_classifier(config) -> type:
    """The base family's sequence classifier class, whose __init__ then puts the MoE layers in place."""
    name = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[config.moefy["base_model_type"]]
    base = getattr(transformers, name)

    def __init__(self, config):
        base.__init__(self, config)
        install_moe(self, config.moefy)

    # Named and registered as what auto_map names, so that save_pretrained writes this file and that name again.
    attributes = {"__init__": __init__, "config_class": type(config), "_auto_class": "AutoModelForSequenceClassification"}
    return type("MoefyForSequenceClassification", (base,), attributes)


def install_moe(model: nn.Module, spec: dict) -> None:
    """Each listed block becomes an MoE layer; its activation is the block's own module; a `clear`
    module (one the block's input passed through, now inside the MoE layer) becomes the identity."""
    for layer in spec["layers"]:
        act = model.get_submodule(layer["activation"])
        _replace(model, layer["block"], MoELayer(spec, layer["d_model"], layer["d_out"], act))
        if layer.get("clear"):
            _replace(model, layer["clear"], nn.Identity())


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def _weights(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))  # filled from model.safetensors


# -- the MoE layer -------------------------------------------------------------------------------------


class MoELayer(nn.Module):
    """Routed experts as stacked tensors (w_in [E, d, s], w_out [E, s, d_out]; gated FFNs: w_gate too),
    the shared experts as one dense block of S * s neurons computed for every token."""

    def __init__(self, spec: dict, d_model: int, d_out: int, act: nn.Module):
        super().__init__()
        E, S, s, gated = spec["experts"], spec["shared_experts"], spec["expert_size"], spec["gated"]
        self.k, self.act = spec["k"], act
        self.router = ROUTERS[spec["router"]["kind"]](d_model, E, spec)
        self.w_in = _weights(E, d_model, s)
        self.b_in = _weights(E, s) if spec["bias_in"] else None
        self.w_gate = _weights(E, d_model, s) if gated else None
        self.b_gate = _weights(E, s) if gated and spec["bias_gate"] else None
        self.w_out = _weights(E, s, d_out)
        self.b_out = _weights(d_out) if spec["bias_out"] else None
        self.shared_w_in = self.shared_b_in = self.shared_w_gate = self.shared_b_gate = self.shared_w_out = None
        if S:
            self.shared_w_in = _weights(d_model, S * s)
            self.shared_b_in = _weights(S * s) if spec["bias_in"] else None
            self.shared_w_gate = _weights(d_model, S * s) if gated else None
            self.shared_b_gate = _weights(S * s) if gated and spec["bias_gate"] else None
            self.shared_w_out = _weights(S * s, d_out)

    def neurons(self, x, w_in, b_in, w_gate, b_gate):
        """act(x W_in + b_in), or act(x W_gate + b_gate) * (x W_in + b_in) for a gated FFN."""
        up = x @ w_in if b_in is None else torch.addmm(b_in, x, w_in)
        if w_gate is None:
            return self.act(up)
        return self.act(x @ w_gate if b_gate is None else torch.addmm(b_gate, x, w_gate)) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        picks = self.router(x).topk(self.k, dim=-1, sorted=False).indices  # [T, k]
        out = x.new_zeros(x.shape[0], self.w_out.shape[-1])
        for e in range(self.w_in.shape[0]):
            tokens = (picks == e).any(-1).nonzero().squeeze(1)
            if len(tokens):
                rows = x[tokens]
                h = self.neurons(
                    rows,
                    self.w_in[e],
                    None if self.b_in is None else self.b_in[e],
                    None if self.w_gate is None else self.w_gate[e],
                    None if self.b_gate is None else self.b_gate[e],
                )
                out.index_add_(0, tokens, h @ self.w_out[e])
        if self.b_out is not None:
            out = out + self.b_out
        if self.shared_w_in is not None:
            h = self.neurons(x, self.shared_w_in, self.shared_b_in, self.shared_w_gate, self.shared_b_gate)
            out = out + h @ self.shared_w_out
        return out.view(*shape[:-1], -1)


# -- routers: scores [T, E] of the routed experts, as moefy computed them -----------------------------


class SimilarityRouter(nn.Module):
    """Each expert's centroid of its neurons' normalised input rows, dotted with the token."""

    def __init__(self, d_model: int, experts: int, spec: dict):
        super().__init__()
        self.centroids = _weights(experts, d_model)

    def forward(self, x):
        return x @ self.centroids.t()


class LinearRouter(nn.Module):
    def __init__(self, d_model: int, experts: int, spec: dict):
        super().__init__()
        self.proj = nn.Linear(d_model, experts, bias=False)

    def forward(self, x):
        return self.proj(x)


class MLPRouter(nn.Module):
    """MoEfication's router: Linear(d, E) -> tanh -> Linear(E, E)."""

    def __init__(self, d_model: int, experts: int, spec: dict):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, experts), nn.Linear(experts, experts)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class NormRouter(nn.Module):
    """D2DMoE's router, predicting each expert's output norm: Linear(d, H) -> ReLU -> Linear(H, E) -> softplus."""

    def __init__(self, d_model: int, experts: int, spec: dict):
        super().__init__()
        hidden = spec["router"]["hidden"]
        self.fc1, self.fc2 = nn.Linear(d_model, hidden), nn.Linear(hidden, experts)

    def forward(self, x):
        return F.softplus(self.fc2(F.relu(self.fc1(x))))


ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu}


class RepresentativeRouter(nn.Module):
    """CMoE's router: the summed |activation| of m representative neurons per expert (their own rows of
    the FFN), times a fitted per-expert scale."""

    def __init__(self, d_model: int, experts: int, spec: dict):
        super().__init__()
        rows = experts * spec["router"]["per_expert"]
        self.act = ACTIVATIONS[spec["router"]["activation"]]
        self.w_in = _weights(rows, d_model)
        self.b_in = _weights(rows) if spec["bias_in"] else None
        self.w_gate = _weights(rows, d_model) if spec["gated"] else None
        self.b_gate = _weights(rows) if spec["gated"] and spec["bias_gate"] else None
        self.scale = _weights(experts)

    def forward(self, x):
        up = F.linear(x, self.w_in, self.b_in)
        h = self.act(up) if self.w_gate is None else self.act(F.linear(x, self.w_gate, self.b_gate)) * up
        return h.abs().unflatten(-1, (len(self.scale), -1)).sum(-1) * self.scale


ROUTERS = {
    "similarity": SimilarityRouter,
    "linear": LinearRouter,
    "mlp": MLPRouter,
    "norm": NormRouter,
    "representative": RepresentativeRouter,
}
