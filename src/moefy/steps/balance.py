"""Step balance: every expert gets exactly d_ff / E neurons, and every split is scored.

Splits that are balanced already (random, kmeans) pass through unchanged. Shared experts are
balanced by construction, so no neuron moves into or out of them. METIS parts (coact)
are evened out by the moves that lose the least association weight; the MoEfication baseline
(random moves) is scored beside it. For every split the metrics record the share of
co-activation kept inside experts (raw counts, and above-chance counts) and the k-means objective.
Writes <out>/labels.safetensors (`layer.{i}`: int64 [d_ff], each label exactly d_ff/E times)
and <out>/metrics.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import load_model
from moefy.config import section_defaults
from moefy.conversion.balance import balance_least_loss, balance_random, is_balanced, weight_kept
from moefy.conversion.coactivation import excess
from moefy.conversion.shared import check_labels_shared, labels_metadata
from moefy.conversion.split import association_graph, check_num_experts, kmeans_objective
from moefy.errors import MoefyError
from moefy.files import load_tensors, save_tensors, tensors_metadata, write_json
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "balance", __doc__, "model", "task", "penalty", "seed", "convert", "split", "num_experts", "shared_experts"
    )
    parser.add_argument("--labels", required=True, type=Path, help="split/<variant>/<split>-E<E>/labels.safetensors")
    parser.add_argument("--coactivation", required=True, type=Path, help="activations/<variant>/coactivation.safetensors")
    parser.add_argument(
        "--coact-neighbors",
        type=int,
        default=section_defaults("split")["coact_neighbors"],
        help="association graph edges per neuron, as in the split (config split.coact_neighbors)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ffns = find_ffns(load_model(args.model, args.task))
    size = check_num_experts(ffns[0].d_ff, args.num_experts)
    split_labels = load_tensors(args.labels)
    check_labels_shared(args.labels, args.shared_experts)
    coactivation = load_tensors(args.coactivation)
    tokens = int(tensors_metadata(args.coactivation)["tokens"])

    with tracking.job_run("balance", vars(args), ablation(args)) as run:
        per_layer: dict[str, list[float]] = {}
        balanced = {}
        for ffn in ffns:
            key = f"layer.{ffn.index}"
            if key not in split_labels or split_labels[key].numel() != ffn.d_ff:
                raise MoefyError(f"{args.labels} has no {ffn.d_ff}-neuron labels for {key}; rerun the split step for this model")
            split = split_labels[key].numpy().astype(np.int64)
            counts = coactivation[key]
            above_chance = excess(counts, tokens)
            labels = split
            if not is_balanced(split, args.num_experts):
                labels = balance_least_loss(split, association_graph(counts, tokens, args.coact_neighbors), args.num_experts)
            row = {
                "coact_kept": weight_kept(counts, labels),
                "excess_coact_kept": weight_kept(above_chance, labels),
                "kmeans_objective": kmeans_objective(ffn.keys, labels),
                "moved_neurons": int(np.sum(np.maximum(np.bincount(split, minlength=args.num_experts) - size, 0))),
                "excess_coact_kept_before": weight_kept(above_chance, split),
                # MoEfication's rule, moving random surplus neurons, for comparison
                "excess_coact_kept_random_balance": weight_kept(
                    above_chance, balance_random(split, args.num_experts, seed=args.seed * 1000 + ffn.index)
                ),
            }
            for name, value in row.items():
                per_layer.setdefault(name, []).append(float(value))
            balanced[key] = torch.from_numpy(labels)

        metrics = {name: float(np.mean(values)) for name, values in per_layer.items()}
        metrics["per_layer"] = per_layer
        save_tensors(
            args.out / "labels.safetensors", balanced, labels_metadata(args.split, args.num_experts, args.shared_experts)
        )
        write_json(args.out / "metrics.json", metrics)
        run.log_metrics({k: v for k, v in metrics.items() if not isinstance(v, dict)})
    print(", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not isinstance(v, dict)), flush=True)


if __name__ == "__main__":
    run_step(main)
