"""The epoch loop that finetune and train_moe share, so that a fine-tuned model, a recovered or
upcycled MoE and its dense continuation are trained by the same code on the same batches.

Each epoch draws length-grouped batches (seeded per epoch), every rank takes its part of each
global batch and DDP averages the gradients, so the trained weights do not depend on the number of
ranks; the loop measures the model after every epoch, keeps the epoch with the best validation
metric, and stops after `patience` epochs without a better one or at its cap (`epochs`, or
`total_steps` optimiser steps), whichever comes first. A run whose last epoch was its best (and
beat the model before training, where that was measured) stopped at its cap while still improving
(moefy.training.convergence): `Trained.stopped_at_cap` says so, for the step's record. What differs between the steps comes in as
functions: `objective`, the loss of a batch beyond the task's (a sparsity penalty, distillation,
the routers' auxiliary losses), and `measure`, what is measured after each epoch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from moefy import dist
from moefy.adapters.tasks import Task
from moefy.data.batches import Encoded, length_grouped_batches, shard_batches
from moefy.training import convergence

LOG_EVERY = 20  # steps between progress-bar updates (and, with log_steps, MLflow's train_loss)


@dataclass
class Batch:
    """One rank's part of a global batch after the forward pass: what an objective adds its terms to."""

    inputs: dict[str, torch.Tensor]
    logits: torch.Tensor
    # The part's task-loss sum times world_size over the global batch's loss weight: DDP's mean of
    # the ranks' gradients is then the global batch's mean, whatever the number of ranks.
    task_loss: torch.Tensor
    scale: float  # that factor, world_size / the global batch's loss weight, for terms summed the same way
    step: int  # optimiser steps taken before this batch's

    def __len__(self) -> int:
        return len(self.logits)


@dataclass
class Epoch:
    """What `measure` is handed after an epoch: training so far and the epoch's mean loss terms."""

    number: int
    steps: int  # optimiser steps since training started
    tokens: int  # tokens of the global batches trained on since training started
    means: dict[str, float]  # per step of this epoch: "task" (task loss per item) and each objective term
    started: float  # time.time() when training started

    @property
    def seconds(self) -> float:
        """Seconds since training started, read when asked (after the epoch's validation pass)."""
        return time.time() - self.started


@dataclass
class Trained:
    """What the loop did: the best epoch (its state is loaded into the model) and every epoch's record."""

    best: float | None  # validation metric of the best epoch; None when no epoch ran
    best_epoch: int  # 0 when no epoch ran
    steps: int
    tokens: int
    started: float
    history: list[dict] = field(default_factory=list)  # {"epoch", "steps", **metrics} per epoch (0: before training)
    epochs_run: int = 0
    stopped_at_cap: bool = False  # the last epoch was the best, the start included: ended by the cap, still improving


Objective = Callable[[Batch], tuple[torch.Tensor, Mapping[str, float]]]


