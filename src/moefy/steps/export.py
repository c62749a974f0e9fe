"""Step export: one MoEfied model as a self-contained folder (see moefy.moe.checkpoints) for inference elsewhere.

The model at one expert budget: the fine-tuned weights, each layer's expert layout and router,
and the top-k rule. `moefy.export.load_moe(folder)` restores it with the same logits; step remote_code rewrites a
classifier's export for transformers' custom-code loading.
"""

from __future__ import annotations

from pathlib import Path

from moefy.conversion.routers import budget_to_k
from moefy.moe.checkpoints import read_moe_parts, save_moe
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "export", __doc__, "model", "task", "penalty", "seed", "split", "num_experts", "shared_experts", "router"
    )
    parser.add_argument("--labels", required=True, type=Path, help="balance/<variant>/<split>-E<E>/labels.safetensors")
    parser.add_argument(
        "--router-file", required=True, type=Path, help="router/<variant>/<split>-E<E>-<router>/router.safetensors"
    )
    parser.add_argument("--budget", required=True, type=float, help="share of experts per token, in (0, 1]")
    args = parser.parse_args(argv)
    if not 0 < args.budget <= 1:
        parser.error(f"--budget {args.budget}: must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    labels, routers = read_moe_parts(args.labels, args.router_file, args.router, args.num_experts, args.shared_experts)
    with tracking.job_run("export", vars(args), ablation(args) | {"budget": args.budget}) as run:
        save_moe(
            args.model, labels, routers, args.router, args.num_experts, args.budget, args.out, args.task, args.shared_experts
        )
        k = budget_to_k(args.budget, args.num_experts, args.shared_experts)
        print(
            f"exported {args.split} E={args.num_experts} {args.router} at budget {args.budget:g} (k={k}) to {args.out}",
            flush=True,
        )
        run.set_tags({"export.folder": str(args.out)})


if __name__ == "__main__":
    run_step(main)
