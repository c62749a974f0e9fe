"""Step usage: how a sparse MoE uses its experts on calibration text, the input of every merge.

Runs calibration examples (a seeded sample of the training subset, 256 in MC-SMoE's runs) through
the model and writes, per MoE layer, the (token, expert) pairs each expert took, the Gram matrix
of the router's logit columns, and every expert's output on every calibration token, summed as REAP
and HC-SMoE read it (moefy.training.merging.Usage), to <out>/usage.safetensors, with
<out>/metrics.json: usage shares, REAP's scores, and how different the experts are (mean pairwise
cosine of their flattened weights: upcycled copies start at 1, and merging copies of one FFN
proves nothing). Every expert runs on every token here: E / k times the layers' routed compute.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moefy import dist
from moefy.adapters.tasks import get_task
from moefy.data.batches import Encoded, eval_batches, iterate
from moefy.files import save_tensors, write_json
from moefy.moe.checkpoints import load_smoe
from moefy.training.merging import USAGE_FORMAT, record_usage, similarity
from moefy.training.recipe import read_texts
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("usage", __doc__, "model", "task", "penalty", "seed", "device", out="output folder")
    parser.add_argument("--data", required=True, type=Path, help="the data step's folder")
    parser.add_argument("--upcycled", default="", help="the model's name in upcycling.models (its MLflow tag)")
    add_section_flags(parser, "usage")
    return parser.parse_args(argv)


def mean_pairwise_cosine(sim: torch.Tensor) -> float:
    """Mean of the off-diagonal entries of a similarity matrix."""
    n = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    task = get_task(args.task)
    model, moes, tokenizer, site = load_smoe(args.model, task.name, ctx.device)
    texts = read_texts(args.data, "train", task, args.calibration_examples, args.seed)
    encoded = Encoded(tokenizer, texts.texts)
    identity = ablation(args) | ({"upcycled": args.upcycled} if args.upcycled else {})
    with tracking.job_run("usage", vars(args), identity, enabled=ctx.is_main) as run:
        with record_usage(moes) as usage:
            for _ in iterate(model, encoded, eval_batches(encoded, args.eval_batch_size, ctx), ctx, "calibration"):
                pass
        for layer in usage.values():  # every rank's tokens
            for total in (layer.counts, layer.logit_gram, layer.saliency_sum, layer.output_sum, layer.tokens):
                dist.all_reduce_sum(total, ctx)
        metrics = {
            **identity,
            "site": site,
            "calibration_examples": len(encoded),
            "calibration_tokens": int(encoded.lengths.sum()),
            "experts": {str(i): moe.router_experts for i, moe in moes.items()},
            "frequency": {str(i): [round(float(f), 6) for f in u.frequency] for i, u in usage.items()},
            "reap": {str(i): [round(float(r), 6) for r in u.reap] for i, u in usage.items()},
            "weight_cosine": {str(i): mean_pairwise_cosine(similarity(moes[i], u, "weights")) for i, u in usage.items()},
            "router_logit_cosine": {str(i): mean_pairwise_cosine(similarity(moes[i], u)) for i, u in usage.items()},
        }
        metrics["mean_weight_cosine"] = sum(metrics["weight_cosine"].values()) / max(1, len(usage))
        if ctx.is_main:
            tensors = {key: t for i, u in usage.items() for key, t in u.tensors(i).items()}
            save_tensors(args.out / "usage.safetensors", tensors, {"format": USAGE_FORMAT, "site": site})
            write_json(args.out / "metrics.json", metrics)
            run.log_metrics(
                {"calibration_tokens": metrics["calibration_tokens"], "mean_weight_cosine": metrics["mean_weight_cosine"]}
                | {f"weight_cosine/layer_{i}": v for i, v in metrics["weight_cosine"].items()}
            )
            print(
                f"{len(encoded)} calibration examples; mean pairwise cosine of expert weights "
                f"{metrics['mean_weight_cosine']:.3f} (1.0: identical copies)",
                flush=True,
            )
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