def train_epochs(
    model: nn.Module,
    task: Task,
    data: Encoded,
    labels: torch.Tensor | None,
    ctx: dist.Context,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    name: str,
    epochs: int,
    total_steps: int,
    batch_size: int,
    seed: int,
    objective: Objective,
    measure: Callable[[Epoch], dict[str, float]],
    log: Callable[[Mapping[str, float], int], None],
    pause: Callable[[str], None],
    before: Callable[[], dict[str, float]] | None = None,
    bf16: bool = False,
    log_steps: bool = False,
    patience: int | None = None,
) -> Trained:
    """Train `model` for `epochs` epochs or `total_steps` steps, whichever ends first, and load the
    state of the epoch with the best validation metric.

    `objective(batch)` returns the loss to backpropagate (batch.task_loss plus whatever the step
    adds) and the terms to average over each epoch (floats by name). `measure(epoch)` returns the
    epoch's metrics, `validation_<task.metric>` among them; they are logged at step = epoch, and
    per-layer ones (`/layer_` in the name) are left out of the history. `before()`, when given,
    measures the model before training: logged at step 0, the history's epoch 0, never kept as
    best. `log(metrics, step)` is the MLflow run's log_metrics; `pause(point)` is called at
    "<name> epoch <n>" before each epoch (the reliability tests stop a job there); `bf16` runs the
    forward under bf16 autocast; `log_steps` logs the task loss per item as train_loss every
    LOG_EVERY steps (finetune's training curve); `patience` stops training after that many epochs
    in a row without a better validation metric than the best epoch's (None: only the cap stops it).
    """
    key = f"validation_{task.metric}"
    started = time.time()
    trained = Trained(None, 0, 0, 0, started)
    first: dict[str, float] = {}
    if before is not None:
        first = before()
        log(first, 0)
        trained.history.append({"epoch": 0, "steps": 0, **first})
    state, stale = None, 0
    ddp = DistributedDataParallel(model) if ctx.distributed else model
    for epoch in range(1, epochs + 1):
        if trained.steps >= total_steps:
            break
        if patience is not None and stale >= patience:
            if ctx.is_main:
                print(f"stopping after epoch {epoch - 1}: no better validation {task.metric} in {patience} epochs", flush=True)
            break
        pause(f"{name} epoch {epoch}")
        model.train()
        batches = length_grouped_batches(data.lengths, batch_size, seed=seed * 1000 + epoch)
        batches = [b for b in batches if len(b) >= ctx.world_size][: total_steps - trained.steps]
        sums: dict[str, float] = {"task": 0.0}
        steps = 0
        bar = tqdm(
            shard_batches(batches, ctx.rank, ctx.world_size),
            desc=f"epoch {epoch}/{epochs}",
            unit="batch",
            disable=not ctx.is_main,
            mininterval=5,
        )
        for local, full in zip(bar, batches):
            inputs = data.collate(local, ctx.device)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = ddp(**inputs).logits
            targets = None if labels is None else labels[local].to(ctx.device)
            loss = task.loss_sum(logits, inputs, targets)
            weight = max(1, task.loss_weight(data.lengths[full]))
            batch = Batch(inputs, logits, loss * ctx.world_size / weight, ctx.world_size / weight, trained.steps)
            total, terms = objective(batch)
            total.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            trained.steps += 1
            trained.tokens += int(data.lengths[full].sum())  # the global batch's, on every rank
            per_item = loss.item() / max(1, task.loss_weight(data.lengths[local]))
            sums["task"] += per_item
            for term, value in terms.items():
                sums[term] = sums.get(term, 0.0) + value
            steps += 1
            if trained.steps % LOG_EVERY == 0:
                bar.set_postfix(loss=f"{sums['task'] / steps:.3f}")
                if log_steps:
                    log({"train_loss": per_item}, trained.steps)
        done = Epoch(epoch, trained.steps, trained.tokens, {k: v / max(1, steps) for k, v in sums.items()}, started)
        metrics = measure(done)
        value = metrics[key]
        trained.epochs_run = epoch
        log(metrics, epoch)
        trained.history.append(
            {"epoch": epoch, "steps": trained.steps} | {k: v for k, v in metrics.items() if "/layer_" not in k}
        )
        if ctx.is_main:
            others = "".join(
                f", {k.removeprefix('validation_')} {v:.4g}"
                for k, v in metrics.items()
                if k.startswith("validation_") and k != key
            )
            print(
                f"epoch {epoch}: validation {task.metric} {value:.4f}{others} ({done.seconds:.0f} s, {trained.steps} steps)",
                flush=True,
            )
        if task.better(value, trained.best):
            trained.best, trained.best_epoch, state, stale = value, epoch, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
    trained.stopped_at_cap = convergence.stopped_at_cap(trained.best_epoch, trained.epochs_run) and (
        key not in first or task.better(trained.best, first[key])
    )
    if state is not None:
        model.load_state_dict(state)
    return trained
