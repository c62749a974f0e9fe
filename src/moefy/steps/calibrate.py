"""Step calibrate: measure which MoE kernel is fastest on this machine for the study's FFN shape.

Times embedding bags, grouped matmuls and masked-dense on the model's first FFN (with the
activation the fine-tune will give it) over a ladder of token counts and experts per token, for
every expert count of the grid, with the threads an evaluate job gets. Writes
<out>/moe_kernels.json, which every evaluate job of the study reads, so that all of them, and
every rerun, use the same kernels (see moefy.kernel_choice).
"""

from __future__ import annotations

import argparse

import torch

from moefy import dist, machine, tracking
from moefy.cli import run_step, step_parser
from moefy.config import section_properties
from moefy.ffn import find_ffns
from moefy.files import write_json
from moefy.kernel_choice import FORMAT, measure, shape_key
from moefy.models import load_model
from moefy.split import check_num_experts


def parse_args(argv: list[str] | None):
    parser = step_parser("calibrate", __doc__, "model", "task", "device")
    parser.add_argument("--num-experts", required=True, type=int, nargs="+", help="every expert count of the grid")
    parser.add_argument(
        "--activation",
        choices=section_properties("finetune")["activation"]["enum"],
        default="relu",
        help="the FFN activation after fine-tuning (config finetune.activation)",
    )
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    model = load_model(
        args.model, args.task, activation="relu" if args.activation == "relu" else None, trust_remote_code=args.trust_remote_code
    ).to(ctx.device)
    ffn = find_ffns(model)[0]
    gated = ffn.w_gate is not None
    with tracking.job_run("calibrate", vars(args)) as run:
        shapes = {}
        for num_experts in args.num_experts:
            check_num_experts(ffn.d_ff, num_experts)
            table = measure(ffn, num_experts, ctx.device)
            shapes[shape_key(ffn.d_model, ffn.d_ff, num_experts, gated)] = table.to_json()
            print(
                f"E={num_experts}: fastest kernel per token count (rows) and experts per token / E (columns "
                f"{', '.join(f'{d:g}' for d in table.densities)}):",
                flush=True,
            )
            for tokens, row in zip(table.tokens, table.winners):
                print(f"  {tokens:>5} tokens: {' '.join(f'{w:>7}' for w in row)}", flush=True)
        write_json(
            args.out / "moe_kernels.json",
            {"format": FORMAT, "machine": machine.describe(ctx.device), "threads": torch.get_num_threads(), "shapes": shapes},
        )
        run.log_artifact(args.out / "moe_kernels.json")
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
