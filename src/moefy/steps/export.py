"""Export: one MoEfied model as a self-contained folder (see moefy.export) for inference elsewhere.

The model at one expert budget: the fine-tuned weights, each layer's expert layout and router,
and the top-k rule. `moefy.export.load_moe(folder)` restores it with the same logits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moefy import tracking
from moefy.cli import run_step
from moefy.export import read_moe_parts, save_moe
from moefy.models import TASKS
from moefy.routers import SELECTORS, budget_to_k


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moefy.steps.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="fine-tuned model folder (finetune/model)")
    parser.add_argument("--labels", required=True, type=Path, help="balance/<split>-E<E>/labels.safetensors")
    parser.add_argument("--router", required=True, type=Path, help="selector/<split>-E<E>-<selector>/router.safetensors")
    parser.add_argument("--split", required=True)
    parser.add_argument("--num-experts", required=True, type=int)
    parser.add_argument("--selector", required=True, choices=SELECTORS)
    parser.add_argument("--budget", required=True, type=float, help="share of experts per token, in (0, 1]")
    parser.add_argument("--task", choices=TASKS, default="classification", help="the task the model was fine-tuned for")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    args = parser.parse_args(argv)
    if not 0 < args.budget <= 1:
        parser.error(f"--budget {args.budget}: must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    labels, routers = read_moe_parts(args.labels, args.router, args.selector, args.num_experts)
    wildcards = {"split": args.split, "num_experts": args.num_experts, "selector": args.selector, "budget": args.budget}
    with tracking.job_run("export", vars(args), wildcards) as run:
        save_moe(args.model, labels, routers, args.selector, args.num_experts, args.budget, args.out, args.task)
        k = budget_to_k(args.budget, args.num_experts)
        print(f"exported {args.split} E={args.num_experts} {args.selector} at budget {args.budget:g} (k={k}) to {args.out}", flush=True)
        run.set_tags({"export.folder": str(args.out)})


if __name__ == "__main__":
    run_step(main)
