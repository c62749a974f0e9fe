"""Step 6, evaluate: swap every FFN for its MoE and measure test accuracy at each expert budget.

Selection rules: top-k at each budget (k = budget * E experts per token) and dynamic-k at each
threshold tau (every expert whose router contribution is at least (1 - tau) * the token's
largest). For each it records test accuracy, accuracy relative to the dense fine-tuned model,
the share of test texts predicted as the dense model does (less noisy than accuracy on a small
test set), experts per token (mean and spread over real tokens), the FFN FLOPs fraction
including the router, and the measured wall-clock of all FFNs over the test set: the MoE (only
picked experts computed, router included) against the same weights run dense. Test texts are
sharded over torchrun ranks; counts are summed. Writes one JSON file: a list of records.
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from moefy import dist, tracking
from moefy.batches import Encoded, eval_batches, iterate
from moefy.cli import add_section_flags, run_step
from moefy.data import read_split
from moefy.export import read_moe_parts
from moefy.files import read_json, write_json
from moefy.models import load_classifier, load_tokenizer
from moefy.moe import ffn_flops_fraction, ffn_seconds, moefy_model, set_experts_per_token, set_threshold
from moefy.routers import SELECTORS, budget_to_k


METRICS = ("test_accuracy", "relative_accuracy", "dense_agreement", "ffn_flops_fraction", "experts_per_token",
           "experts_per_token_std", "ffn_ms_dense", "ffn_ms_moe", "ffn_speedup")


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    dense_accuracy = float(read_json(args.dense_metrics)["test_accuracy"])
    tokenizer = load_tokenizer(args.model)
    model = load_classifier(args.model).to(ctx.device)
    labels, routers = read_moe_parts(args.labels, args.router, args.selector, args.num_experts)
    layers = moefy_model(model, labels, routers, args.num_experts)
    first, E = layers[0], args.num_experts
    d_model, d_ff = first.d_model, first.num_experts * first.expert_size
    router_flops = first.router.flops_per_token()

    texts, targets = read_split(args.data / "test.jsonl")
    encoded = Encoded(tokenizer, texts)
    targets_t = torch.as_tensor(targets, dtype=torch.long)
    batches = eval_batches(encoded, args.batch_size, ctx)

    def predict(select, desc: str) -> tuple[torch.Tensor, tuple[float, float], float]:
        """Predicted class of every test text (all ranks), mean and std of experts per real token
        (layer mean), FFN milliseconds (summed over ranks); select() sets the layers' rule."""
        select()
        ffn_seconds(layers)
        predictions = torch.zeros(len(encoded), dtype=torch.float64)  # class + 1 where this rank predicted
        tokens = torch.zeros(3, dtype=torch.float64)  # sum, sum of squares of experts per token; real tokens
        for idx, inputs, logits in iterate(model, encoded, batches, ctx, desc):
            predictions[torch.as_tensor(idx)] = logits.argmax(-1).cpu().double() + 1
            real = inputs["attention_mask"].bool()
            chosen = [layer.experts_per_token for layer in layers]
            experts = torch.full((int(real.sum()),), float(E)) if chosen[0] is None else torch.stack(chosen).mean(0)[real]
            tokens += torch.stack([experts.sum(), experts.square().sum(), torch.tensor(float(len(experts)))]).double().cpu()
        milliseconds = torch.tensor([ffn_seconds(layers) * 1e3], dtype=torch.float64)
        for tensor in (predictions, tokens, milliseconds):
            dist.all_reduce_sum(tensor, ctx)
        mean = float(tokens[0] / tokens[2])
        std = float((tokens[1] / tokens[2] - mean**2).clamp(min=0).sqrt())
        return predictions.long() - 1, (mean, std), float(milliseconds)

    # (rule, budget, tau, k, how to set it, label); budget 1.0 and tau >= 1 run dense: measured once
    rules = [("top_k", b, None, budget_to_k(b, E), partial(set_experts_per_token, layers, budget_to_k(b, E)), f"budget {b:g}")
             for b in sorted(args.budgets)]
    rules += [("dynamic", None, t, None, partial(set_threshold, layers, t), f"tau {t:g}") for t in sorted(args.thresholds)]
    wildcards = {"split": args.split, "num_experts": E, "selector": args.selector}
    records = []
    with tracking.job_run("evaluate", vars(args), wildcards, enabled=ctx.is_main) as run:
        dense_predictions, _, dense_ms = predict(partial(set_experts_per_token, layers, E), "all experts")
        for rule, budget, tau, k, select, label in rules:
            dense = k == E if rule == "top_k" else tau >= 1
            if dense:
                predictions, (experts, spread), moe_ms = dense_predictions, (float(E), 0.0), dense_ms
            else:
                predictions, (experts, spread), moe_ms = predict(select, label)
            accuracy = float((predictions == targets_t).double().mean())
            record = {
                "rule": rule,
                "budget": budget,
                "tau": tau,
                "k": k,
                "experts_per_token": experts,
                "experts_per_token_std": spread,
                "test_accuracy": accuracy,
                "relative_accuracy": accuracy / dense_accuracy,
                "ffn_flops_fraction": ffn_flops_fraction(d_model, d_ff, E, experts, router_flops, router_runs=not dense),
                "dense_agreement": float((predictions == dense_predictions).double().mean()),
                "dense_test_accuracy": dense_accuracy,
                "ffn_ms_dense": dense_ms,
                "ffn_ms_moe": moe_ms,
                "ffn_speedup": dense_ms / moe_ms,
            }
            records.append(record)
            if ctx.is_main:
                print(f"{label}: {experts:.2f} ± {spread:.2f} experts/token, accuracy {accuracy:.4f} "
                      f"({record['relative_accuracy']:.2%} of dense, {record['dense_agreement']:.2%} same predictions), "
                      f"FFN FLOPs {record['ffn_flops_fraction']:.3f}, FFN time {moe_ms:.0f} ms vs {dense_ms:.0f} ms dense "
                      f"({record['ffn_speedup']:.2f}x)", flush=True)
                run.log_metrics({f"{name}/{label.replace(' ', '_')}": record[name] for name in METRICS})
        if ctx.is_main:
            write_json(args.out, records)
            run.log_artifact(args.out)
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
