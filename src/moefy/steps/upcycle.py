"""Step upcycle: Sparse Upcycling of a fine-tuned model, written before any training.

The chosen FFNs become MoEs whose experts are copies of the FFN (a share redrawn with
Drop-Upcycling), each with a new router (moefy.training.upcycling). The folder it writes is what the
train_moe step trains on, and what a user reloads with moefy.export.load_sparse_moe; its
metrics.json gives the parameters and active parameters per token at initialisation.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from moefy.adapters.models import load_model, load_tokenizer, read_training
from moefy.files import write_json
from moefy.moe.checkpoints import save_sparse_moe
from moefy.moe.sparse import Routing
from moefy.training.upcycling import upcycle_model
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "upcycle", __doc__, "model", "task", "penalty", "seed", out="output folder (gets model/ and metrics.json)"
    )
    parser.add_argument("--name", required=True, help="the model's name in upcycling.models (its MLflow tag)")
    add_section_flags(parser, "upcycle")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = load_model(args.model, args.task).eval()
    routing = Routing(args.routing, args.k, args.renormalize, args.capacity_factor)
    with tracking.job_run("upcycle", vars(args), ablation(args) | {"upcycled": args.name}) as run:
        dense_parameters = sum(p.numel() for p in model.parameters())
        moes = upcycle_model(model, args.layers, args.experts, routing, args.drop_ratio, args.router_std, seed=args.seed)
        total = sum(p.numel() for p in model.parameters())
        expert = sum(p.numel() for moe in moes.values() for n, p in moe.named_parameters() if not n.startswith("router."))
        upcycled = {
            "name": args.name,
            "layers": sorted(moes),
            "experts": args.experts,
            "routing": asdict(routing),
            "drop_ratio": args.drop_ratio,
            "router_std": args.router_std,
        }
        metrics = {
            **ablation(args),
            "upcycled": upcycled,
            "dense_parameters": dense_parameters,
            "total_parameters": total,
            "active_parameters": total - expert + sum(moe.active_parameters() for moe in moes.values()),
        }
        training = read_training(args.model) | {"upcycle": upcycled}
        save_sparse_moe(model, moes, load_tokenizer(args.model), args.out / "model", args.task, training)
        write_json(args.out / "metrics.json", metrics)
        run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int)})
        print(
            f"upcycled FFNs {sorted(moes)} into {args.experts} experts ({routing.kind}): "
            f"{total:,} parameters, {metrics['active_parameters']:,} active per token",
            flush=True,
        )


if __name__ == "__main__":
    run_step(main)
