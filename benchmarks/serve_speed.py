"""Speed where the models are served: batch-1 decode and prompt tokens/s of a dense decoder and of its
served MoE folders (rule serve: a transformers MoE class), in llama.cpp (GGUF F32 and Q8_0, by
llama.cpp's own converter) and in transformers, same machine, same prompt, one run side by side.

    python benchmarks/serve_speed.py --dense results/<study>/finetune/<variant>/model \\
        --served results/<study>/serve/<variant>/<conversion>-kd-softmax-b0.25/model ... \\
        [--types F32 Q8_0] [--threads 2] [--json out.json]

With --experts (and --budgets), it also times served MoEs of other expert sizes made from the dense
model: its FFNs split at random into E experts (the first --shared-fraction of them shared), routed by
a random linear router with softmax gates, written by moefy's serve code. Batch-1 decoding reads the
picked experts' weights whichever they are, so these time the shape (E, expert size, k) that a
conversion at that budget has, not its quality: where llama.cpp's expert matmul pays and where not.

    python benchmarks/serve_speed.py --dense <dense> --experts 8 16 48 --budgets 0.25 0.5 --no-transformers

llama.cpp: moefy.serving.llama_cpp_measure.speed (fixed pseudo-random prompt of --prompt-tokens,
then --decode-tokens batch-1 steps; one warm-up, the median of --repeats). transformers: generate
with the KV cache, the same counts (prefill timed alone). Each row gives tokens/s and the ratio to
the dense model in the same runtime and type. Goal (issue 33): the MoE decodes faster than its dense
model in llama.cpp at 0.5 of the FFN and below; batch-1 decoding reads every weight it uses once per
token, so the weights read bound it (for SmolLM2 near 1.8x at 0.25, see generation_speed.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moefy.serving import llama_cpp_measure as measure  # noqa: E402
from moefy.serving.gguf import to_gguf  # noqa: E402


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    line = next((line for line in out.splitlines() if line.startswith("Model name")), "Model name: ?")
    return line.split(":", 1)[1].strip()


def transformers_speed(folder: Path, threads: int, prompt_tokens: int, decode_tokens: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, model.config.vocab_size - 1, (1, prompt_tokens), generator=generator)
    mask = torch.ones_like(prompt)

    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(input_ids=prompt, attention_mask=mask)
        return time.perf_counter() - start

    def generate() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                prompt, attention_mask=mask, do_sample=False, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens
            )
        return time.perf_counter() - start

    prefill(), generate()  # warm-up
    prefills = [prefill() for _ in range(repeats)]
    totals = [generate() for _ in range(repeats)]
    prefill_s, total_s = statistics.median(prefills), statistics.median(totals)
    return {
        "prompt_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens_per_s": decode_tokens / max(total_s - prefill_s, 1e-9),
    }


def shaped_moe(dense: Path, experts: int, budget: float, shared_fraction: float, out: Path) -> Path:
    """The served folder of a random conversion of `dense` with the shape of one at `budget`
    (see the module docstring); written once."""
    from moefy.adapters.ffn import find_ffns
    from moefy.adapters.models import load_model, load_tokenizer
    from moefy.adapters.served import write_served
    from moefy.conversion.routers import LinearRouter, budget_to_k
    from moefy.moe.sparse import from_split

    if (out / "config.json").is_file():
        return out
    shared = round(shared_fraction * experts)
    k = budget_to_k(budget, experts, shared)
    torch.manual_seed(experts)
    model = load_model(str(dense), "causal_lm").eval()
    moes = {}
    for ffn in find_ffns(model):
        labels = torch.randperm(ffn.d_ff) % experts
        router = LinearRouter(ffn.d_model, experts - shared)
        torch.nn.init.normal_(router.proj.weight, std=ffn.d_model**-0.5)
        moes[ffn.index] = from_split(ffn, labels, experts, router, k, shared_experts=shared, softmax_gates=True)
        moes[ffn.index].gate.scale.data.fill_(1.0)
        ffn.replace(moes[ffn.index])
    write_served(model, moes, load_tokenizer(str(dense)), dense, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, required=True, help="the dense decoder's folder")
    parser.add_argument("--served", type=Path, nargs="*", default=[], help="served MoE folders (serve/<...>/model)")
    parser.add_argument("--experts", type=int, nargs="*", default=[], help="also time random conversions with these E")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5], help="--experts: shares of experts active")
    parser.add_argument("--shared-fraction", type=float, default=0.125, help="--experts: share of the E experts shared")
    parser.add_argument("--types", nargs="+", default=["F32", "Q8_0"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "benchmarks" / "serve_speed", help="GGUF files go here")
    parser.add_argument("--no-transformers", action="store_true", help="llama.cpp only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.served and not args.experts:
        parser.error("give served folders (--served) or expert counts to time (--experts)")
    models = {"dense": args.dense} | {folder.parent.name: folder for folder in args.served}
    for experts in args.experts:
        shared = round(args.shared_fraction * experts)
        for budget in args.budgets:
            name = f"random-E{experts}-S{shared}-b{budget:g}"
            models[name] = shaped_moe(args.dense, experts, budget, args.shared_fraction, args.work / name / "model")
    rows = []
    for name, folder in models.items():
        for outtype in args.types:
            path = args.work / name / f"model-{outtype}.gguf"
            if not path.is_file():
                to_gguf(folder, path, outtype)
            timing = measure.speed(path, args.threads, args.prompt_tokens, args.decode_tokens, args.repeats)
            rows.append({"model": name, "runtime": f"llama.cpp {outtype}", "bytes": path.stat().st_size} | timing)
            print(rows[-1], flush=True)
        if not args.no_transformers:
            timing = transformers_speed(folder, args.threads, args.prompt_tokens, args.decode_tokens, args.repeats)
            rows.append({"model": name, "runtime": "transformers F32"} | timing)
            print(rows[-1], flush=True)
    dense = {row["runtime"]: row for row in rows if row["model"] == "dense"}
    print(f"\n{cpu_model()}, {args.threads} threads, prompt {args.prompt_tokens} tokens, {args.decode_tokens} decoded")
    print(f"{'model':<44} {'runtime':<18} {'prompt tok/s':>12} {'decode tok/s':>12} {'decode vs dense':>15}")
    for row in rows:
        ratio = row["decode_tokens_per_s"] / dense[row["runtime"]]["decode_tokens_per_s"]
        row["decode_vs_dense"] = ratio
        row["prompt_vs_dense"] = row["prompt_tokens_per_s"] / dense[row["runtime"]]["prompt_tokens_per_s"]
        print(
            f"{row['model']:<44} {row['runtime']:<18} {row['prompt_tokens_per_s']:>12.1f} "
            f"{row['decode_tokens_per_s']:>12.1f} {ratio:>14.2f}x"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": cpu_model(), "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
