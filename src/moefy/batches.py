"""Tokenised texts in length-grouped batches, and the metric pass every step shares.

Texts are tokenised once without padding; each batch is padded only to its longest text, and
batches group similar lengths, which makes CPU training and evaluation 2-3x faster than padding
everything to max_length.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from moefy import dist
from moefy.data import length_grouped_batches
from moefy.tasks import Task


class Encoded:
    """Token ids of a list of texts, truncated to the tokenizer's model_max_length or `max_length`."""

    def __init__(self, tokenizer, texts: Sequence[str], max_length: int | None = None):
        self.tokenizer = tokenizer
        enc = tokenizer(list(texts), truncation=True, max_length=max_length or tokenizer.model_max_length)
        self.fields = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        self.lengths = np.array([len(ids) for ids in self.fields["input_ids"]], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def collate(self, indices: Sequence[int], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        features = {k: [v[i] for i in indices] for k, v in self.fields.items()}
        batch = self.tokenizer.pad(features, return_tensors="pt")
        return {k: t.to(device) for k, t in batch.items()}


def eval_batches(encoded: Encoded, batch_size: int, ctx: dist.Context) -> list[np.ndarray]:
    """This rank's share of the length-sorted evaluation batches."""
    return dist.shard(length_grouped_batches(encoded.lengths, batch_size), ctx)


def iterate(
    model: torch.nn.Module,
    encoded: Encoded,
    batches: list[np.ndarray],
    ctx: dist.Context,
    desc: str | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor], torch.Tensor]]:
    """Forward each batch in eval mode without gradients; yields (indices, inputs, logits)."""
    model.eval()
    bar = tqdm(batches, desc=desc, unit="batch", disable=not ctx.is_main or desc is None, mininterval=2, leave=False)
    with torch.no_grad():
        for idx in bar:
            inputs = encoded.collate(idx, ctx.device)
            yield idx, inputs, model(**inputs).logits


def measure(
    model: torch.nn.Module,
    task: Task,
    encoded: Encoded,
    labels: Sequence[int] | None,
    batch_size: int,
    ctx: dist.Context,
    desc: str | None = None,
) -> float:
    """The task's metric (accuracy, perplexity) over all ranks: each rank scores its shard, sums are added."""
    labels_t = None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
    sums = torch.zeros(2, dtype=torch.float64)
    for idx, inputs, logits in iterate(model, encoded, eval_batches(encoded, batch_size, ctx), ctx, desc):
        targets = None if labels_t is None else labels_t[idx].to(logits.device)
        score, count, _ = task.batch_stats(logits, inputs, targets)
        sums += torch.tensor([score, count], dtype=torch.float64)
    dist.all_reduce_sum(sums, ctx)
    return task.metric_of(float(sums[0]), float(sums[1]))
