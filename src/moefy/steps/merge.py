"""Step merge: a sparse MoE with fewer experts per layer, by M-SMoE or a baseline (moefy.training.merging).

Reads the model (an upcycled model moefy trained, or a Hugging Face SMoE checkpoint) and the
usage step's calibration, gives each layer its budget (`--groups` per layer; global and reap
grouping: on average) and merges or prunes each layer's experts to it with `--method` (average,
frequency, prune, msmoe, hcsmoe, reap). Writes <out>/model (moefy-sparse-moe format, reloads with moefy.export.load_sparse_moe)
and <out>/metrics.json (groups by layer, experts per layer).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moefy.adapters.models import read_training
from moefy.errors import MoefyError
from moefy.files import load_tensors, tensors_metadata, write_json
from moefy.moe.checkpoints import load_smoe, save_sparse_moe
from moefy.training.merging import METHODS, USAGE_FORMAT, Usage, merge_model, swap_layers, usage_from_tensors
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("merge", __doc__, "model", "task", "penalty", "seed", out="output folder (gets model/ and metrics.json)")
    parser.add_argument("--usage", required=True, type=Path, help="the usage step's usage.safetensors for this model")
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument(
        "--groups", required=True, type=float, help="experts per layer after merging (global and reap grouping: on average)"
    )
    parser.add_argument("--upcycled", default="", help="the model's name in upcycling.models (its MLflow tag)")
    parser.add_argument("--name", default="", help="the merged model's name, e.g. msmoe-G4 (its MLflow tag)")
    add_section_flags(parser, "merge")
    return parser.parse_args(argv)


def read_usage(path: Path) -> dict[int, Usage]:
    if tensors_metadata(path).get("format") != USAGE_FORMAT:
        raise MoefyError(f"{path} is not a usage file of this moefy; rerun its usage job")
    return usage_from_tensors(load_tensors(path))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, moes, tokenizer, site = load_smoe(args.model, args.task)
    usage = read_usage(args.usage)
    wrong = [i for i in moes if i not in usage or usage[i].counts.numel() != moes[i].router_experts]
    if wrong:
        raise MoefyError(f"{args.usage} does not describe the MoE layers {wrong} of {args.model}; rerun its usage job")
    identity = ablation(args) | {"upcycled": args.upcycled, "merged": args.name}
    with tracking.job_run("merge", vars(args), identity) as run:
        with torch.no_grad():
            merged, groups = merge_model(moes, usage, args.method, args.groups, args.grouping, args.similarity)
        swap_layers(model, moes, merged)
        experts = {str(i): moe.num_experts for i, moe in merged.items()}
        record = {
            "method": args.method,
            "groups": args.groups,
            "grouping": args.grouping,
            "similarity": args.similarity,
            "experts_per_layer": experts,
        }
        training = read_training(args.model) | {"merge": record}
        save_sparse_moe(model, merged, tokenizer, args.out / "model", args.task, training, site)
        metrics = {**identity, **record, "groups_by_layer": {str(i): g for i, g in groups.items()}}
        write_json(args.out / "metrics.json", metrics)
        run.log_metrics({f"experts/layer_{i}": n for i, n in experts.items()})
        print(f"{args.method}: experts per layer {experts}", flush=True)


if __name__ == "__main__":
    run_step(main)
