"""Step split: group each FFN layer's neurons into experts.

  random  seeded equal groups (the baseline)
  kmeans  balanced k-means on the L2-normalised key rows, W_in or a gated FFN's gate projection
          (MoEfication's parameter clustering)
  coact   METIS on the neuron co-activation graph (may come out slightly unbalanced)
With --shared-experts S, the S * d_ff / E neurons that fired on the most calibration tokens (the
co-activation counts' diagonal), or with --shared-by mass those of the largest summed |h| over the
hidden-state sample, become the always-on experts E-S..E-1 and the method splits the rest into the
routed experts 0..E-S-1 (moefy.conversion.shared).
Layers are spread over torchrun ranks and gathered on rank 0, which writes
<out>/labels.safetensors (`layer.{i}`: int64 [d_ff]) and <out>/metrics.json.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from moefy import dist
from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import load_model
from moefy.conversion.balance import expert_sizes
from moefy.conversion.shared import (
    check_shared,
    labels_metadata,
    neuron_mass,
    routed_neurons,
    shared_neurons,
    with_shared,
)
from moefy.conversion.split import balanced_kmeans, check_num_experts, coact_split, random_split
from moefy.errors import MoefyError
from moefy.files import load_tensors, save_tensors, tensors_metadata, write_json
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "split", __doc__, "model", "task", "penalty", "seed", "convert", "split", "num_experts", "shared_experts", "device"
    )
    parser.add_argument(
        "--coactivation", type=Path, help="activations/<variant>/coactivation.safetensors (coact, or shared experts by firing)"
    )
    parser.add_argument("--hidden", type=Path, help="activations/<variant>/hidden.safetensors (shared experts by mass)")
    add_section_flags(parser, "split")
    return parser.parse_args(argv)


def split_layer(args, ffn, coactivation: dict | None, hidden: dict | None, tokens: int, device: torch.device) -> np.ndarray:
    """The layer's labels: its shared experts' neurons (if any) first set aside, the rest split."""
    layer, w_in = ffn.index, ffn.keys
    d_ff, routed_experts = w_in.shape[0], args.num_experts - args.shared_experts
    counts = None if coactivation is None else coactivation[f"layer.{layer}"]
    shared = np.zeros(0, dtype=np.int64)
    if args.shared_experts:
        if args.shared_by == "mass":
            scores = neuron_mass(ffn, hidden[f"layer.{layer}"].to(device, torch.float32))
        else:
            scores = counts.diagonal()
        shared = shared_neurons(scores, args.shared_experts, args.num_experts)
    routed = routed_neurons(shared, d_ff)
    seed = args.seed * 1000 + layer
    if args.split == "random":
        labels = random_split(len(routed), routed_experts, seed=seed)
    elif args.split == "kmeans":
        gpu = device.index if device.type == "cuda" else None
        labels = balanced_kmeans(
            w_in[routed],
            routed_experts,
            seed=seed,
            kmeans_iterations=args.kmeans_iterations,
            rounds=args.balanced_rounds,
            gpu=gpu,
        )
    else:
        index = torch.from_numpy(routed)
        labels = coact_split(
            counts[index][:, index] if len(shared) else counts,
            tokens,
            routed_experts,
            neighbors=args.coact_neighbors,
            ufactor=args.coact_ufactor,
            seed=seed,
        )
    return with_shared(labels, shared, d_ff, args.num_experts, args.shared_experts) if len(shared) else labels


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    ffns = find_ffns(load_model(args.model, args.task))
    check_num_experts(ffns[0].d_ff, args.num_experts)
    check_shared(args.shared_experts, args.num_experts)
    coactivation, hidden, tokens = None, None, 0
    if args.split == "coact" or (args.shared_experts and args.shared_by == "firing"):
        if args.coactivation is None:
            raise MoefyError(
                "the coact split and shared experts by firing need --coactivation (the activations step's coactivation.safetensors)"
            )
        coactivation = load_tensors(args.coactivation)
        tokens = int(tensors_metadata(args.coactivation)["tokens"])
    if args.shared_experts and args.shared_by == "mass":
        if args.hidden is None:
            raise MoefyError("shared experts by mass need --hidden (the activations step's hidden.safetensors)")
        hidden = load_tensors(args.hidden)

    with tracking.job_run("split", vars(args), ablation(args), enabled=ctx.is_main) as run:
        mine = {}
        for ffn in dist.shard(ffns, ctx):
            started = time.time()
            labels = split_layer(args, ffn, coactivation, hidden, tokens, ctx.device)
            mine[ffn.index] = (labels, time.time() - started)
        results: dict[int, tuple[np.ndarray, float]] = {}
        for part in dist.all_gather(mine, ctx):
            results.update(part)

        if ctx.is_main:
            layers = sorted(results)
            sizes = [expert_sizes(results[i][0], args.num_experts) for i in layers]
            metrics = {
                "seconds_per_layer": [results[i][1] for i in layers],
                "seconds_total": float(sum(results[i][1] for i in layers)),
                "min_expert_size": int(min(s.min() for s in sizes)),
                "max_expert_size": int(max(s.max() for s in sizes)),
                "target_expert_size": ffns[0].d_ff // args.num_experts,
            }
            save_tensors(
                args.out / "labels.safetensors",
                {f"layer.{i}": torch.from_numpy(results[i][0]) for i in layers},
                labels_metadata(args.split, args.num_experts, args.shared_experts),
            )
            write_json(args.out / "metrics.json", metrics)
            run.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, list)})
            print(
                f"{args.split} split into {args.num_experts} experts ({args.shared_experts} shared): sizes {metrics['min_expert_size']}-"
                f"{metrics['max_expert_size']} (target {metrics['target_expert_size']}), {metrics['seconds_total']:.2f} s",
                flush=True,
            )
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
