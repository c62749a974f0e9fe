"""Step finetune: train the dense model (ReLU-swapped by default) on the task.

Classification trains a sequence-classification head and keeps the epoch with the best validation
accuracy; causal_lm trains next-token prediction and keeps the lowest validation perplexity. With
0 epochs the model is measured and saved as loaded. With a penalty and `--sparsity-weight auto`, the
weight is searched first (moefy.training.weight_search: short trials from the loaded model, the
largest candidate within a tolerance of the unpenalised trial), then the chosen one is fine-tuned.
Runs as a plain process, or data parallel under torch.distributed.run (every rank takes its part of
each global batch).
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
from moefy.training import convergence, precision, weight_search
from moefy.training.loop import Batch, Epoch, Trained, train_epochs
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
    penalised = args.penalty != "none"  # penalty none ignores sparsity_weight, auto included
    auto = penalised and args.sparsity_weight == "auto"
    if auto:
        weight_search.check(args.sparsity_candidates, args.sparsity_tolerance)
    label_names = read_label_names(args.data) if task.labelled else None
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    tokenizer.model_max_length = args.max_length  # travels with the saved tokenizer to every later step

    def load():
        loaded = load_model(
            args.model,
            task.name,
            label_names=label_names,
            activation="relu" if args.activation == "relu" else None,
            trust_remote_code=args.trust_remote_code,
        ).to(ctx.device)
        if args.freeze_embeddings:
            loaded.get_input_embeddings().weight.requires_grad_(False)
        return loaded

    spare = load()  # the first fine-tune's model (see fresh)
    train_set = read_texts(args.data, "train", task, args.max_train_examples, args.seed)
    val_set, test_set = read_texts(args.data, "validation", task), read_texts(args.data, "test", task)
    train = Encoded(tokenizer, train_set.texts)
    train_y = None if train_set.labels is None else torch.as_tensor(train_set.labels, dtype=torch.long)
    val_labels, test_labels = val_set.labels, test_set.labels
    validation, test = Encoded(tokenizer, val_set.texts), Encoded(tokenizer, test_set.texts)

    ffns = find_ffns(spare)
    chosen, probe = precision.resolve(args.precision, ctx.device, ffns[0].d_model, ffns[0].d_ff)
    bf16 = chosen == "bf16"
    # Where a fine-tune's randomness (dropout) starts: the seed, the model's loading and the precision
    # probe behind it. Every trial of a weight search starts from a model loaded from the same seed
    # and from this state, so that a trial at weight w is the fine-tune a fixed weight w would run.
    start_rng = torch.get_rng_state()

    def fresh():
        """A newly loaded model, and the random state a fine-tune starts from (the first call: `spare`)."""
        nonlocal spare
        if spare is not None:
            first, spare = spare, None
            return first
        torch.manual_seed(args.seed)
        loaded = load()
        torch.set_rng_state(start_rng)
        return loaded

    with tracking.job_run("finetune", vars(args), ablation(args), enabled=ctx.is_main) as run:
        run.set_tags({"precision": chosen, "world_size": ctx.world_size})
        metric = task.metric

        def fit(net, weight: float, epochs: int, name: str, log) -> Trained:
            """Fine-tune `net` for `epochs` (warm-up, decay and ramp over those epochs' steps) at `weight`."""
            layers = find_ffns(net)
            trainable = [p for p in net.parameters() if p.requires_grad]
            optimizer, scheduler, total_steps = optimiser(trainable, train.lengths, args, epochs)

            with capture(layers, inputs=False, activations=penalised) as seen:

                def objective(batch: Batch):
                    """The task loss, plus the activation-sparsity penalty at its ramped weight."""
                    if not penalised:
                        return batch.task_loss, {}
                    hs = [seen[f.index]["h"] for f in layers]
                    penalty = layers_penalty(hs, batch.inputs["attention_mask"].bool(), args.penalty)
                    ramped = ramped_weight(weight, batch.step, total_steps, args.sparsity_ramp)
                    return batch.task_loss + ramped * penalty, {"penalty": penalty.item()}

                def after_epoch(epoch: Epoch) -> dict[str, float]:
                    value = measure(net, task, validation, val_labels, args.eval_batch_size, ctx, "validation")
                    metrics = {f"validation_{metric}": value, "epoch_seconds": epoch.seconds}
                    if penalised:
                        metrics[f"{args.penalty}_penalty"] = epoch.means["penalty"]
                        metrics["validation_sparsity_mean"] = float(
                            np.mean(activation_sparsity(net, validation, args.eval_batch_size, ctx))
                        )
                    return metrics

                return train_epochs(
                    net, task, train, train_y, ctx, optimizer, scheduler, name=name, epochs=epochs,
                    total_steps=total_steps, batch_size=args.batch_size, seed=args.seed, objective=objective,
                    measure=after_epoch, log=log, pause=pause.point, bf16=bf16, log_steps=True, patience=args.patience,
                )  # fmt: skip

        searched = None
        if auto and args.epochs > 0:
            model, trained, searched = search_weight(args, task, fresh, fit, run, ctx)
            weight = searched.chosen
        else:
            weight = args.sparsity_weight if penalised and not auto else None
            model = fresh()
            trained = fit(model, weight or 0.0, args.epochs, "finetune", run.log_metrics)
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
            **({"sparsity_weight": weight} if weight is not None else {}),
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
        if searched is not None:
            metrics["sparsity_search"] = searched.record() | {"epochs": min(args.sparsity_search_epochs, args.epochs)}
        if ctx.is_main:
            if searched is not None and not searched.within_tolerance:
                print(weight_search.warning(searched), flush=True)
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


def search_weight(args, task, fresh, fit, run, ctx):
    """`finetune.sparsity_weight: auto`: the reference and the candidates' trials, each a fine-tune
    of sparsity_search_epochs from a fresh model (moefy.training.weight_search), then the chosen
    weight's model: the trial's when the trials ran the full schedule, else trained for epochs.
    Returns (model, its Trained, the Search)."""
    epochs = min(args.sparsity_search_epochs, args.epochs)
    last = {}

    def trial(weight: float) -> weight_search.Trial:
        logged: list[tuple[dict, int]] = []
        last.clear()  # let the previous trial's model go before the next one is loaded
        net = fresh()
        trained = fit(net, weight, epochs, f"finetune search {weight:g}", lambda m, step: logged.append((dict(m), step)))
        best = next((h for h in trained.history if h["epoch"] == trained.best_epoch), {})
        last.update(weight=weight, model=net, trained=trained, logged=logged)
        return weight_search.Trial(
            weight, trained.best, best.get("validation_sparsity_mean"), best.get(f"{args.penalty}_penalty")
        )

    say = (lambda line: print(line, flush=True)) if ctx.is_main else (lambda line: None)
    searched = weight_search.search(
        args.sparsity_candidates, args.sparsity_tolerance, task.metric, task.higher_is_better, trial, say
    )
    for step, t in enumerate([searched.reference, *searched.trials]):
        summary = {"sparsity_search_weight": t.weight, f"sparsity_search_validation_{task.metric}": t.value}
        summary |= {} if t.sparsity is None else {"sparsity_search_sparsity_mean": t.sparsity}
        summary |= {} if t.penalty is None else {f"sparsity_search_{args.penalty}_penalty": t.penalty}
        run.log_metrics(summary, step)
    if epochs >= args.epochs and last["weight"] == searched.chosen:  # the trial was the full fine-tune
        for metrics, step in last["logged"]:
            run.log_metrics(metrics, step)
        say(f"sparsity weight {searched.chosen:g}: keeping its trial's model (the trials ran all {args.epochs} epochs)")
        return last["model"], last["trained"], searched
    last.clear()
    say(f"sparsity weight {searched.chosen:g}: fine-tuning for {args.epochs} epochs")
    model = fresh()
    return model, fit(model, searched.chosen, args.epochs, "finetune", run.log_metrics), searched


if __name__ == "__main__":
    run_step(main)
