"""Step activations: what the fine-tuned FFNs see and how their neurons fire together.

Runs the fine-tuned model over a seeded sample of training texts and writes
  <out>/hidden.safetensors        per layer `layer.{i}`: FFN inputs of `sample_tokens` tokens
                                   (float16, for router training)
  <out>/coactivation.safetensors  per layer `layer.{i}`: d_ff x d_ff co-activation counts (a neuron
                                   fires when h != 0 for ReLU-like activations, else when its |h|
                                   is in the token's top `fire_fraction`)
  <out>/metrics.json              tokens counted, per-layer activation sparsity, the co-activation
                                   kernel measured fastest here (int8 or float32: same counts)
Texts are sharded over torchrun ranks; counts are all-reduced and the sample gathered on rank 0,
so the outputs do not depend on the number of ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moefy import dist
from moefy.adapters.ffn import capture, find_ffns
from moefy.adapters.models import load_model, load_tokenizer
from moefy.conversion.coactivation import CoactivationCounter, fastest_kernel
from moefy.data.batches import Encoded, choose_texts, iterate, length_grouped_batches
from moefy.data.subsets import read_subset
from moefy.files import save_tensors, write_json
from moefy.workflow import tracking
from moefy.workflow.cli import ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser("activations", __doc__, "model", "task", "penalty", "seed", "convert", "device")
    parser.add_argument("--data", required=True, type=Path, help="folder with train.jsonl")
    add_section_flags(parser, "activations")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.task).to(ctx.device)
    ffns = find_ffns(model)
    texts, _ = read_subset(args.data / "train.jsonl")
    chosen, n_sample = choose_texts(Encoded(tokenizer, texts).lengths, args.max_tokens, args.sample_tokens, args.seed)
    encoded = Encoded(tokenizer, [texts[i] for i in chosen])  # position p = p-th chosen text

    counters = [CoactivationCounter(f.d_ff, ctx.device) for f in ffns]
    sample: dict[int, list[torch.Tensor]] = {}  # position -> per-layer FFN inputs of that text
    batches = dist.shard(length_grouped_batches(encoded.lengths, args.batch_size), ctx)
    with tracking.job_run("activations", vars(args), ablation(args), enabled=ctx.is_main) as run, capture(ffns) as seen:
        for idx, inputs, _ in iterate(model, encoded, batches, ctx, "activations"):
            real = inputs["attention_mask"].bool()
            for ffn, counter in zip(ffns, counters):
                counter.update(ffn.fired(seen[ffn.index]["h"][real], args.fire_fraction))
            for row, position in enumerate(idx):
                if position < n_sample:
                    n = int(real[row].sum())
                    sample[int(position)] = [seen[f.index]["x"][row, :n].to(torch.float16).cpu() for f in ffns]
        tokens = torch.tensor([float(c.tokens) for c in counters], dtype=torch.float64)
        dist.all_reduce_sum(tokens, ctx)
        for counter in counters:
            dist.all_reduce_sum(counter.counts, ctx)
            counter.tokens = int(tokens[0])
        gathered: dict[int, list[torch.Tensor]] = {}
        for part in dist.all_gather(sample, ctx):
            gathered.update(part)

        if ctx.is_main:
            positions = sorted(gathered)
            hidden = {f"layer.{f.index}": torch.cat([gathered[p][f.index] for p in positions]) for f in ffns}
            sparsity = [c.sparsity() for c in counters]
            meta = {"tokens": str(counters[0].tokens), "texts": str(len(encoded))}
            save_tensors(args.out / "hidden.safetensors", hidden, {"sample_texts": str(len(positions))})
            save_tensors(
                args.out / "coactivation.safetensors", {f"layer.{f.index}": c.counts for f, c in zip(ffns, counters)}, meta
            )
            _, probe = fastest_kernel(ctx.device.type, ffns[0].d_ff)
            metrics = {
                "coactivation_kernel": counters[0].kernel,
                "coactivation_probe_seconds": dict(probe),
                "tokens_counted": counters[0].tokens,
                "texts_counted": len(encoded),
                "sample_tokens": int(hidden["layer.0"].shape[0]),
                "sparsity_mean": float(np.mean(sparsity)),
                "sparsity_per_layer": sparsity,
            }
            write_json(args.out / "metrics.json", metrics)
            run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            run.set_tags({"coactivation_kernel": counters[0].kernel})
            run.log_metrics({f"sparsity/layer_{i}": s for i, s in enumerate(sparsity)})
            print(
                f"counted {metrics['tokens_counted']} tokens, kept {metrics['sample_tokens']} for routers; "
                f"mean sparsity {metrics['sparsity_mean']:.3f}; co-activations counted in {counters[0].kernel}",
                flush=True,
            )
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
