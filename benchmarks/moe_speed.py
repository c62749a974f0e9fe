"""Wall-clock of moefy's MoE FFN against the dense FFN it replaces, same weights, router included.

Shapes d x d_ff: 384x1536 (E=48, the default model), 768x3072 (E=96, BERT-base) and 4096x11008
(E=64, LLaMA-7B); token batches 1, 16, 256 and, for the small shapes, 4096 (an evaluate batch of
the default study); budgets (share of experts per token) 0.1, 0.2, 0.25, 0.5 and 1.0. Each call gets
fresh tokens (so the router picks fresh experts) and runs after the last-level cache was flushed, as
in a real model where the other layers' weights evict this one's. The router is MoEfication's MLP
(d -> E -> E) and its time is counted in the MoE's. As in the study, the MoE's kernel is the one
measured fastest for each shape first (moefy.moe.kernel_choice; --fixed-rules takes the fixed rules
instead), and every row says which kernels ran.

Targets on 2 CPU cores, 4096x11008, one token: >= 3x faster than dense at 0.25, >= 6x at 0.1,
at most 10% slower at 1.0; 256 tokens: >= 1.5x at 0.25. 384x1536, 4096 tokens: never slower than
dense below budget 1.0 (masked-dense is the fallback), >= 1.5x at 0.2.

    python benchmarks/moe_speed.py [--quick] [--json out.json] [--device cpu|cuda] [--dtypes fp32 bf16]

--dtypes bf16 runs the same cases with the FFN, router and tokens in bfloat16 (dense bf16 against MoE
bf16, same weights; kernels measured in bf16): on AVX512-BF16 and AMX CPUs users serve in bf16. Each
row gives the achieved GFLOP/s of both sides: the dense FFN's FLOPs over its time, and the MoE's
computed FLOPs (the picked experts and the router) over its time, so a kernel's distance from the
dense matmul's rate is visible beside its speed-up.

--quick runs the 4096x11008 one-token case at 0.25 (under a minute). Results are printed as a
table, written with --json, and logged to MLflow (experiment `moefy-benchmarks`).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moefy import native
from moefy.adapters.ffn import FFN
from moefy.conversion.routers import MLPRouter, budget_to_k
from moefy.measure.evaluation import PRECISIONS
from moefy.moe.kernel_choice import measure
from moefy.moe.layer import MoEFFN, kernel_calls
from moefy.workflow import benchmarking

SHAPES = [(384, 1536, 48, (1, 16, 256, 4096)), (768, 3072, 96, (1, 16, 256, 4096)), (4096, 11008, 64, (1, 16, 256))]
BUDGETS = [0.1, 0.2, 0.25, 0.5, 1.0]


class CacheFlusher:
    """Streams through a buffer larger than the last-level cache between timed calls."""

    def __init__(self, device: torch.device, megabytes: int = 128):
        self.buffer = torch.zeros(megabytes * 2**20 // 4, device=device)

    def __call__(self) -> None:
        self.buffer.add_(1.0)


def timed(fn, inputs: list[torch.Tensor], flush: CacheFlusher, device: torch.device) -> float:
    """Median milliseconds of fn over the inputs, cold cache each time (after one warm-up)."""
    fn(inputs[0])
    times = []
    for x in inputs:
        flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    times.sort()
    return times[len(times) // 2] * 1e3


def dense_ffn(d: int, d_ff: int, seed: int = 0) -> FFN:
    torch.manual_seed(seed)
    w_in, w_out = nn.Linear(d, d_ff), nn.Linear(d_ff, d)
    with torch.no_grad():
        w_out.weight.mul_(0.1)
    return FFN(0, w_in, nn.ReLU(), w_out, lambda module: None)


def shape_cases(
    d: int,
    d_ff: int,
    num_experts: int,
    batches: list[int],
    budgets: list[float],
    device: torch.device,
    flush: CacheFlusher,
    calls: int,
    calibrate: bool = True,
    dtype: str = "fp32",
) -> list[dict]:
    ffn = dense_ffn(d, d_ff)
    for linear in (ffn.w_in, ffn.w_out):
        linear.to(PRECISIONS[dtype])
    labels = torch.randperm(d_ff, generator=torch.Generator().manual_seed(1)) % num_experts
    torch.manual_seed(2)
    kernels = measure(ffn, num_experts, device) if calibrate else None
    moe = MoEFFN(ffn, labels, MLPRouter(d, num_experts), num_experts, kernels).to(device=device, dtype=PRECISIONS[dtype])
    dense = nn.Sequential(ffn.w_in, ffn.act, ffn.w_out).to(device)
    dense_flops = moe.dense_flops_per_token
    rows = []
    with torch.inference_mode():
        for tokens in batches:
            repeats = calls if tokens < 256 else max(5, calls // 4) if tokens < 4096 else 5
            inputs = [torch.randn(tokens, d, device=device, dtype=PRECISIONS[dtype]) for _ in range(repeats)]
            dense_ms = timed(dense, inputs, flush, device)
            for budget in budgets:
                moe.k = budget_to_k(budget, num_experts)
                kernel_calls([moe])
                moe_ms = timed(moe, inputs, flush, device)
                used = ", ".join(sorted(kernel_calls([moe]))) or "dense"
                check = inputs[0]
                picked = (
                    moe.select(check)[0]
                    if moe.k < num_experts
                    else torch.ones(tokens, num_experts, dtype=torch.bool, device=device)
                )
                reference = ffn.w_out(ffn.activations(check) * picked[:, labels.to(device)])
                error = float((moe(check) - reference).abs().max())
                moe_flops = dense_flops if used == "dense" else moe.flops_per_token(moe.k, router_runs=True)
                rows.append(
                    {
                        "case": f"{d}x{d_ff} E={num_experts} T={tokens} b={budget:g} {dtype}",
                        "device": device.type,
                        "dtype": dtype,
                        "d_model": d,
                        "d_ff": d_ff,
                        "num_experts": num_experts,
                        "tokens": tokens,
                        "budget": budget,
                        "k": moe.k,
                        "dense_ms": dense_ms,
                        "moe_ms": moe_ms,
                        "speedup": dense_ms / moe_ms,
                        "dense_gflops_per_s": dense_flops * tokens / dense_ms / 1e6,
                        "moe_gflops_per_s": moe_flops * tokens / moe_ms / 1e6,
                        "kernel": used,
                        "calibrated": calibrate,
                        "max_abs_error": error,
                    }
                )
                print(
                    f"{rows[-1]['case']:>41} {device.type:>4}  dense {dense_ms:9.3f} ms  moe {moe_ms:9.3f} ms  "
                    f"{dense_ms / moe_ms:5.2f}x  {used:>8}  GFLOP/s {rows[-1]['dense_gflops_per_s']:.1f} / "
                    f"{rows[-1]['moe_gflops_per_s']:.1f}  (max |diff| {error:.1e})",
                    flush=True,
                )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\nlooped kernel on the CPU: {native.implementation(torch.device('cpu'))}")
    print(
        "\n| shape | E | tokens | budget | dtype | dense ms | MoE ms | speed-up | dense GFLOP/s | MoE GFLOP/s | kernel |"
        "\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['d_model']}x{r['d_ff']} | {r['num_experts']} | {r['tokens']} | {r['budget']:g} | {r['dtype']} | "
            f"{r['dense_ms']:.3f} | {r['moe_ms']:.3f} | {r['speedup']:.2f}x | {r['dense_gflops_per_s']:.1f} | "
            f"{r['moe_gflops_per_s']:.1f} | {r['kernel']} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 4096x11008, one token, budget 0.25")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="all: CPU, and CUDA where present")
    parser.add_argument("--calls", type=int, default=40, help="timed calls per case (a quarter for 256 tokens)")
    parser.add_argument("--fixed-rules", action="store_true", help="choose kernels by the fixed rules, not by measuring")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(PRECISIONS), default=["fp32"], help="precisions to time in")
    parser.add_argument("--shapes", nargs="+", help="only these shapes, as DxF (e.g. 384x1536 4096x11008)")
    args = parser.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device == "cuda" or (args.device == "all" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device here")
        devices.append(torch.device("cuda"))
    rows: list[dict] = []
    for device in devices:
        flush = CacheFlusher(device, megabytes=128 if device.type == "cpu" else 256)
        shapes = [SHAPES[-1]] if args.quick else SHAPES
        if args.shapes:
            shapes = [shape for shape in shapes if f"{shape[0]}x{shape[1]}" in args.shapes]
            if not shapes:
                parser.error(f"--shapes {' '.join(args.shapes)}: none of {', '.join(f'{d}x{f}' for d, f, _, _ in SHAPES)}")
        for (d, d_ff, num_experts, batches), dtype in itertools.product(shapes, args.dtypes):
            rows += shape_cases(
                d,
                d_ff,
                num_experts,
                [1] if args.quick else list(batches),
                [0.25] if args.quick else BUDGETS,
                device,
                flush,
                args.calls,
                calibrate=not args.fixed_rules,
                dtype=dtype,
            )
    print_table(rows)
    benchmarking.save(
        "moe_speed",
        rows,
        benchmarking.where(devices[-1]),
        args.quick,
        args.json,
        not args.no_mlflow,
        ("dense_ms", "moe_ms", "speedup", "dense_gflops_per_s", "moe_gflops_per_s"),
        prefix=lambda r: f"{r['device']}/{r['case']}",
    )


if __name__ == "__main__":
    sys.exit(main())
