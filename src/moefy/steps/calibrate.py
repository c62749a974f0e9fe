"""Step calibrate: measure which MoE kernel is fastest on this machine for the study's FFN shape
(and, when the grid converts attention, for each distilled projection's shape).

Times embedding bags, the loop of matmuls over the experts (native where it builds), grouped matmuls and masked-dense on the model's first FFN (with the
activation the fine-tune will give it) over a ladder of token counts and experts per token, for
every expert count of the grid (with shared experts: the routed experts' part of the FFN, which
is what the kernels run), with the threads an evaluate job gets, in the precision it runs in. Writes
<out>/moe_kernels.json, which every evaluate job of the study reads, so that all of them, and
every rerun, use the same kernels (see moefy.moe.kernel_choice).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn

from moefy import dist, native
from moefy.adapters.attention import find_projections
from moefy.adapters.ffn import FFN, ProjectionMLP, find_ffns
from moefy.adapters.models import load_model
from moefy.config import section_properties
from moefy.conversion.distillation import width_for
from moefy.conversion.split import check_num_experts
from moefy.files import write_json
from moefy.measure import machine
from moefy.measure.evaluation import PRECISIONS
from moefy.moe.kernel_choice import FORMAT, ffn_shape_key, measure
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("calibrate", __doc__, "model", "task", "device")
    parser.add_argument("--num-experts", required=True, type=int, nargs="+", help="every expert count of the grid")
    parser.add_argument(
        "--shared-experts",
        type=int,
        nargs="+",
        help="the shared experts of each --num-experts, in its order (default: none); the kernels run the rest",
    )
    parser.add_argument(
        "--activation",
        choices=section_properties("finetune")["activation"]["enum"],
        default="relu",
        help="the FFN activation after fine-tuning (config finetune.activation)",
    )
    parser.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="what the kernels are timed in: evaluate's precision (config evaluate.precision)",
    )
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--projection-flops-factor",
        type=float,
        help="also measure the shapes of the attention projections distilled at this FLOPs factor (config distill.flops_factor)",
    )
    parser.add_argument(
        "--width-multiple", type=int, default=1, help="what the distilled widths are rounded up to (step distill)"
    )
    args = parser.parse_args(argv)
    args.shared_experts = args.shared_experts or [0] * len(args.num_experts)
    if len(args.shared_experts) != len(args.num_experts):
        parser.error("give one --shared-experts count per --num-experts")
    return args


def routed_part(ffn: FFN, num_experts: int, shared_experts: int) -> FFN:
    """A stand-in of the FFN's routed experts: its first (E - S) * d_ff / E neurons (the kernels'
    speed depends on the shape, not on which neurons)."""
    if not shared_experts:
        return ffn
    neurons = (num_experts - shared_experts) * (ffn.d_ff // num_experts)

    def rows(linear: nn.Linear | None, out: bool = False) -> nn.Linear | None:
        if linear is None:
            return None
        weight = linear.weight[:, :neurons] if out else linear.weight[:neurons]
        part = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            part.weight.copy_(weight)
            if linear.bias is not None:
                part.bias.copy_(linear.bias if out else linear.bias[:neurons])
        return part

    return FFN(ffn.index, rows(ffn.w_in), ffn.act, rows(ffn.w_out, out=True), lambda m: None, w_gate=rows(ffn.w_gate))


def shapes_to_measure(model, args) -> list[FFN]:
    """The first FFN, and one stand-in per distinct distilled projection shape when asked for."""
    ffns = [find_ffns(model)[0]]
    if args.projection_flops_factor is not None:
        seen = set()
        for projection in find_projections(model):
            d_out, d_in = projection.linear.weight.shape
            width = width_for(d_in, d_out, args.projection_flops_factor, args.width_multiple)
            if (d_in, width, d_out) not in seen:
                seen.add((d_in, width, d_out))
                mlp = ProjectionMLP(d_in, width, d_out).to(projection.linear.weight.device)
                ffns.append(FFN(len(ffns), mlp.w_in, mlp.act, mlp.w_out, lambda m: None, projection=True))
    return ffns


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    model = load_model(
        args.model, args.task, activation="relu" if args.activation == "relu" else None, trust_remote_code=args.trust_remote_code
    ).to(ctx.device, PRECISIONS[args.precision])
    with tracking.job_run("calibrate", vars(args)) as run:
        looped = native.implementation(ctx.device)  # built now, before the timings and their progress bar
        shapes = {}
        experts = list(zip(args.num_experts, args.shared_experts))
        for whole, (num_experts, shared) in itertools.product(shapes_to_measure(model, args), experts):
            check_num_experts(whole.d_ff, num_experts)
            ffn, routed = routed_part(whole, num_experts, shared), num_experts - shared
            table = measure(ffn, routed, ctx.device)
            key = ffn_shape_key(ffn, routed)
            shapes[key] = table.to_json()
            print(
                f"{key}: fastest kernel per token count (rows) and experts per token / E (columns "
                f"{', '.join(f'{d:g}' for d in table.densities)}):",
                flush=True,
            )
            for tokens, row in zip(table.tokens, table.winners):
                print(f"  {tokens:>5} tokens: {' '.join(f'{w:>7}' for w in row)}", flush=True)
        write_json(
            args.out / "moe_kernels.json",
            {
                "format": FORMAT,
                "machine": machine.describe(ctx.device),
                "threads": torch.get_num_threads(),
                "looped_kernel": looped,
                "shapes": shapes,
            },
        )
        run.log_artifact(args.out / "moe_kernels.json")
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
