"""Training-step wall-clock (forward + backward) of moefy's trainable MoE layer against the dense FFN.

Two cases per shape, each against the dense FFN's step on the same tokens (all its weights trained):
- `upcycled top-2 of 8`: Sparse Upcycling's layer, 8 copies of the FFN, softmax top-2 gates, the
  router trained too. The arithmetic is 2x the dense FFN's; goal: at most 2.6x its time.
- `recovery b=0.2`: a split FFN (MoEfication's experts: 48 of 32 neurons for 384x1536, 64 of 172
  for 4096x11008) at budget 0.2, unweighted top-k from a frozen MLP router, experts trained.
  Goal: at most 0.5x the dense step.
Shapes d x d_ff: 384x1536 (the default model, 2048 tokens: a batch of 32 sentences of 64) and
4096x11008 (LLaMA-7B's size, two projections as in moe_speed.py, 128 tokens). Fresh tokens each call,
median of the timed calls after a warm-up, gradients zeroed between calls (not timed).

    python benchmarks/moe_train_speed.py [--quick] [--json out.json] [--no-mlflow]

--quick runs the 384x1536 shape only (seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moefy.adapters.ffn import FFN
from moefy.conversion.routers import MLPRouter, budget_to_k
from moefy.moe.sparse import Routing, from_split
from moefy.training.upcycling import upcycle
from moefy.workflow import benchmarking

SHAPES = [(384, 1536, 48, 2048), (4096, 11008, 64, 128)]
GOALS = {"upcycled top-2 of 8": 2.6, "recovery b=0.2": 0.5}  # at most this many dense steps


def dense_ffn(d: int, d_ff: int, seed: int = 0) -> FFN:
    torch.manual_seed(seed)
    w_in, w_out = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
    return FFN(0, w_in, nn.ReLU(), w_out, lambda module: None)


def step_ms(module: nn.Module, inputs: list[torch.Tensor]) -> float:
    """Median milliseconds of forward + backward over the inputs (one warm-up call first)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step(x: torch.Tensor) -> None:
        module(x).pow(2).mean().backward()

    step(inputs[0])
    times = []
    for x in inputs:
        for p in params:
            p.grad = None
        started = time.perf_counter()
        step(x)
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2] * 1e3


def shape_cases(d: int, d_ff: int, num_experts: int, tokens: int, calls: int) -> list[dict]:
    ffn = dense_ffn(d, d_ff)
    dense = nn.Sequential(ffn.w_in, ffn.act, ffn.w_out)
    inputs = [torch.randn(tokens, d) for _ in range(calls)]
    dense_ms = step_ms(dense, inputs)
    generator = torch.Generator().manual_seed(1)
    upcycled = upcycle(ffn, 8, Routing("top_k", k=2), generator=generator)
    labels = torch.randperm(d_ff, generator=generator) % num_experts
    torch.manual_seed(2)
    router = MLPRouter(d, num_experts).requires_grad_(False)
    recovery = from_split(ffn, labels, num_experts, router, k=budget_to_k(0.2, num_experts))
    rows = []
    for name, moe in (("upcycled top-2 of 8", upcycled), ("recovery b=0.2", recovery)):
        moe_ms = step_ms(moe, inputs)
        ratio = moe_ms / dense_ms
        rows.append(
            {
                "case": f"{d}x{d_ff} T={tokens} {name}",
                "d_model": d,
                "d_ff": d_ff,
                "tokens": tokens,
                "layer": name,
                "num_experts": moe.num_experts,
                "expert_size": moe.expert_size,
                "dense_ms": dense_ms,
                "moe_ms": moe_ms,
                "dense_steps": ratio,
                "goal_dense_steps": GOALS[name],
                "meets_goal": ratio <= GOALS[name],
            }
        )
        print(
            f"{rows[-1]['case']:>40}  dense {dense_ms:9.2f} ms  moe {moe_ms:9.2f} ms  {ratio:5.2f}x of dense "
            f"(goal <= {GOALS[name]}x)",
            flush=True,
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| shape | tokens | layer | dense ms | MoE ms | MoE / dense | goal |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['d_model']}x{r['d_ff']} | {r['tokens']} | {r['layer']} | {r['dense_ms']:.1f} | {r['moe_ms']:.1f} | "
            f"{r['dense_steps']:.2f}x | <= {r['goal_dense_steps']}x{'' if r['meets_goal'] else ' (missed)'} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 384x1536 shape")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--calls", type=int, default=7, help="timed steps per case")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows: list[dict] = []
    for d, d_ff, num_experts, tokens in SHAPES[:1] if args.quick else SHAPES:
        rows += shape_cases(d, d_ff, num_experts, tokens, args.calls)
    print_table(rows)
    benchmarking.save(
        "moe_train_speed",
        rows,
        benchmarking.where(torch.device("cpu")),
        args.quick,
        args.json,
        not args.no_mlflow,
        ("dense_ms", "moe_ms", "dense_steps"),
    )


if __name__ == "__main__":
    sys.exit(main())
