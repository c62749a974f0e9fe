"""A finished study's MoE layers against their dense FFNs, on the study's own test inputs.

benchmarks/moe_speed.py times a synthetic layer whose untrained router spreads tokens about evenly
over the experts. A trained router does not, and the looped kernel computes the experts most of a
batch picks for every token (masked) instead of gathering their tokens. So this loads one arm of a
study (its fine-tuned model, balanced split, trained router and kernel calibration), records every
FFN's inputs on a few test batches, and times three ways in turn on the same inputs, the cache
flushed before each call: the dense FFN, the MoE layer as the study runs it, and the MoE layer
gathering every expert's tokens (no expert computed for every token). It also reports how unevenly
the router shares a batch's tokens out.

    python benchmarks/study_layer_speed.py --study results/minilm-rotten-tomatoes \\
        --variant none-seed0 --split kmeans --router mlp
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from moefy import dist, native
from moefy.adapters.models import load_model, load_tokenizer, read_training
from moefy.conversion.routers import budget_to_k
from moefy.data.batches import Encoded, eval_batches, iterate
from moefy.data.subsets import read_subset
from moefy.errors import MoefyError
from moefy.files import read_json
from moefy.moe.checkpoints import read_moe_parts
from moefy.moe.kernel_choice import layer_shape_key, table_for
from moefy.moe.layer import MoEFFN, kernel_calls, moefy_model
from moefy.workflow import benchmarking

WAYS = ("dense", "as the study runs it", "every expert gathered")


def arm_files(study: Path, variant: str, split: str, num_experts: int, router: str) -> dict[str, Path]:
    arm = f"{split}-E{num_experts}"
    files = {
        "model": study / "finetune" / variant / "model",
        "labels": study / "balance" / variant / arm / "labels.safetensors",
        "router_file": study / "router" / variant / f"{arm}-{router}" / "router.safetensors",
        "kernels": study / "calibrate" / "moe_kernels.json",
        "test": study / "data" / "test.jsonl",
    }
    missing = [str(path) for path in files.values() if not path.exists()]
    if missing:
        raise MoefyError(f"{', '.join(missing)} not found: run the study's arm first (snakemake --cores all)")
    return files


def ffn_inputs(model, layers: list[MoEFFN], encoded: Encoded, batches, ctx) -> list[list[torch.Tensor]]:
    """Each layer's input [tokens, d] on each batch, recorded in one dense pass."""
    inputs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].reshape(-1, m.d_model).clone()))
        for i, layer in enumerate(layers)
    ]
    for layer in layers:
        layer.k, layer.tau = layer.num_experts, None
    for _ in iterate(model, encoded, batches, ctx):
        pass
    for hook in hooks:
        hook.remove()
    return inputs


def time_ways(layers: list[MoEFFN], inputs, budget: float, repeats: int) -> dict:
    """Summed milliseconds of each way over every layer and batch (median-free: sums of cold calls
    timed in turn), the kernels each MoE way ran, and the share of tokens each expert got."""
    flush = torch.zeros(128 * 2**20 // 4)
    k = budget_to_k(budget, layers[0].num_experts)
    ms = dict.fromkeys(WAYS, 0.0)
    kernels = {way: {} for way in WAYS[1:]}
    shares = []
    for layer, xs in zip(layers, inputs):
        for x in xs:
            for repeat in range(repeats + 1):  # the first round warms up
                for way in WAYS:
                    layer.k = layer.num_experts if way == "dense" else k
                    if way == "every expert gathered":  # no expert computed for every token
                        layer.popular_experts = lambda picked: torch.zeros(picked.shape[1], dtype=torch.bool)
                    flush.add_(1.0)
                    started = time.perf_counter()
                    layer(x)
                    elapsed = time.perf_counter() - started
                    layer.__dict__.pop("popular_experts", None)
                    calls = kernel_calls([layer])
                    if repeat:
                        ms[way] += elapsed * 1e3
                        for name, count in calls.items():
                            if way != "dense":
                                kernels[way][name] = kernels[way].get(name, 0) + count
            layer.k = k
            shares.append(layer.select(x)[0].float().mean(0))
    share = torch.stack(shares).flatten()
    quantiles = torch.quantile(share, torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"ms": ms, "kernels": kernels, "share_p10_p50_p90": [round(q, 3) for q in quantiles]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, required=True, help="results/<study>")
    parser.add_argument("--variant", default="none-seed0", help="<penalty>-seed<seed>")
    parser.add_argument("--split", default="kmeans")
    parser.add_argument("--num-experts", type=int, default=48)
    parser.add_argument("--router", default="mlp")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--batches", type=int, default=4, help="test batches (every third of the length-sorted ones)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds after the warm-up round")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        files = arm_files(args.study, args.variant, args.split, args.num_experts, args.router)
    except MoefyError as err:
        parser.error(str(err))
    task = read_training(files["model"]).get("task", "classification")
    model = load_model(str(files["model"]), task)
    labels, routers = read_moe_parts(files["labels"], files["router_file"], args.router, args.num_experts, 0)
    layers = moefy_model(model, labels, routers, args.num_experts)
    calibration = read_json(files["kernels"])
    for layer in layers:
        layer.kernels = table_for(calibration, layer_shape_key(layer), str(files["kernels"]))
    texts, _ = read_subset(files["test"])
    encoded = Encoded(load_tokenizer(str(files["model"])), texts)
    ctx = dist.setup("cpu")
    batches = eval_batches(encoded, args.batch_size, ctx)[::3][: args.batches]
    rows = []
    print(f"looped kernel: {native.implementation(torch.device('cpu'))}", flush=True)
    with torch.inference_mode():
        inputs = ffn_inputs(model, layers, encoded, batches, ctx)
        for budget in args.budgets:
            result = time_ways(layers, inputs, budget, args.repeats)
            ms = result["ms"]
            row = {
                "case": f"{args.variant} {args.split}-E{args.num_experts}-{args.router} b={budget:g}",
                "budget": budget,
                "dense_ms": ms["dense"],
                "moe_ms": ms["as the study runs it"],
                "gathered_ms": ms["every expert gathered"],
                "speedup": ms["dense"] / ms["as the study runs it"],
                "gathered_speedup": ms["dense"] / ms["every expert gathered"],
                "kernels": result["kernels"]["as the study runs it"],
                "gathered_kernels": result["kernels"]["every expert gathered"],
                "expert_share_p10_p50_p90": result["share_p10_p50_p90"],
            }
            rows.append(row)
            print(
                f"{row['case']}: dense {row['dense_ms']:.0f} ms; MoE {row['moe_ms']:.0f} ms ({row['speedup']:.2f}x, "
                f"{row['kernels']}); every expert gathered {row['gathered_ms']:.0f} ms ({row['gathered_speedup']:.2f}x, "
                f"{row['gathered_kernels']}); share of a batch's tokens per expert, 10/50/90%: "
                f"{row['expert_share_p10_p50_p90']}",
                flush=True,
            )
    benchmarking.save(
        "study_layer_speed",
        rows,
        benchmarking.where(torch.device("cpu")),
        False,
        args.json,
        not args.no_mlflow,
        ("dense_ms", "moe_ms", "gathered_ms", "speedup", "gathered_speedup"),
    )


if __name__ == "__main__":
    sys.exit(main())
