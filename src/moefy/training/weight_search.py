"""Choosing the activation-sparsity penalty's weight for the study at hand (`finetune.sparsity_weight: auto`).

A weight tuned on one dataset can cost another dearly: the Hoyer weight 1.0 cost 2.4 points of
dense accuracy on the default study and 4.6 on a held-out one. D2DMoE tunes the weight per task;
this module does it with one rule, so that every study pays about the same price for its sparsity:
the largest candidate weight whose model stays within a tolerance of the unpenalised model.

The search is a ladder from the largest candidate down, stopping at the first weight within the
tolerance, so it costs one reference trial plus one trial per weight that failed, plus the one that
passed. It assumes that the cost in the metric grows with the weight (the reason for the ladder):
weights below the first one that passes are not tried. Each trial is a short fine-tune that the
caller runs (`trial(weight)`), the reference being weight 0: the same model, data, seed and
schedule with no penalty, so that the comparison is paired and differs only in the weight.

Within the tolerance means, for a metric where higher is better (accuracy), at least the
reference's value minus `tolerance` (0.01: one accuracy point); for one where lower is better
(perplexity), at most the reference's value times 1 + `tolerance` (0.01: one per cent more
perplexity), because perplexity has no fixed scale on which an absolute margin would mean the
same on every model and corpus. When no candidate is within the tolerance, the smallest is taken
and `Search.within_tolerance` is False: the caller warns, rather than stopping a study whose other
arms are fine; adding smaller candidates or a larger tolerance is the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from moefy.errors import MoefyError


@dataclass
class Trial:
    """What one short fine-tune at `weight` gave: its validation metric, and what the caller measured
    of its sparsity (the validation share of zero activations, the epoch's mean penalty), if anything."""

    weight: float
    value: float
    sparsity: float | None = None
    penalty: float | None = None
    within_tolerance: bool | None = None  # None for the reference


@dataclass
class Search:
    """The search's outcome: the reference (weight 0), every trial in the order run, the weight chosen."""

    metric: str
    higher_is_better: bool
    tolerance: float
    reference: Trial
    trials: list[Trial] = field(default_factory=list)
    chosen: float = 0.0
    within_tolerance: bool = False

    def record(self) -> dict:
        """The search as a metrics.json field (JSON types only)."""
        return {
            "metric": self.metric,
            "tolerance": self.tolerance,
            "rule": describe_rule(self.metric, self.higher_is_better, self.tolerance),
            "reference": asdict(self.reference),
            "trials": [asdict(t) for t in self.trials],
            "chosen": self.chosen,
            "within_tolerance": self.within_tolerance,
        }


def ladder(candidates: list[float]) -> list[float]:
    """The candidate weights, largest first, each once; refuses an empty list or a weight <= 0."""
    if not candidates:
        raise MoefyError("finetune.sparsity_candidates is empty; give the weights to try, e.g. [4, 2, 1, 0.5, 0.25]")
    bad = [c for c in candidates if not c > 0]
    if bad:
        raise MoefyError(
            f"finetune.sparsity_candidates must be positive weights; got {bad} (weight 0 is the reference, always run)"
        )
    return sorted(set(float(c) for c in candidates), reverse=True)


def check(candidates: list[float], tolerance: float) -> list[float]:
    """The ladder of `candidates` (see `ladder`), after refusing a negative tolerance: before any training."""
    if tolerance < 0:
        raise MoefyError(f"finetune.sparsity_tolerance must be >= 0; got {tolerance}")
    return ladder(candidates)


def warning(found: Search) -> str:
    """The log line of a search whose every candidate was outside the tolerance."""
    return (
        f"WARNING: no sparsity weight of finetune.sparsity_candidates kept {describe_rule(found.metric, found.higher_is_better, found.tolerance)} "
        f"(reference {found.reference.value:.4f}); took the smallest, {found.chosen:g}. Add smaller weights to "
        "finetune.sparsity_candidates or raise finetune.sparsity_tolerance"
    )


def within(value: float, reference: float, tolerance: float, higher_is_better: bool) -> bool:
    """Whether `value` is within `tolerance` of `reference`: absolute when higher is better
    (accuracy), relative when lower is better (perplexity); see the module's docstring."""
    if higher_is_better:
        return value >= reference - tolerance
    return value <= reference * (1.0 + tolerance)


def describe_rule(metric: str, higher_is_better: bool, tolerance: float) -> str:
    if higher_is_better:
        return f"validation {metric} >= reference - {tolerance:g}"
    return f"validation {metric} <= reference * (1 + {tolerance:g})"


def search(
    candidates: list[float],
    tolerance: float,
    metric: str,
    higher_is_better: bool,
    trial: Callable[[float], Trial],
    say: Callable[[str], None] = print,
) -> Search:
    """Run the reference (weight 0), then `trial` down the ladder of `candidates` until one is
    within `tolerance`; one line per trial through `say`, numbered out of the most trials it can take."""
    weights = check(candidates, tolerance)
    most = len(weights) + 1

    def line(number: int, t: Trial, verdict: str) -> str:
        extra = "" if t.sparsity is None else f", validation sparsity {t.sparsity:.3f}"
        return f"sparsity weight search {number}/{most}: weight {t.weight:g}, validation {metric} {t.value:.4f}{extra}: {verdict}"

    reference = trial(0.0)
    found = Search(metric, higher_is_better, tolerance, reference)
    say(line(1, reference, f"the reference ({describe_rule(metric, higher_is_better, tolerance)})"))
    for number, weight in enumerate(weights, start=2):
        result = trial(weight)
        result.within_tolerance = within(result.value, reference.value, tolerance, higher_is_better)
        found.trials.append(result)
        if result.within_tolerance:
            say(line(number, result, "within the tolerance, chosen"))
            found.chosen, found.within_tolerance = weight, True
            return found
        say(line(number, result, "outside the tolerance"))
    found.chosen = weights[-1]
    return found
