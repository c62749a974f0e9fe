"""Step 1, finetune: train the dense classifier (ReLU-swapped by default) on the task.

Run by the workflow as `torchrun --standalone --nproc_per_node=N -m moefy.steps.finetune ...`;
runs as a plain process too. Data parallel: every rank takes its part of each global batch.
Writes <out>/model/ (save_pretrained, safetensors, tokenizer) and <out>/metrics.json.
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
from transformers import get_linear_schedule_with_warmup

from moefy import dist, tracking
from moefy.batches import Encoded, accuracy, eval_batches, iterate
from moefy.cli import add_section_flags, run_step
from moefy.data import length_grouped_batches, read_label_names, read_split, shard_batches
from moefy.ffn import capture, find_ffns
from moefy.files import atomic_dir, write_json
from moefy.models import load_classifier, load_tokenizer, save_classifier
from moefy.sparsity import PENALTIES, layers_penalty, ramped_weight


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moefy.steps.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pretrained model: hub id or local folder")
    parser.add_argument("--data", required=True, type=Path, help="folder with train/validation/test.jsonl and labels.json")
    parser.add_argument("--out", required=True, type=Path, help="output folder (gets model/ and metrics.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--sparsity-penalty", choices=PENALTIES, default="none",
                        help="activation-sparsity penalty on the FFN activations (D2DMoE): none, l1 or hoyer")
    add_section_flags(parser, "finetune")
    return parser.parse_args(argv)


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
    label_names = read_label_names(args.data)
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    tokenizer.model_max_length = args.max_length  # travels with the saved tokenizer to every later step
    model = load_classifier(
        args.model,
        label_names=label_names,
        activation="relu" if args.activation == "relu" else None,
        trust_remote_code=args.trust_remote_code,
    ).to(ctx.device)
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)

    train_texts, train_labels = read_split(args.data / "train.jsonl")
    if args.max_train_examples and args.max_train_examples < len(train_texts):
        keep = np.sort(np.random.default_rng(args.seed).permutation(len(train_texts))[: args.max_train_examples])
        train_texts, train_labels = [train_texts[i] for i in keep], [train_labels[i] for i in keep]
    train = Encoded(tokenizer, train_texts)
    train_y = torch.as_tensor(train_labels, dtype=torch.long)
    val_texts, val_labels = read_split(args.data / "validation.jsonl")
    test_texts, test_labels = read_split(args.data / "test.jsonl")
    validation, test = Encoded(tokenizer, val_texts), Encoded(tokenizer, test_texts)

    bf16 = use_bf16(args.precision, ctx.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = len(length_grouped_batches(train.lengths, args.batch_size, seed=0))
    total_steps = steps_per_epoch * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    ddp = DistributedDataParallel(model) if ctx.distributed else model

    penalised = args.sparsity_penalty != "none"
    ffns = find_ffns(model)
    with tracking.job_run("finetune", vars(args), enabled=ctx.is_main) as run, \
            capture(ffns, inputs=False, activations=penalised) as seen:
        run.set_tags({"precision": "bf16" if bf16 else "fp32", "world_size": ctx.world_size})
        best = {"validation_accuracy": -1.0}
        step, started = 0, time.time()
        for epoch in range(1, args.epochs + 1):
            penalty_sum, penalty_steps = 0.0, 0
            model.train()
            batches = length_grouped_batches(train.lengths, args.batch_size, seed=args.seed * 1000 + epoch)
            batches = [b for b in batches if len(b) >= ctx.world_size]
            bar = tqdm(shard_batches(batches, ctx.rank, ctx.world_size), desc=f"epoch {epoch}/{args.epochs}",
                       unit="batch", disable=not ctx.is_main, mininterval=5)
            for local, full in zip(bar, batches):
                inputs = train.collate(local, ctx.device)
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = ddp(**inputs).logits
                # Sum over this rank's part, over the global batch: DDP's gradient mean then
                # equals the global-batch mean whatever the number of ranks.
                loss = torch.nn.functional.cross_entropy(logits.float(), train_y[local].to(ctx.device), reduction="sum")
                total = loss * ctx.world_size / len(full)
                if penalised:
                    penalty = layers_penalty([seen[f.index]["h"] for f in ffns], inputs["attention_mask"].bool(), args.sparsity_penalty)
                    total = total + ramped_weight(args.sparsity_weight, step, total_steps, args.sparsity_ramp) * penalty
                    penalty_sum, penalty_steps = penalty_sum + penalty.item(), penalty_steps + 1
                total.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{loss.item() / len(local):.3f}")
                    run.log_metrics({"train_loss": loss.item() / len(local)}, step=step)
            val_acc = accuracy(model, validation, val_labels, args.eval_batch_size, ctx, "validation")
            epoch_metrics = {"validation_accuracy": val_acc, "epoch_seconds": time.time() - started}
            if penalised:
                epoch_metrics[f"{args.sparsity_penalty}_penalty"] = penalty_sum / max(1, penalty_steps)
                epoch_metrics["validation_sparsity_mean"] = float(np.mean(activation_sparsity(model, validation, args.eval_batch_size, ctx)))
            run.log_metrics(epoch_metrics, step=epoch)
            if ctx.is_main:
                extra = f", sparsity {epoch_metrics['validation_sparsity_mean']:.3f}" if penalised else ""
                print(f"epoch {epoch}: validation accuracy {val_acc:.4f}{extra} ({time.time() - started:.0f} s)", flush=True)
            if val_acc > best["validation_accuracy"]:
                best = {"validation_accuracy": val_acc, "epoch": epoch, "state": copy.deepcopy(model.state_dict())}

        model.load_state_dict(best["state"])
        test_acc = accuracy(model, test, test_labels, args.eval_batch_size, ctx, "test")
        sparsity = activation_sparsity(model, validation, args.eval_batch_size, ctx)
        metrics = {
            "validation_accuracy": best["validation_accuracy"],
            "test_accuracy": test_acc,
            "best_epoch": best["epoch"],
            "train_seconds": time.time() - started,
            "train_examples": len(train),
            "activation": args.activation,
            "sparsity_penalty": args.sparsity_penalty,
            "precision": "bf16" if bf16 else "fp32",
            "sparsity_mean": float(np.mean(sparsity)),
            "sparsity_per_layer": sparsity,
        }
        if ctx.is_main:
            print(f"test accuracy {test_acc:.4f}, mean FFN activation sparsity {metrics['sparsity_mean']:.3f}", flush=True)
            with atomic_dir(args.out / "model") as folder:
                save_classifier(model, tokenizer, folder)
            write_json(args.out / "metrics.json", metrics)
            run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            run.log_metrics({f"sparsity/layer_{i}": s for i, s in enumerate(sparsity)})
    dist.teardown()


if __name__ == "__main__":
    run_step(main)
