"""Step 6, evaluate: swap every FFN for its MoE and measure the task metric at each expert budget.

For each budget (top-k ratio) it records the test metric (accuracy, or perplexity for causal_lm),
the same relative to the dense model, experts per token (measured on real tokens) and the FFN
FLOPs fraction including the router. The dense model is the MoE with every expert (bit-identical
to the fine-tuned model), measured here on the same batches. Also the share of predictions equal
to the dense model's (each text's class, or each position's argmax next token): less noisy than
the metric on a small test set. Test texts are sharded over torchrun ranks; sums are added.
Writes one JSON file: a list of records, one per budget.
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
from moefy.files import load_tensors, tensors_metadata, write_json
from moefy.models import TASKS, load_model, load_tokenizer
from moefy.moe import ffn_flops_fraction, moefy_model, set_experts_per_token
from moefy.routers import SELECTORS, budget_to_k, build_routers
from moefy.tasks import get_task


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
    task = get_task(args.task)
    metric = task.metric
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, task.name).to(ctx.device)
    labels, routers = load_moe_parts(args)
    layers = moefy_model(model, labels, routers, args.num_experts)
    first = layers[0]
    d_model, d_ff = first.w_in.in_features, first.w_in.out_features
    router_flops = first.router.flops_per_token()

    texts, targets = read_split(args.data / "test.jsonl")
    if task.labelled and targets is None:
        raise MoefyError(f"{args.data / 'test.jsonl'} has no labels, but task {task.name} needs them; rerun the data step")
    encoded = Encoded(tokenizer, texts)
    targets_t = None if targets is None else torch.as_tensor(targets, dtype=torch.long)
    batches = eval_batches(encoded, args.batch_size, ctx)

    def run_budget(k: int, desc: str, dense: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """This rank's predictions per batch, and the all-reduced sums: metric score, count,
        experts summed over real tokens (layer mean), real tokens, predictions equal to `dense`."""
        set_experts_per_token(layers, k)
        predictions: list[torch.Tensor] = []
        sums = torch.zeros(5, dtype=torch.float64)
        for b, (idx, inputs, logits) in enumerate(iterate(model, encoded, batches, ctx, desc)):
            batch_targets = None if targets_t is None else targets_t[idx].to(logits.device)
            score, count, predicted = task.batch_stats(logits, inputs, batch_targets)
            predictions.append(predicted.cpu())
            real = inputs["attention_mask"].bool()
            chosen = [layer.experts_per_token for layer in layers]
            experts = real.sum() * k if chosen[0] is None else torch.stack(chosen).mean(0)[real].sum()
            same = len(predicted) if dense is None else (predictions[-1] == dense[b]).sum()
            sums += torch.tensor([score, count, float(experts), float(real.sum()), float(same)], dtype=torch.float64)
        dist.all_reduce_sum(sums, ctx)
        return predictions, sums

    wildcards = {"split": args.split, "num_experts": args.num_experts, "selector": args.selector}
    records = []
    with tracking.job_run("evaluate", vars(args), wildcards, enabled=ctx.is_main) as run:
        dense_predictions, dense_sums = run_budget(args.num_experts, "all experts", None)
        dense_value = task.metric_of(float(dense_sums[0]), float(dense_sums[1]))
        for budget in sorted(args.budgets):
            k = budget_to_k(budget, args.num_experts)
            sums = dense_sums if k == args.num_experts else run_budget(k, f"budget {budget:g}", dense_predictions)[1]
            value = task.metric_of(float(sums[0]), float(sums[1]))
            record = {
                "budget": budget,
                "k": k,
                "experts_per_token": float(sums[2] / sums[3]),
                f"test_{metric}": value,
                f"relative_{metric}": value / dense_value,
                "ffn_flops_fraction": ffn_flops_fraction(d_model, d_ff, args.num_experts, k, router_flops),
                "dense_agreement": float(sums[4] / sums[1]),
                f"dense_test_{metric}": dense_value,
            }
            records.append(record)
            if ctx.is_main:
                print(f"budget {budget:g} (k={k}): {metric} {value:.4f} ({record[f'relative_{metric}']:.2%} of dense, "
                      f"{record['dense_agreement']:.2%} same predictions), FFN FLOPs {record['ffn_flops_fraction']:.3f}", flush=True)
                run.log_metrics({f"{name}/budget_{budget:g}": record[name] for name in
                                 (f"test_{metric}", f"relative_{metric}", "dense_agreement", "ffn_flops_fraction", "experts_per_token")})
        if ctx.is_main:
            write_json(args.out, records)
            run.log_artifact(args.out)
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
