"""Step gguf: an exported model folder as GGUF files for llama.cpp, measured in llama.cpp.

For each --types entry, llama.cpp's own converter writes <out>/model-<TYPE>.gguf (see
moefy.serving.gguf); each file is then loaded in llama.cpp (llama-cpp-python) and measured:
its size, the perplexity of --texts (every token after the first of each text predicted, as in
moefy's causal_lm metric, BOS when the tokenizer adds one; moefy.serving.llama_cpp_measure), and
tokens/s of prompt processing and batch-1 decode (median of --repeats after a warm-up). Writes
<out>/gguf.json last: one record per type. The same step on the dense model's folder gives the
numbers to compare with.
"""

from __future__ import annotations

import os
from pathlib import Path

from moefy.errors import MoefyError
from moefy.files import read_json, write_json
from moefy.measure import machine
from moefy.serving import llama_cpp_measure as measure
from moefy.serving.converter import installed_version
from moefy.serving.gguf import OUTTYPES, to_gguf
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser

RESULT = "gguf.json"


def gguf_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def parse_args(argv: list[str] | None):
    parser = step_parser("gguf", __doc__, out=f"output folder: model-<TYPE>.gguf per type, and {RESULT}")
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="the exported Hugging Face folder (config, safetensors, tokenizer): an exported MoE, or the dense model to compare with",
    )
    parser.add_argument("--types", nargs="+", choices=list(OUTTYPES), default=["F32", "Q8_0"], help="GGUF weight types to write")
    parser.add_argument("--texts", required=True, type=Path, help="the texts perplexity is measured on: data/test.jsonl")
    parser.add_argument("--max-texts", type=_positive, help="measure perplexity on the first N texts only (default: all)")
    parser.add_argument(
        "--max-length",
        type=_positive,
        help="tokens per text (truncation); default: the model_max_length saved with the folder's tokenizer, as moefy's evaluation cuts",
    )
    parser.add_argument("--threads", type=_positive, help="llama.cpp threads (default: $OMP_NUM_THREADS, else every core)")
    parser.add_argument(
        "--kv-cache",
        choices=list(measure.KV_CACHE_TYPES),
        default="F16",
        help="llama.cpp's KV cache type for perplexity: F16 as llama.cpp serves, F32 to match the Hugging Face model exactly",
    )
    parser.add_argument("--prompt-tokens", type=_positive, default=128, help="tokens of the timed prompt")
    parser.add_argument("--decode-tokens", type=_positive, default=64, help="timed batch-1 decode steps after it")
    parser.add_argument("--repeats", type=_positive, default=3, help="timed runs after a warm-up; their median is reported")
    parser.add_argument(
        "--llama-cpp", type=Path, help="a llama.cpp checkout whose converter to use (default: the installed llama-cpp-python's)"
    )
    return parser.parse_args(argv)


def default_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1


def saved_max_length(folder: Path) -> int:
    """The model_max_length saved with the folder's tokenizer (moefy saves its max_length there)."""
    config = folder / "tokenizer_config.json"
    length = read_json(config).get("model_max_length") if config.is_file() else None
    if not isinstance(length, int) or not 1 < length <= 1_000_000:
        raise MoefyError(f"{folder} saves no usable model_max_length with its tokenizer ({length!r}); pass --max-length")
    return length


def read_texts(path: Path, limit: int | None) -> list[str]:
    from moefy.data.subsets import read_subset

    texts, _ = read_subset(path)
    if not texts:
        raise MoefyError(f"{path} has no texts; give the data step's test.jsonl")
    return texts[:limit]


def measure_type(args, outtype: str, texts: list[str], max_length: int) -> dict:
    path = to_gguf(args.model, args.out / gguf_name(outtype), outtype, args.llama_cpp)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); measuring it in llama.cpp", flush=True)
    with measure.open_gguf(path, args.threads, context=max_length, logits=True, kv_cache=args.kv_cache) as llm:
        quality = measure.perplexity(llm, texts, max_length)
    speed = measure.speed(path, args.threads, args.prompt_tokens, args.decode_tokens, args.repeats)
    return {"type": outtype, "file": path.name, "bytes": path.stat().st_size, **quality, **speed}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.threads = args.threads or default_threads()
    max_length = args.max_length or saved_max_length(args.model)
    texts = read_texts(args.texts, args.max_texts)
    with tracking.job_run("gguf", vars(args)) as run:
        records = []
        for outtype in args.types:
            record = measure_type(args, outtype, texts, max_length)
            records.append(record)
            print(
                f"{outtype}: {record['bytes'] / 2**20:.1f} MiB, perplexity {record['perplexity']:.3f} over "
                f"{record['predicted_tokens']} tokens, {record['prompt_tokens_per_s']:.1f} prompt and "
                f"{record['decode_tokens_per_s']:.1f} decode tokens/s",
                flush=True,
            )
            run.log_metrics(
                {
                    f"gguf.{outtype}.{key}": record[key]
                    for key in ("bytes", "perplexity", "prompt_tokens_per_s", "decode_tokens_per_s")
                }
            )
        result = {
            "model": str(args.model),
            "llama_cpp_python": installed_version(),
            "kv_cache": args.kv_cache,
            "max_length": max_length,
            "machine": machine.describe(),
            "records": records,
        }
        write_json(args.out / RESULT, result)
        run.set_tags({"gguf.folder": str(args.out)})


if __name__ == "__main__":
    run_step(main)
