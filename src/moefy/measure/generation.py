"""Greedy generation from held-out prompts, and how long a compressed model keeps to its reference's.

Multiple-choice scores hide what merging does to generation (REAP, Lasby et al. 2026: merged
experts keep the likelihood of one answer but drift within a few generated tokens), so a causal LM
is also measured by greedy-generation agreement with the full SMoE it came from.

A prompt is the first `prompt_tokens` token ids of one held-out text (the whole text if shorter).
Each prompt is continued by `new_tokens` argmax picks, with the KV cache, and with no stop at
end-of-text (as moefy.serving.llama_cpp_measure.greedy), so every prompt yields the same count.
Prompts of one length run as one batch: no padding, so a prompt's tokens never depend on which
others share its batch.

Agreement of one prompt is the length of the longest common prefix of the two continuations over
`new_tokens`: tokens after the first divergence continue two different texts, so a later match is
a coincidence, not agreement (a position-wise share would count it). The model's agreement is the
mean over prompts, with a 95% interval of that mean from the prompts' spread (normal
approximation, clipped to [0, 1]): the prompts' sampling noise, not the seeds'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moefy.errors import MoefyError

Z = 1.959964  # two-sided 95%


def prompts_of(token_ids: Sequence[Sequence[int]], count: int, prompt_tokens: int) -> list[list[int]]:
    """The first `prompt_tokens` ids of each of the first `count` texts (those with at least one id)."""
    prompts = [list(ids[:prompt_tokens]) for ids in token_ids if len(ids)][:count]
    if not prompts:
        raise MoefyError("no held-out text has a token to prompt with; give the test split longer texts")
    return prompts


@torch.no_grad()
def greedy_tokens(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, batch_size: int = 64) -> list[list[int]]:
    """`new_tokens` argmax continuations of each prompt (in the prompts' order), with the KV cache."""
    if new_tokens < 1:
        raise MoefyError(f"new_tokens must be at least 1 (got {new_tokens})")
    model.eval()
    device = next(model.parameters()).device
    out: list[list[int] | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    for length in sorted(by_length):
        indices = by_length[length]
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            ids = torch.tensor([prompts[i] for i in batch], dtype=torch.long, device=device)
            step = model(input_ids=ids, use_cache=True)
            picks = [step.logits[:, -1].argmax(-1)]
            for _ in range(new_tokens - 1):
                step = model(input_ids=picks[-1][:, None], cache=step.cache, use_cache=True)
                picks.append(step.logits[:, -1].argmax(-1))
            for row, i in enumerate(batch):
                out[i] = [int(p[row]) for p in picks]
    return out  # type: ignore[return-value]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class Agreement:
    mean: float  # mean over prompts of common prefix / new tokens
    low: float  # its 95% interval (see the module's docstring)
    high: float
    identical: float  # share of prompts whose whole continuation is identical
    prompts: int
    new_tokens: int

    def record(self) -> dict[str, float | int]:
        return {
            "generation_agreement": self.mean,
            "generation_agreement_low": self.low,
            "generation_agreement_high": self.high,
            "generation_identical": self.identical,
            "generation_prompts": self.prompts,
            "generation_new_tokens": self.new_tokens,
        }


def agreement(tokens: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> Agreement:
    """How long each continuation keeps to the reference's for the same prompt (see the module's docstring)."""
    if len(tokens) != len(reference) or not tokens:
        raise MoefyError(
            f"{len(tokens)} continuations against {len(reference)} of the reference: both must come from the same "
            "held-out prompts; rerun the reference's evaluation with the same data and generation settings"
        )
    new_tokens = len(reference[0])
    if any(len(t) != new_tokens for t in (*tokens, *reference)):
        raise MoefyError(
            f"continuations of different lengths (the reference's: {new_tokens} tokens); rerun both evaluations "
            "with the same new_tokens"
        )
    shares = torch.tensor([common_prefix(t, r) / new_tokens for t, r in zip(tokens, reference)], dtype=torch.float64)
    mean = float(shares.mean())
    # one prompt has no spread to go by: its interval is all of [0, 1]
    half = Z * float(shares.std(unbiased=True)) / len(shares) ** 0.5 if len(shares) > 1 else 1.0
    return Agreement(
        mean=mean,
        low=max(0.0, mean - half),
        high=min(1.0, mean + half),
        identical=float((shares == 1).double().mean()),
        prompts=len(shares),
        new_tokens=new_tokens,
    )
