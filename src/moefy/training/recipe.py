"""What the training steps (finetune, train_moe) share: the task's texts as they train on them,
and the optimiser with its schedule, so a dense continuation and an MoE trained from the same
model see the same examples in the same schedule."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from moefy.data.batches import length_grouped_batches
from moefy.data.subsets import read_subset
from moefy.errors import MoefyError


@dataclass
class Texts:
    texts: list[str]
    labels: list[int] | None


def read_texts(data: Path, subset: str, task, limit: int | None = None, seed: int = 0) -> Texts:
    """One subset of the data step's files for `task`; with `limit`, a seeded sample of that many
    examples (kept in file order), drawn the same way in every step."""
    path = data / f"{subset}.jsonl"
    texts, labels = read_subset(path)
    if task.labelled and labels is None:
        raise MoefyError(f"{path} has no labels, but task {task.name} needs them; rerun the data step with --task {task.name}")
    labels = labels if task.labelled else None
    if limit and limit < len(texts):
        keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:limit])
        texts = [texts[i] for i in keep]
        labels = None if labels is None else [labels[i] for i in keep]
    return Texts(texts, labels)


def optimiser(parameters, lengths, args, epochs: int, max_steps: int | None = None):
    """AdamW at args.learning_rate with linear warm-up over args.warmup_ratio of the steps, then
    linear decay to 0; returns (optimizer, scheduler, total steps)."""
    steps_per_epoch = len(length_grouped_batches(lengths, args.batch_size, seed=0))
    total = steps_per_epoch * epochs
    if max_steps:
        total = min(total, max_steps)
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total), total)
    return optimizer, scheduler, total
