"""What a task means for training and measuring: sequence classification or causal language modelling.

Steps stay one code path: they ask the task for the training loss of a batch, and for each
batch's (score sum, count, predictions), from which the task's metric follows (accuracy, or
perplexity = exp(mean next-token loss)). Predictions are what "agrees with the dense model"
compares: the class of each text, or the argmax next token at each position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moefy.config import TASKS
from moefy.errors import MoefyError


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    higher_is_better: bool
    labelled: bool

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.higher_is_better else value < best

    def loss_sum(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        """Summed training loss of one batch (float32)."""
        raise NotImplementedError

    def loss_weight(self, lengths: np.ndarray) -> int:
        """What loss_sum sums over for texts of these token lengths (texts, or predicted tokens)."""
        raise NotImplementedError

    def batch_stats(
        self, logits: torch.Tensor, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None
    ) -> tuple[float, int, torch.Tensor]:
        """(score sum, count, predictions) of one batch; the metric is `metric_of(sums, counts)`."""
        raise NotImplementedError

    def metric_of(self, score_sum: float, count: float) -> float:
        raise NotImplementedError


class Classification(Task):
    def loss_sum(self, logits, inputs, labels):
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def loss_weight(self, lengths):
        return len(lengths)

    def batch_stats(self, logits, inputs, labels):
        predictions = logits.argmax(-1)
        return float((predictions == labels).sum()), len(predictions), predictions

    def metric_of(self, score_sum, count):
        return score_sum / max(count, 1)


class CausalLM(Task):
    """Next-token prediction on every real token after the first of each text."""

    @staticmethod
    def _shifted(logits, inputs):
        targets = inputs["input_ids"][:, 1:]
        real = inputs["attention_mask"][:, 1:].bool()
        return logits[:, :-1][real].float(), targets[real]

    def loss_sum(self, logits, inputs, labels):
        predicted, targets = self._shifted(logits, inputs)
        return F.cross_entropy(predicted, targets, reduction="sum")

    def loss_weight(self, lengths):
        return int(np.maximum(np.asarray(lengths) - 1, 0).sum())

    def batch_stats(self, logits, inputs, labels):
        predicted, targets = self._shifted(logits, inputs)
        nll = F.cross_entropy(predicted.float(), targets, reduction="sum")  # bf16 logits: the loss summed in fp32
        return float(nll), len(targets), predicted.argmax(-1)

    def metric_of(self, score_sum, count):
        return math.exp(score_sum / max(count, 1))


_TASKS = {
    "classification": Classification("classification", "accuracy", higher_is_better=True, labelled=True),
    "causal_lm": CausalLM("causal_lm", "perplexity", higher_is_better=False, labelled=False),
}
assert set(_TASKS) == set(TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise MoefyError(f"task {name!r} is unknown; choose one of {', '.join(_TASKS)}")
    return _TASKS[name]
