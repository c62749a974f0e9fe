"""Step harness: lm-eval-harness on one causal LM of the study (dense, converted, exported).

Always on an offline task made of held-out texts (lm-eval's loglikelihood_rolling: word and byte
perplexity, bits per byte, and the token perplexity, which is step evaluate's test perplexity of
the same model when both predict the same tokens; see moefy.measure.harness), and on any lm-eval
tasks named in --tasks, whose datasets must be on the hub or in the local datasets cache. The model
is a transformers causal LM folder (dense, or a Hugging Face MoE class), a model exported by step
export, or a sparse MoE trained by step train_moe; it runs in float32, in one process. Writes one
JSON file: {"model", "model_kind", "texts", "offline": {documents, tokens, loglikelihood, perplexity,
word_perplexity, byte_perplexity, bits_per_byte, same_as_evaluate, differences_from_evaluate,
max_length, batch_size, prefix_token_id}, "tasks": {task or group: {metric: value}}, "lm_eval": its version}.
The named tasks run with lm-eval's own settings (special tokens as the tokenizer adds them), so
their numbers compare with published lm-eval runs.
"""

from __future__ import annotations

from pathlib import Path

from moefy import dist
from moefy.data.subsets import read_subset
from moefy.errors import MoefyError
from moefy.files import write_json
from moefy.measure import harness
from moefy.workflow import tracking
from moefy.workflow.cli import run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("harness", __doc__, "device", out="output JSON file")
    parser.add_argument(
        "--model",
        required=True,
        help="causal LM folder: a transformers model (finetune/<variant>/model, a Hugging Face MoE), or one moefy exported or trained",
    )
    parser.add_argument(
        "--texts",
        required=True,
        type=Path,
        help='held-out texts: a .jsonl subset ({"text": ...} rows, the data step\'s test.jsonl) or a text file, one text per line',
    )
    parser.add_argument(
        "--tasks", nargs="*", default=[], help="lm-eval tasks besides the offline one (hellaswag arc_easy ...): need hub access"
    )
    parser.add_argument(
        "--max-length", type=int, help="tokens per forward (lm-eval's rolling window); default: the model's context length"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 2):
        parser.error("--batch-size must be at least 1 and --max-length at least 2")
    return args


def read_texts(path: Path) -> list[str]:
    """A subset's texts (.jsonl, as the data step writes them), else the file's lines; blank ones left out."""
    if path.suffix == ".jsonl":
        texts = read_subset(path)[0]
    elif path.is_file():
        texts = path.read_text(encoding="utf-8").splitlines()
    else:
        raise MoefyError(f"{path} does not exist; give the data step's test.jsonl or a text file, one text per line")
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise MoefyError(f"{path} has no non-blank texts to evaluate on; give the held-out texts, one per line")
    return texts


def logged_metrics(result: dict) -> dict[str, float]:
    """The numbers MLflow gets: offline.<metric> and <task>.<metric>."""
    offline = {
        f"offline.{key}": result["offline"][key] for key in ("tokens", "loglikelihood", "perplexity", *harness.OFFLINE_METRICS)
    }
    return offline | {f"{task}.{key}": value for task, metrics in result["tasks"].items() for key, value in metrics.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    texts = read_texts(args.texts)
    ctx = dist.setup(args.device)
    model, tokenizer, kind = harness.load_causal_lm(args.model)
    with tracking.job_run("harness", vars(args)) as run:
        result = harness.evaluate(model.to(ctx.device), tokenizer, texts, args.tasks, args.max_length, args.batch_size)
        result = {"model": str(args.model), "model_kind": kind, "texts": str(args.texts)} | result
        write_json(args.out, result)
        offline = result["offline"]
        print(
            f"lm-eval on {offline['documents']} held-out texts ({offline['tokens']} tokens): perplexity "
            f"{offline['perplexity']:.4f}, bits per byte {offline['bits_per_byte']:.4f}"
            + (
                ""
                if offline["same_as_evaluate"]
                else f" (not evaluate's tokens: {'; '.join(offline['differences_from_evaluate'])})"
            )
            + "".join(f"; {task} {metrics}" for task, metrics in result["tasks"].items()),
            flush=True,
        )
        run.log_metrics(logged_metrics(result))
        run.set_tags({"harness.model_kind": kind})
        run.log_artifact(args.out)


if __name__ == "__main__":
    run_step(main)
