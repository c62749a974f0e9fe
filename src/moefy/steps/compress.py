"""Step compress: MC-SMoE's compression of a merged sparse MoE, one-shot from an SVD.

Every expert weight becomes a low-rank product plus a sparse remainder (moefy.moe.compression):
rank `rank_fraction` of the smaller dimension, the remainder's largest `sparse_fraction` of
entries kept. A distillation run (train_moe --mode merged) then trains the factors. Writes
<out>/model and <out>/metrics.json (relative reconstruction error of every weight).
"""

from __future__ import annotations

import torch

from moefy.adapters.models import read_training
from moefy.files import write_json
from moefy.moe.checkpoints import load_smoe, save_sparse_moe
from moefy.moe.compression import compress_experts
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "compress", __doc__, "model", "task", "penalty", "seed", out="output folder (gets model/ and metrics.json)"
    )
    parser.add_argument("--upcycled", default="", help="the model's name in upcycling.models (its MLflow tag)")
    parser.add_argument("--name", default="", help="the compressed model's name, e.g. msmoe-G4-svd (its MLflow tag)")
    add_section_flags(parser, "compress")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, moes, tokenizer, site = load_smoe(args.model, args.task)
    identity = ablation(args) | {"upcycled": args.upcycled, "merged": args.name}
    with tracking.job_run("compress", vars(args), identity) as run:
        with torch.no_grad():
            errors = {i: compress_experts(moe, args.rank_fraction, args.sparse_fraction) for i, moe in moes.items()}
        record = {"rank_fraction": args.rank_fraction, "sparse_fraction": args.sparse_fraction}
        training = read_training(args.model) | {"compress": record}
        save_sparse_moe(model, moes, tokenizer, args.out / "model", args.task, training, site)
        flat = {f"error/layer_{i}/{name}": e for i, per in errors.items() for name, e in per.items()}
        write_json(args.out / "metrics.json", {**identity, **record, "relative_error": flat})
        run.log_metrics(flat)
        worst = max(flat.values()) if flat else 0.0
        print(f"compressed {len(moes)} MoE layers; largest relative reconstruction error {worst:.3f}", flush=True)


if __name__ == "__main__":
    run_step(main)
