"""Step router: build each layer's router and measure how well it picks experts.

  groundtruth  the oracle: top-k experts by their sum of |activations| (no parameters)
  similarity   nearest expert centroids (mean normalised key rows of the expert: W_in, or the
               gate projection of a gated FFN)
  mlp          MoEfication's router, trained on the sampled FFN inputs with BCE on scaled expert
               mass, early-stopped on held-out tokens
  norm         D2DMoE's router: an MLP trained with MSE to predict each expert's output norm
               (relative to the layer's mean), same training loop
Routers score the routed experts; shared experts (the labels' last --shared-experts) always run.
Router recall at a budget: the activation mass in the router's top-k experts over the mass in
the oracle's top-k, on the held-out tokens. On the same tokens, each layer's error curve (the FFN
output's mean squared error with the router's top k routed experts, k = 0..E-S), which evaluate
spreads per-layer budgets by (moefy.conversion.budgets). Layers are spread over torchrun ranks.
Writes <out>/router.safetensors (routers `layer.{i}.*`, curves `error_curve.{i}`) and
<out>/metrics.json. A trained router whose last epoch had the best held-out loss stopped at
router.mlp_epochs while still improving (moefy.training.convergence): metrics.json counts those
layers (stopped_at_cap; per_layer has each layer's flag), the log warns once, and the router file's
metadata carries the count to the evaluate step's records and the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moefy import dist
from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import load_model
from moefy.config import section_defaults
from moefy.conversion.budgets import error_curve
from moefy.conversion.routers import RouterSettings, fit_router, heldout_count, router_tensors
from moefy.conversion.shared import check_labels_shared
from moefy.errors import MoefyError
from moefy.files import load_tensors, save_tensors, write_json
from moefy.training import convergence
from moefy.workflow import tracking
from moefy.workflow.cli import CONVERSION_FLAGS, ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "router",
        __doc__,
        "model",
        "task",
        *CONVERSION_FLAGS,
        "device",
    )
    parser.add_argument("--labels", required=True, type=Path, help="balance/<variant>/<split>-E<E>/labels.safetensors")
    parser.add_argument("--hidden", required=True, type=Path, help="activations/<variant>/hidden.safetensors")
    parser.add_argument(
        "--budgets", type=float, nargs="+", default=section_defaults("evaluate")["budgets"], help="budgets to report recall at"
    )
    add_section_flags(parser, "router")
    return parser.parse_args(argv)


def capped_layers(per_layer: dict[str, list], layers: list[int]) -> list[int]:
    """The layers whose router stopped at its epoch cap while still improving (none for untrained routers)."""
    return [i for i, capped in zip(layers, per_layer.get(convergence.KEY, [])) if capped]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    ffns = find_ffns(load_model(args.model, args.task).to(ctx.device))
    labels = load_tensors(args.labels)
    check_labels_shared(args.labels, args.shared_experts)
    hidden = load_tensors(args.hidden)
    for ffn in ffns:
        for name, store in (("labels", labels), ("hidden states", hidden)):
            if f"layer.{ffn.index}" not in store:
                raise MoefyError(f"{name} file has no layer.{ffn.index}; rerun the step that writes it for this model")

    settings = RouterSettings.of(vars(args))
    with tracking.job_run("router", vars(args), ablation(args), enabled=ctx.is_main) as run:
        torch.manual_seed(args.seed)
        mine = {}
        for ffn in dist.shard(ffns, ctx):
            key = f"layer.{ffn.index}"
            x = hidden[key].to(ctx.device, torch.float32)
            layer_labels = labels[key].long().to(ctx.device)
            router, stats = fit_router(
                args.router,
                ffn,
                layer_labels,
                x,
                args.num_experts,
                settings,
                args.budgets,
                seed=args.seed * 1000 + ffn.index,
                shared_experts=args.shared_experts,
            )
            heldout = x[-heldout_count(len(x), settings) :]
            curve = error_curve(ffn, layer_labels, args.num_experts, args.shared_experts, router.to(ctx.device), heldout)
            mine[ffn.index] = (router.cpu(), stats, curve)
        results: dict[int, tuple[torch.nn.Module, dict, torch.Tensor]] = {}
        for part in dist.all_gather(mine, ctx):
            results.update(part)

        if ctx.is_main:
            layers = sorted(results)
            per_layer = {name: [results[i][1][name] for i in layers] for name in results[layers[0]][1]}
            metrics = {name: float(np.mean(values)) for name, values in per_layer.items()}
            capped = capped_layers(per_layer, layers)
            if convergence.KEY in per_layer:
                metrics[convergence.KEY] = len(capped)
            metrics["per_layer"] = per_layer
            curves = {f"error_curve.{i}": results[i][2] for i in layers}
            save_tensors(
                args.out / "router.safetensors",
                router_tensors({i: results[i][0] for i in layers}) | curves,
                {
                    "router": args.router,
                    "num_experts": str(args.num_experts),
                    "shared_experts": str(args.shared_experts),
                    "layers": str(len(layers)),
                    convergence.KEY: str(len(capped)),
                },
            )
            write_json(args.out / "metrics.json", metrics)
            run.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if not isinstance(v, dict)})
            print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("recall")), flush=True)
            if capped:
                what = f"the {args.router} router of {len(capped)} of {len(layers)} layers ({', '.join(map(str, capped))})"
                print(convergence.warning(what, f"router.mlp_epochs {settings.mlp_epochs}"), flush=True)
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
