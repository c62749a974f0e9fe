"""What a study runs: the validated config's grid of arms turned into variants and evaluations.

A variant is one fine-tuned model (a sparsity penalty and a replicate seed); an evaluation is one
conversion of a variant (split, expert count, selector) measured at the top-k budgets and dynamic-k
thresholds of every arm that contains it. rules/common.smk turns these into file paths.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Variant:
    """One fine-tuned dense model: its folder name is `<penalty>-seed<seed>`."""

    penalty: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.penalty}-seed{self.seed}"


@dataclass(frozen=True, order=True)
class Evaluation:
    variant: Variant
    split: str
    num_experts: int
    selector: str

    @property
    def name(self) -> str:
        """The file name of its records, `<split>-E<num_experts>-<selector>`."""
        return f"{self.split}-E{self.num_experts}-{self.selector}"


@dataclass(frozen=True)
class Rules:
    """Which selection rules an evaluation measures."""

    budgets: tuple[float, ...]
    thresholds: tuple[float, ...]


class Study:
    def __init__(self, config: dict[str, Any]):
        """`config` must be validated (moefy.config.validate fills in the defaults read here)."""
        self.config = config
        defaults = config["evaluate"]
        budgets: dict[Evaluation, set[float]] = {}
        thresholds: dict[Evaluation, set[float]] = {}
        for arm in config["grid"].values():
            for penalty, seed, split, num_experts, selector in itertools.product(
                arm["penalty"], arm["seed"], arm["split"], arm["num_experts"], arm["selector"]
            ):
                evaluation = Evaluation(Variant(penalty, seed), split, num_experts, selector)
                budgets.setdefault(evaluation, set()).update(arm.get("budgets", defaults["budgets"]))
                thresholds.setdefault(evaluation, set()).update(arm.get("thresholds", defaults["thresholds"]))
        self._rules = {e: Rules(tuple(sorted(budgets[e])), tuple(sorted(thresholds[e]))) for e in sorted(budgets)}
        self._defaults = Rules(tuple(sorted(defaults["budgets"])), tuple(sorted(defaults["thresholds"])))

    @property
    def evaluations(self) -> list[Evaluation]:
        return list(self._rules)

    @property
    def variants(self) -> list[Variant]:
        return sorted({e.variant for e in self._rules})

    @property
    def expert_counts(self) -> list[int]:
        return sorted({e.num_experts for e in self._rules})

    def rules(self, evaluation: Evaluation) -> Rules:
        """The arms' budgets and thresholds; an evaluation outside the grid (asked for by file name)
        gets evaluate.budgets and evaluate.thresholds."""
        return self._rules.get(evaluation, self._defaults)
