"""Step 6, evaluate: swap every FFN for its MoE and measure test accuracy at each expert budget.

For each budget (top-k ratio) it records test accuracy, accuracy relative to the dense
fine-tuned model, experts per token (measured on real tokens), the FFN FLOPs fraction
including the router, and the measured wall-clock of all FFNs over the test set: the MoE
(only picked experts computed, router included) against the same weights run dense. Test texts are sharded over torchrun ranks; counts are summed.
Also the share of test texts whose prediction matches the dense model (less noisy than accuracy
on a small test set). Writes one JSON file: a list of records, one per budget.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moefy import dist, tracking
from moefy.batches import Encoded, eval_batches, iterate
from moefy.cli import add_section_flags, run_step
from moefy.data import read_split
from moefy.errors import MoefyError
from moefy.files import load_tensors, read_json, tensors_metadata, write_json
from moefy.models import load_classifier, load_tokenizer
from moefy.moe import ffn_flops_fraction, ffn_seconds, moefy_model, set_experts_per_token
from moefy.routers import SELECTORS, budget_to_k, build_routers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moefy.steps.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="fine-tuned model folder (finetune/model)")
    parser.add_argument("--dense-metrics", required=True, type=Path, help="finetune/metrics.json (dense test accuracy)")
    parser.add_argument("--data", required=True, type=Path, help="folder with test.jsonl")
    parser.add_argument("--labels", required=True, type=Path, help="balance/<split>-E<E>/labels.safetensors")
    parser.add_argument("--router", required=True, type=Path, help="selector/<split>-E<E>-<selector>/router.safetensors")
    parser.add_argument("--split", required=True)
    parser.add_argument("--num-experts", required=True, type=int)
    parser.add_argument("--selector", required=True, choices=SELECTORS)
    parser.add_argument("--out", required=True, type=Path, help="output JSON file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_section_flags(parser, "evaluate")
    return parser.parse_args(argv)


def load_moe_parts(args: argparse.Namespace) -> tuple[dict[int, torch.Tensor], dict[int, torch.nn.Module]]:
    labels = {int(k.split(".")[1]): v.long() for k, v in load_tensors(args.labels).items()}
    meta = tensors_metadata(args.router)
    if meta.get("selector") != args.selector or meta.get("num_experts") != str(args.num_experts):
        raise MoefyError(f"{args.router} holds {meta.get('selector')} routers for {meta.get('num_experts')} experts, "
                         f"not {args.selector} for {args.num_experts}; rerun its selector job")
    try:
        routers = build_routers(args.selector, load_tensors(args.router), labels, args.num_experts)
    except (KeyError, RuntimeError) as err:
        raise MoefyError(f"{args.router} does not match {args.labels} ({err}); rerun the selector job") from None
    return labels, routers


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    dense_accuracy = float(read_json(args.dense_metrics)["test_accuracy"])
    tokenizer = load_tokenizer(args.model)
    model = load_classifier(args.model).to(ctx.device)
    labels, routers = load_moe_parts(args)
    layers = moefy_model(model, labels, routers, args.num_experts)
    first = layers[0]
    d_model, d_ff = first.d_model, first.num_experts * first.expert_size
    router_flops = first.router.flops_per_token()

    texts, targets = read_split(args.data / "test.jsonl")
    encoded = Encoded(tokenizer, texts)
    targets_t = torch.as_tensor(targets, dtype=torch.long)
    batches = eval_batches(encoded, args.batch_size, ctx)

    def predict(k: int, desc: str) -> tuple[torch.Tensor, float, float]:
        """Predicted class of every test text (all ranks), mean experts per real token, FFN milliseconds."""
        set_experts_per_token(layers, k)
        ffn_seconds(layers)
        predictions = torch.zeros(len(encoded), dtype=torch.float64)  # class + 1 where this rank predicted
        tokens = torch.zeros(2, dtype=torch.float64)  # experts summed over real tokens (layer mean), real tokens
        for idx, inputs, logits in iterate(model, encoded, batches, ctx, desc):
            predictions[torch.as_tensor(idx)] = logits.argmax(-1).cpu().double() + 1
            real = inputs["attention_mask"].bool()
            chosen = [layer.experts_per_token for layer in layers]
            tokens[0] += real.sum() * k if chosen[0] is None else torch.stack(chosen).mean(0)[real].sum()
            tokens[1] += real.sum()
        milliseconds = torch.tensor([ffn_seconds(layers) * 1e3], dtype=torch.float64)  # summed over ranks
        dist.all_reduce_sum(predictions, ctx)
        dist.all_reduce_sum(tokens, ctx)
        dist.all_reduce_sum(milliseconds, ctx)
        return predictions.long() - 1, float(tokens[0] / tokens[1]), float(milliseconds)

    wildcards = {"split": args.split, "num_experts": args.num_experts, "selector": args.selector}
    records = []
    with tracking.job_run("evaluate", vars(args), wildcards, enabled=ctx.is_main) as run:
        dense_predictions, _, dense_ms = predict(args.num_experts, "all experts")
        for budget in sorted(args.budgets):
            k = budget_to_k(budget, args.num_experts)
            if k == args.num_experts:
                predictions, experts, moe_ms = dense_predictions, float(k), dense_ms
            else:
                predictions, experts, moe_ms = predict(k, f"budget {budget:g}")
            accuracy = float((predictions == targets_t).double().mean())
            record = {
                "budget": budget,
                "k": k,
                "experts_per_token": experts,
                "test_accuracy": accuracy,
                "relative_accuracy": accuracy / dense_accuracy,
                "ffn_flops_fraction": ffn_flops_fraction(d_model, d_ff, args.num_experts, k, router_flops),
                "dense_agreement": float((predictions == dense_predictions).double().mean()),
                "dense_test_accuracy": dense_accuracy,
                "ffn_ms_dense": dense_ms,
                "ffn_ms_moe": moe_ms,
                "ffn_speedup": dense_ms / moe_ms,
            }
            records.append(record)
            if ctx.is_main:
                print(f"budget {budget:g} (k={k}): accuracy {accuracy:.4f} ({record['relative_accuracy']:.2%} of dense, "
                      f"{record['dense_agreement']:.2%} same predictions), FFN FLOPs {record['ffn_flops_fraction']:.3f}, "
                      f"FFN time {moe_ms:.0f} ms vs {dense_ms:.0f} ms dense ({record['ffn_speedup']:.2f}x)", flush=True)
                run.log_metrics({f"{name}/budget_{budget:g}": record[name] for name in
                                 ("test_accuracy", "relative_accuracy", "dense_agreement", "ffn_flops_fraction", "experts_per_token",
                                  "ffn_ms_dense", "ffn_ms_moe", "ffn_speedup")})
        if ctx.is_main:
            write_json(args.out, records)
            run.log_artifact(args.out)
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
