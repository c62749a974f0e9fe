"""Step 6, evaluate: swap every FFN for its MoE and measure the task metric at each expert budget.

Selection rules: top-k at each budget (k = budget * E experts per token) and dynamic-k at each
threshold tau (every expert whose router contribution is at least (1 - tau) * the token's
largest). For each it records the test metric (accuracy, or perplexity for causal_lm), the same
relative to the dense model, the share of predictions equal to the dense model's (each text's
class, or each position's argmax next token: less noisy than the metric on a small test set),
experts per token (mean and spread over real tokens), the FFN FLOPs fraction including the
router, and the measured wall-clock of all FFNs over the test set: the MoE (only picked experts
computed, router included) against the same weights run dense. The dense model is the MoE with
every expert, measured here on the same batches. Test texts are sharded over torchrun ranks;
sums are added. Writes one JSON file: a list of records.
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
from moefy.errors import MoefyError
from moefy.export import read_moe_parts
from moefy.files import write_json
from moefy.models import TASKS, load_model, load_tokenizer
from moefy.moe import ffn_flops_fraction, ffn_seconds, moefy_model, set_experts_per_token, set_threshold
from moefy.routers import SELECTORS, budget_to_k
from moefy.tasks import get_task

MEASURES = ("dense_agreement", "ffn_flops_fraction", "experts_per_token", "experts_per_token_std",
            "ffn_ms_dense", "ffn_ms_moe", "ffn_speedup")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moefy.steps.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="fine-tuned model folder (finetune/model)")
    parser.add_argument("--data", required=True, type=Path, help="folder with test.jsonl")
    parser.add_argument("--labels", required=True, type=Path, help="balance/<split>-E<E>/labels.safetensors")
    parser.add_argument("--router", required=True, type=Path, help="selector/<split>-E<E>-<selector>/router.safetensors")
    parser.add_argument("--split", required=True)
    parser.add_argument("--num-experts", required=True, type=int)
    parser.add_argument("--selector", required=True, choices=SELECTORS)
    parser.add_argument("--task", choices=TASKS, default="classification", help="the task the model was fine-tuned for")
    parser.add_argument("--out", required=True, type=Path, help="output JSON file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add_section_flags(parser, "evaluate")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    task = get_task(args.task)
    metric = task.metric
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, task.name).to(ctx.device)
    labels, routers = read_moe_parts(args.labels, args.router, args.selector, args.num_experts)
    layers = moefy_model(model, labels, routers, args.num_experts)
    first, E = layers[0], args.num_experts
    d_model, d_ff = first.d_model, first.num_experts * first.expert_size
    router_flops = first.router.flops_per_token()

    texts, targets = read_split(args.data / "test.jsonl")
    if task.labelled and targets is None:
        raise MoefyError(f"{args.data / 'test.jsonl'} has no labels, but task {task.name} needs them; rerun the data step")
    encoded = Encoded(tokenizer, texts)
    targets_t = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
    batches = eval_batches(encoded, args.batch_size, ctx)

    def run_rule(select, desc: str, dense: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], torch.Tensor, float]:
        """Set the layers' selection rule with select(), then run the test set. Returns this rank's
        predictions per batch, the all-reduced sums (metric score, count, experts per real token
        (layer mean) summed and squared-summed, real tokens, predictions equal to `dense`), and
        the FFN milliseconds summed over ranks."""
        select()
        ffn_seconds(layers)
        predictions: list[torch.Tensor] = []
        sums = torch.zeros(6, dtype=torch.float64)
        for b, (idx, inputs, logits) in enumerate(iterate(model, encoded, batches, ctx, desc)):
            batch_targets = None if targets_t is None else targets_t[idx].to(logits.device)
            score, count, predicted = task.batch_stats(logits, inputs, batch_targets)
            predictions.append(predicted.cpu())
            real = inputs["attention_mask"].bool()
            chosen = [layer.experts_per_token for layer in layers]
            experts = torch.full((int(real.sum()),), float(E)) if chosen[0] is None else torch.stack(chosen).mean(0)[real].cpu()
            experts = experts.double()  # float32 sums of squares over many tokens lose the spread's last digits
            same = len(predicted) if dense is None else (predictions[-1] == dense[b]).sum()
            sums += torch.tensor([score, count, float(experts.sum()), float(experts.square().sum()), float(len(experts)),
                                  float(same)], dtype=torch.float64)
        milliseconds = torch.tensor([ffn_seconds(layers) * 1e3], dtype=torch.float64)
        dist.all_reduce_sum(sums, ctx)
        dist.all_reduce_sum(milliseconds, ctx)
        return predictions, sums, float(milliseconds)

    # (rule, budget, tau, k, how to set it, label); budget 1.0 and tau >= 1 run dense: measured once
    rules = [("top_k", b, None, budget_to_k(b, E), partial(set_experts_per_token, layers, budget_to_k(b, E)), f"budget {b:g}")
             for b in sorted(args.budgets)]
    rules += [("dynamic", None, t, None, partial(set_threshold, layers, t), f"tau {t:g}") for t in sorted(args.thresholds)]
    wildcards = {"split": args.split, "num_experts": E, "selector": args.selector}
    records = []
    with tracking.job_run("evaluate", vars(args), wildcards, enabled=ctx.is_main) as run:
        dense_predictions, dense_sums, dense_ms = run_rule(partial(set_experts_per_token, layers, E), "all experts", None)
        dense_value = task.metric_of(float(dense_sums[0]), float(dense_sums[1]))
        for rule, budget, tau, k, select, label in rules:
            dense = k == E if rule == "top_k" else tau >= 1
            sums, moe_ms = (dense_sums, dense_ms) if dense else run_rule(select, label, dense_predictions)[1:]
            value = task.metric_of(float(sums[0]), float(sums[1]))
            experts = float(sums[2] / sums[4])
            spread = float((sums[3] / sums[4] - experts**2).clamp(min=0).sqrt())
            record = {
                "rule": rule,
                "budget": budget,
                "tau": tau,
                "k": k,
                "experts_per_token": experts,
                "experts_per_token_std": spread,
                f"test_{metric}": value,
                f"relative_{metric}": value / dense_value,
                "ffn_flops_fraction": ffn_flops_fraction(d_model, d_ff, E, experts, router_flops, router_runs=not dense,
                                                         gated=first.w_gate is not None),
                "dense_agreement": float(sums[5] / sums[1]),
                f"dense_test_{metric}": dense_value,
                "ffn_ms_dense": dense_ms,
                "ffn_ms_moe": moe_ms,
                "ffn_speedup": dense_ms / moe_ms,
            }
            records.append(record)
            if ctx.is_main:
                print(f"{label}: {experts:.2f} ± {spread:.2f} experts/token, {metric} {value:.4f} "
                      f"({record[f'relative_{metric}']:.2%} of dense, {record['dense_agreement']:.2%} same predictions), "
                      f"FFN FLOPs {record['ffn_flops_fraction']:.3f}, FFN time {moe_ms:.0f} ms vs {dense_ms:.0f} ms dense "
                      f"({record['ffn_speedup']:.2f}x)", flush=True)
                names = (f"test_{metric}", f"relative_{metric}", *MEASURES)
                run.log_metrics({f"{name}/{label.replace(' ', '_')}": record[name] for name in names})
        if ctx.is_main:
            write_json(args.out, records)
            run.log_artifact(args.out)
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
