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
import time
from pathlib import Path

import numpy as np
import torch

from moefy import dist
from moefy.adapters.ffn import capture, find_ffns
from moefy.adapters.models import TRAINING_FILE, load_model, load_tokenizer, save_model
from moefy.adapters.tasks import get_task
from moefy.data.batches import Encoded, eval_batches, iterate, measure
from moefy.data.subsets import read_label_names
from moefy.files import atomic_dir, write_json
from moefy.measure import machine
from moefy.training import convergence, precision
from moefy.training.loop import Batch, Epoch, train_epochs
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

    penalised = args.penalty != "none"
    with (
        tracking.job_run("finetune", vars(args), ablation(args), enabled=ctx.is_main) as run,
        capture(ffns, inputs=False, activations=penalised) as seen,
    ):
        run.set_tags({"precision": chosen, "world_size": ctx.world_size})
        metric = task.metric

        def objective(batch: Batch):
            """The task loss, plus the activation-sparsity penalty at its ramped weight."""
            if not penalised:
                return batch.task_loss, {}
            penalty = layers_penalty([seen[f.index]["h"] for f in ffns], batch.inputs["attention_mask"].bool(), args.penalty)
            weight = ramped_weight(args.sparsity_weight, batch.step, total_steps, args.sparsity_ramp)
            return batch.task_loss + weight * penalty, {"penalty": penalty.item()}

        def after_epoch(epoch: Epoch) -> dict[str, float]:
            value = measure(model, task, validation, val_labels, args.eval_batch_size, ctx, "validation")
            metrics = {f"validation_{metric}": value, "epoch_seconds": epoch.seconds}
            if penalised:
                metrics[f"{args.penalty}_penalty"] = epoch.means["penalty"]
                metrics["validation_sparsity_mean"] = float(
                    np.mean(activation_sparsity(model, validation, args.eval_batch_size, ctx))
                )
            return metrics

        trained = train_epochs(
            model, task, train, train_y, ctx, optimizer, scheduler, name="finetune", epochs=args.epochs,
            total_steps=total_steps, batch_size=args.batch_size, seed=args.seed, objective=objective, measure=after_epoch,
            log=run.log_metrics, pause=pause.point, bf16=bf16, log_steps=True, patience=args.patience,
        )  # fmt: skip
        # no epoch: the model as loaded
        validation_value = (
            trained.best
            if trained.best_epoch
            else measure(model, task, validation, val_labels, args.eval_batch_size, ctx, "validation")
        )
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
        if trained.stopped_at_cap:  # every later step's records carry it (moefy.training.convergence)
            training = convergence.note(training, "finetune")
        metrics = {
            **training,
            f"validation_{metric}": validation_value,
            f"test_{metric}": test_value,
            "best_epoch": trained.best_epoch,
            "epochs_run": trained.epochs_run,
            convergence.KEY: trained.stopped_at_cap,
            "train_seconds": time.time() - trained.started,
            "train_examples": len(train),
            "sparsity_mean": float(np.mean(sparsity)),
            "sparsity_per_layer": sparsity,
        }
        if ctx.is_main:
            if trained.stopped_at_cap:
                print(convergence.warning("fine-tuning", f"finetune.epochs {args.epochs}"), flush=True)
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
