"""Tokenised texts in length-grouped batches, sharded over ranks, and the metric pass every step shares.

Texts are tokenised once without padding; each batch is padded only to its longest text, and
batches group similar lengths, which makes CPU training and evaluation 2-3x faster than padding
everything to max_length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from moefy import dist
from moefy.adapters.tasks import Task
from moefy.errors import MoefyError


def length_grouped_batches(
    lengths: Sequence[int] | np.ndarray,
    batch_size: int,
    seed: int | None = None,
    pool: int = 50,
) -> list[np.ndarray]:
    """Batches of indices whose examples have similar lengths, so little compute goes to padding.

    Without a seed (evaluation) the order is simply by length. With a seed (training) examples are
    shuffled, sorted by length only within pools of `pool * batch_size`, and the batches shuffled,
    so batches stay random across epochs while padding stays small.
    """
    if batch_size < 1:
        raise MoefyError(f"batch size must be at least 1, got {batch_size}")
    lengths = np.asarray(lengths)
    n = len(lengths)
    if seed is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n)
    pool_size = max(1, pool) * batch_size
    batches = []
    for start in range(0, n, pool_size):
        chunk = shuffled[start : start + pool_size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def shard_batches(batches: Sequence[np.ndarray], rank: int, world_size: int) -> list[np.ndarray]:
    """This rank's share of every batch, for data-parallel training.

    Each global batch is cut into `world_size` contiguous, nearly equal parts (sizes differ by at
    most one) and rank r takes part r. All ranks therefore step through the same global batches, so
    one optimizer step sees the same examples whatever the world size — results do not depend on the
    number of processes. For the gradients to match exactly, weight by the global batch, not the
    part: DDP averages gradients over ranks, so each rank's loss should be the sum of its per-example
    losses times world_size / len(global batch). A part is empty when a batch has fewer examples
    than ranks; that rank must still take part in the step (with a zero loss).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return [np.array_split(np.asarray(batch), world_size)[rank] for batch in batches]


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


def choose_texts(lengths: np.ndarray, max_tokens: int, sample_tokens: int, seed: int) -> tuple[np.ndarray, int]:
    """Texts to count, in a seeded order, up to max_tokens; the first `n_sample` of them form the sample."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    cumulative = np.cumsum(lengths[order])
    n_count = int(np.searchsorted(cumulative, max_tokens) + 1)
    n_sample = int(np.searchsorted(cumulative, sample_tokens) + 1)
    return order[: min(n_count, len(order))], min(n_sample, n_count, len(order))
