"""Step finetune: train the dense model (ReLU-swapped by default) on the task.

Classification trains a sequence-classification head and keeps the epoch with the best validation
accuracy; causal_lm trains next-token prediction and keeps the lowest validation perplexity. With
0 epochs the model is measured and saved as loaded. Runs as a plain process, or data parallel
under torch.distributed.run (every rank takes its part of each global batch).
Writes <out>/model/ (save_pretrained, safetensors, tokenizer, and training.json: how it was
trained, precision included, which every later step reads) and <out>/metrics.json.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from moefy import dist
from moefy.adapters.ffn import capture, find_ffns
from moefy.adapters.models import TRAINING_FILE, load_model, load_tokenizer, save_model
from moefy.adapters.tasks import get_task
from moefy.data.batches import Encoded, eval_batches, iterate, length_grouped_batches, measure, shard_batches
from moefy.data.subsets import read_label_names
from moefy.files import atomic_dir, write_json
from moefy.measure import machine
from moefy.training import precision
from moefy.training.recipe import optimiser, read_texts
from moefy.training.sparsity import layers_penalty, ramped_weight
from moefy.workflow import pause, tracking
from moefy.workflow.cli import ablation, add_section_flags, run_step, step_parser


def parse_args(argv: list[str] | None):
    parser = step_parser(
        "finetune", __doc__, "model", "task", "penalty", "seed", "device", out="output folder (gets model/ and metrics.json)"
    )
    parser.add_argument("--data", required=True, type=Path, help="folder with train/validation/test.jsonl and labels.json")
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    add_section_flags(parser, "finetune")
    return parser.parse_args(argv)


def activation_sparsity(model, encoded: Encoded, batch_size: int, ctx: dist.Context) -> list[float]:
    """Per FFN layer, the share of zero activations over real (non-padding) tokens."""
    ffns = find_ffns(model)
    counts = torch.zeros(len(ffns), 2, dtype=torch.float64)
    with capture(ffns, inputs=False) as seen:
        for _, inputs, _ in iterate(model, encoded, eval_batches(encoded, batch_size, ctx), ctx, "sparsity"):
            real = inputs["attention_mask"].bool()
            for ffn in ffns:
                h = seen[ffn.index]["h"][real]
                counts[ffn.index, 0] += (h == 0).sum()
                counts[ffn.index, 1] += h.numel()
    dist.all_reduce_sum(counts, ctx)
    return (counts[:, 0] / counts[:, 1]).tolist()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ctx = dist.setup(args.device)
    torch.manual_seed(args.seed)
    task = get_task(args.task)
    label_names = read_label_names(args.data) if task.labelled else None
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    tokenizer.model_max_length = args.max_length  # travels with the saved tokenizer to every later step
    model = load_model(
        args.model,
        task.name,
        label_names=label_names,
        activation="relu" if args.activation == "relu" else None,
        trust_remote_code=args.trust_remote_code,
    ).to(ctx.device)
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)

    train_set = read_texts(args.data, "train", task, args.max_train_examples, args.seed)
    val_set, test_set = read_texts(args.data, "validation", task), read_texts(args.data, "test", task)
    train = Encoded(tokenizer, train_set.texts)
    train_y = None if train_set.labels is None else torch.as_tensor(train_set.labels, dtype=torch.long)
    val_labels, test_labels = val_set.labels, test_set.labels
    validation, test = Encoded(tokenizer, val_set.texts), Encoded(tokenizer, test_set.texts)

    ffns = find_ffns(model)
    chosen, probe = precision.resolve(args.precision, ctx.device, ffns[0].d_model, ffns[0].d_ff)
    bf16 = chosen == "bf16"
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, total_steps = optimiser(trainable, train.lengths, args, args.epochs)
    ddp = DistributedDataParallel(model) if ctx.distributed else model

    penalised = args.penalty != "none"
    with (
        tracking.job_run("finetune", vars(args), ablation(args), enabled=ctx.is_main) as run,
        capture(ffns, inputs=False, activations=penalised) as seen,
    ):
        run.set_tags({"precision": chosen, "world_size": ctx.world_size})
        metric = task.metric
        best: dict = {f"validation_{metric}": None, "epoch": 0, "state": None}
        step, started = 0, time.time()
        if args.epochs == 0:  # the model as loaded
            best[f"validation_{metric}"] = measure(model, task, validation, val_labels, args.eval_batch_size, ctx, "validation")
        for epoch in range(1, args.epochs + 1):
            pause.point(f"finetune epoch {epoch}")
            penalty_sum, penalty_steps = 0.0, 0
            model.train()
            batches = length_grouped_batches(train.lengths, args.batch_size, seed=args.seed * 1000 + epoch)
            batches = [b for b in batches if len(b) >= ctx.world_size]
            bar = tqdm(
                shard_batches(batches, ctx.rank, ctx.world_size),
                desc=f"epoch {epoch}/{args.epochs}",
                unit="batch",
                disable=not ctx.is_main,
                mininterval=5,
            )
            for local, full in zip(bar, batches):
                inputs = train.collate(local, ctx.device)
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = ddp(**inputs).logits
                # Sum over this rank's part, over the global batch: DDP's gradient mean then
                # equals the global-batch mean whatever the number of ranks.
                targets = None if train_y is None else train_y[local].to(ctx.device)
                loss = task.loss_sum(logits, inputs, targets)
                total = loss * ctx.world_size / max(1, task.loss_weight(train.lengths[full]))
                if penalised:
                    penalty = layers_penalty([seen[f.index]["h"] for f in ffns], inputs["attention_mask"].bool(), args.penalty)
                    total = total + ramped_weight(args.sparsity_weight, step, total_steps, args.sparsity_ramp) * penalty
                    penalty_sum, penalty_steps = penalty_sum + penalty.item(), penalty_steps + 1
                total.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % 20 == 0:
                    per_item = loss.item() / max(1, task.loss_weight(train.lengths[local]))
                    bar.set_postfix(loss=f"{per_item:.3f}")
                    run.log_metrics({"train_loss": per_item}, step=step)
            value = measure(model, task, validation, val_labels, args.eval_batch_size, ctx, "validation")
            epoch_metrics = {f"validation_{metric}": value, "epoch_seconds": time.time() - started}
            if penalised:
                epoch_metrics[f"{args.penalty}_penalty"] = penalty_sum / max(1, penalty_steps)
                epoch_metrics["validation_sparsity_mean"] = float(
                    np.mean(activation_sparsity(model, validation, args.eval_batch_size, ctx))
                )
            run.log_metrics(epoch_metrics, step=epoch)
            if ctx.is_main:
                extra = f", sparsity {epoch_metrics['validation_sparsity_mean']:.3f}" if penalised else ""
                print(f"epoch {epoch}: validation {metric} {value:.4f}{extra} ({time.time() - started:.0f} s)", flush=True)
            if task.better(value, best[f"validation_{metric}"]):
                best = {f"validation_{metric}": value, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}

        if best["state"] is not None:
            model.load_state_dict(best["state"])
        test_value = measure(model, task, test, test_labels, args.eval_batch_size, ctx, "test")
        sparsity = activation_sparsity(model, validation, args.eval_batch_size, ctx)
        training = {
            "task": task.name,
            "penalty": args.penalty,
            "seed": args.seed,
            "activation": args.activation,
            "precision": chosen,
            "precision_probe_seconds": probe,
            "machine": machine.describe(ctx.device),
        }
        metrics = {
            **training,
            f"validation_{metric}": best[f"validation_{metric}"],
            f"test_{metric}": test_value,
            "best_epoch": best["epoch"],
            "train_seconds": time.time() - started,
            "train_examples": len(train),
            "sparsity_mean": float(np.mean(sparsity)),
            "sparsity_per_layer": sparsity,
        }
        if ctx.is_main:
            print(f"test {metric} {test_value:.4f}, mean FFN activation sparsity {metrics['sparsity_mean']:.3f}", flush=True)
            with atomic_dir(args.out / "model") as folder:
                save_model(model, tokenizer, folder)
                write_json(folder / TRAINING_FILE, training)
            write_json(args.out / "metrics.json", metrics)
            run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            run.log_metrics({f"sparsity/layer_{i}": s for i, s in enumerate(sparsity)})
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
