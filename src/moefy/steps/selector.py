"""Step 5, selector: build each layer's router and measure how well it picks experts.

  groundtruth  the oracle: top-k experts by their sum of |activations| (no parameters)
  similarity   nearest expert centroids (mean normalised key rows of the expert: W_in, or the
               gate projection of a gated FFN)
  mlp          MoEfication's router, trained on the sampled FFN inputs with BCE on scaled expert
               mass, early-stopped on held-out tokens
  norm         D2DMoE's router: an MLP trained with MSE to predict each expert's output norm
               (relative to the layer's mean), same training loop
Selector recall at a budget: the activation mass in the router's top-k experts over the mass in
the oracle's top-k, on the held-out tokens. Layers are spread over torchrun ranks. Writes
<out>/router.safetensors and <out>/metrics.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from moefy import dist, tracking
from moefy.cli import add_section_flags, run_step
from moefy.errors import MoefyError
from moefy.ffn import find_ffns
from moefy.files import load_tensors, save_tensors, write_json
from moefy.models import TASKS, load_model
from moefy.routers import (
    LOSSES,
    SELECTORS,
    GroundTruthRouter,
    MLPRouter,
    NormRouter,
    SimilarityRouter,
    budget_to_k,
    expert_centroids,
    expert_mass,
    expert_output_norms,
    router_tensors,
    scaled_mass,
    topk_recall,
    train_router,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moefy.steps.selector", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="fine-tuned model folder (finetune/model)")
    parser.add_argument("--labels", required=True, type=Path, help="balance/<split>-E<E>/labels.safetensors")
    parser.add_argument("--hidden", required=True, type=Path, help="activations/hidden.safetensors")
    parser.add_argument("--selector", required=True, choices=SELECTORS)
    parser.add_argument("--num-experts", required=True, type=int)
    parser.add_argument("--split", required=True, help="split method the labels came from (for tags)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5, 1.0], help="budgets to report recall at")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--task", choices=TASKS, default="classification", help="the task the model was fine-tuned for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_section_flags(parser, "selector")
    return parser.parse_args(argv)


def build_layer(args: argparse.Namespace, ffn, labels: torch.Tensor, x: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    """One layer's router and its held-out metrics."""
    E = args.num_experts
    with torch.no_grad():
        h = ffn.activations(x)
        mass = expert_mass(h, labels, E)
    heldout = max(1, int(round(len(x) * args.heldout_fraction)))
    x_fit, x_val, mass_val = x[:-heldout], x[-heldout:], mass[-heldout:]
    centroids = expert_centroids(ffn.keys, labels, E)
    stats: dict[str, float] = {}
    if args.selector == "groundtruth":
        router = GroundTruthRouter(labels, E)
    elif args.selector == "similarity":
        router = SimilarityRouter(centroids)
    else:
        seed = args.seed * 1000 + ffn.index
        torch.manual_seed(seed)
        if args.selector == "mlp":
            router, target = MLPRouter(x.shape[1], E, centroids), scaled_mass(mass)
        else:
            with torch.no_grad():
                norms = expert_output_norms(h, ffn.w_out.weight.detach(), labels, E)
            router, target = NormRouter(x.shape[1], E, args.norm_hidden), norms / norms[:-heldout].mean().clamp(min=1e-12)
        fit = train_router(router.to(x.device), LOSSES[args.selector], x_fit, target[:-heldout], x_val, target[-heldout:],
                           epochs=args.mlp_epochs, batch_size=args.mlp_batch_size, learning_rate=args.mlp_learning_rate,
                           patience=args.mlp_patience, seed=seed, desc=f"layer {ffn.index}")
        router = fit.router
        loss = "bce" if args.selector == "mlp" else "mse"
        stats = {"epochs_run": fit.epochs_run, "best_epoch": fit.best_epoch,
                 f"heldout_{loss}": fit.best_heldout_loss, f"heldout_{loss}_initial": fit.initial_heldout_loss}
    with torch.no_grad():
        scores = router(x_val, h[-heldout:])
    for budget in args.budgets:
        stats[f"recall@{budget:g}"] = topk_recall(scores, mass_val, budget_to_k(budget, E))
    return router.cpu(), stats


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    ffns = find_ffns(load_model(args.model, args.task).to(ctx.device))
    labels = load_tensors(args.labels)
    hidden = load_tensors(args.hidden)
    for ffn in ffns:
        for name, store in (("labels", labels), ("hidden states", hidden)):
            if f"layer.{ffn.index}" not in store:
                raise MoefyError(f"{name} file has no layer.{ffn.index}; rerun the step that writes it for this model")

    wildcards = {"split": args.split, "num_experts": args.num_experts, "selector": args.selector}
    with tracking.job_run("selector", vars(args), wildcards, enabled=ctx.is_main) as run:
        torch.manual_seed(args.seed)
        mine = {}
        for ffn in dist.shard(ffns, ctx):
            key = f"layer.{ffn.index}"
            x = hidden[key].to(ctx.device, torch.float32)
            mine[ffn.index] = build_layer(args, ffn, labels[key].long().to(ctx.device), x)
        results: dict[int, tuple[torch.nn.Module, dict]] = {}
        for part in dist.all_gather(mine, ctx):
            results.update(part)

        if ctx.is_main:
            layers = sorted(results)
            per_layer = {name: [results[i][1][name] for i in layers] for name in results[layers[0]][1]}
            metrics = {name: float(np.mean(values)) for name, values in per_layer.items()}
            metrics["per_layer"] = per_layer
            save_tensors(args.out / "router.safetensors", router_tensors({i: results[i][0] for i in layers}),
                         {"selector": args.selector, "num_experts": str(args.num_experts), "layers": str(len(layers))})
            write_json(args.out / "metrics.json", metrics)
            run.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items() if not isinstance(v, dict)})
            print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("recall")), flush=True)
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
