"""Greedy-generation agreement (moefy.measure.generation): on a bigram toy whose one changed path
gives a hand-counted value, and on a tiny random LLaMA whose cached greedy picks are its uncached argmax."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from builders import build_tiny
from moefy.errors import MoefyError
from moefy.measure.generation import agreement, common_prefix, greedy_tokens, prompts_of

V = 10


class Bigram(nn.Module):
    """The next token is (last + 1) mod V, except where `changed` says otherwise: one logit path."""

    def __init__(self, changed: dict[int, int] | None = None):
        super().__init__()
        table = torch.full((V, V), -10.0)
        for token in range(V):
            table[token, (changed or {}).get(token, (token + 1) % V)] = 10.0
        self.table = nn.Parameter(table)

    def forward(self, input_ids, cache=None, use_cache=False):
        return CausalLMOutputWithPast(logits=self.table[input_ids], cache=(cache or 0) + input_ids.shape[1])


def test_identical_models_agree_fully_and_one_changed_path_gives_the_hand_count():
    prompts = [[1], [7], [5], [2, 5]]  # two lengths: two batches
    full = greedy_tokens(Bigram(), prompts, new_tokens=8)
    assert full[0] == [2, 3, 4, 5, 6, 7, 8, 9] and full[3] == [6, 7, 8, 9, 0, 1, 2, 3]
    same = agreement(greedy_tokens(Bigram(), prompts, 8), full)
    assert (same.mean, same.low, same.high, same.identical) == (1.0, 1.0, 1.0, 1.0)
    # 5 -> 7 instead of 6: from 1 the first 4 picks (2 3 4 5) agree, from 7 all 8 (the path never
    # reaches 5's successor within 8), from 5 and from 2 5 none
    changed = agreement(greedy_tokens(Bigram({5: 7}), prompts, 8), full)
    assert changed.mean == pytest.approx((4 / 8 + 1 + 0 + 0) / 4) and changed.identical == 0.25
    assert changed.prompts == 4 and changed.new_tokens == 8
    assert 0 <= changed.low < changed.mean < changed.high <= 1
    assert changed.record()["generation_agreement"] == changed.mean


def test_agreement_stops_at_the_first_divergence():
    """A match after the two continuations diverged is not agreement: the prefix counts, not the positions."""
    assert common_prefix([1, 2, 3, 4], [1, 9, 3, 4]) == 1
    assert agreement([[1, 9, 3, 4]], [[1, 2, 3, 4]]).mean == 0.25


def test_continuations_from_other_prompts_or_lengths_are_refused():
    with pytest.raises(MoefyError, match="same held-out prompts"):
        agreement([[1, 2]], [[1, 2], [3, 4]])
    with pytest.raises(MoefyError, match="same new_tokens"):
        agreement([[1, 2, 3]], [[1, 2]])
    with pytest.raises(MoefyError, match="no held-out text"):
        prompts_of([[], []], 4, 8)
    assert prompts_of([[1, 2, 3], [], [4], [5, 6]], 2, 2) == [[1, 2], [4]]


def upcycled(folder):
    """The tiny LLaMA with every other FFN upcycled into 4 experts, top-2 (moefy's sparse MoE layers)."""
    from moefy.moe.sparse import Routing, mask_padding
    from moefy.training.upcycling import upcycle_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(build_tiny("llama", folder, tokenizer=False))
    moes = upcycle_model(model, "every_other", 4, Routing("top_k", k=2), drop_ratio=0.5, seed=3)
    mask_padding(model, moes.values())
    return model


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "upcycled"])
def test_cached_greedy_picks_are_the_uncached_argmax_on_a_tiny_llama(tmp_path, sparse):
    folder = tmp_path / "m"
    model = (
        upcycled(folder) if sparse else AutoModelForCausalLM.from_pretrained(build_tiny("llama", folder, tokenizer=False))
    ).eval()
    prompts = [[3, 5, 7], [4, 6, 8], [9, 10]]
    tokens = greedy_tokens(model, prompts, new_tokens=6, batch_size=1)
    for prompt, picks in zip(prompts, tokens):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert picks == ids[len(prompt) :]
    assert greedy_tokens(model, prompts, 6) == tokens, "batched as the prompts' lengths allow: the same picks"
    assert agreement(greedy_tokens(copy.deepcopy(model), prompts, 6), tokens).mean == 1.0
