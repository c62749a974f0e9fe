"""What a study runs: the validated config's grid of arms turned into variants and evaluations.

A variant is one fine-tuned model (a sparsity penalty and a replicate seed); an evaluation is one
conversion of a variant (what it converts, split, expert count and how many are shared, router), as
converted or after recovery training, measured at the top-k budgets (in each allocation over the
layers) and dynamic-k thresholds of every arm that contains it. An upcycled
model is one of `upcycling.models` built from one variant; a merged model is one of those merged
(and compressed, distilled) by `merging`. rules/common.smk turns these into file paths.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from moefy.errors import MoefyError

# The folder of one fine-tuned model, as a format (rules/common.smk uses it as a wildcard pattern).
VARIANT_FORMAT = "{penalty}-seed{seed}"


@dataclass(frozen=True, order=True)
class Variant:
    """One fine-tuned dense model: its folder name is `<penalty>-seed<seed>`."""

    penalty: str
    seed: int

    @property
    def name(self) -> str:
        return VARIANT_FORMAT.format(penalty=self.penalty, seed=self.seed)


# The folder suffix of a variant whose attention projections are converted too (convert ffn+attention).
ATTENTION_SUFFIX = "-attention"


def shared_suffix(shared_experts: int) -> str:
    """The suffix of a conversion's folder after `-E<E>`: `-S<S>` with shared experts, else none."""
    return f"-S{shared_experts}" if shared_experts else ""


@dataclass(frozen=True, order=True)
class Evaluation:
    variant: Variant
    split: str
    num_experts: int
    router: str
    recovery: str = "none"
    convert: str = "ffn"
    shared_experts: int = 0

    @property
    def converted(self) -> str:
        """The folder of the model its conversion chain starts from: `<variant>`, or
        `<variant>-attention` for the variant's distilled model (convert ffn+attention)."""
        return self.variant.name + (ATTENTION_SUFFIX if self.convert == "ffn+attention" else "")

    @property
    def conversion(self) -> str:
        """`<split>-E<num_experts>[-S<shared_experts>]-<router>`: the folder of its router (and of its recovery)."""
        return f"{self.split}-E{self.num_experts}{shared_suffix(self.shared_experts)}-{self.router}"

    @property
    def name(self) -> str:
        """The file name of its records: the conversion, then `-<recovery>` if it was recovered."""
        return self.conversion + ("" if self.recovery == "none" else f"-{self.recovery}")


@dataclass(frozen=True, order=True)
class Upcycled:
    """One model of `upcycling.models` built from one variant (name `dense`: the dense continuation)."""

    variant: Variant
    name: str


@dataclass(frozen=True, order=True)
class Merged:
    """One merged model (name as moefy.training.merging.chain_of reads it; `full`: the SMoE as trained) of
    one upcycled model."""

    upcycled: Upcycled
    name: str


def merged_names(groups: list[float], methods: list[str], recoveries: list[str]) -> list[str]:
    """`full`, then every method at every group count and recovery, named by its chain of steps:
    mcsmoe is msmoe-G<g>-svd (one-shot) and msmoe-G<g>-kd-svd-kd (MC-SMoE's merge, distil,
    compress, distil)."""
    names = ["full"]
    for g, method, recovery in itertools.product(groups, methods, recoveries):
        head = f"{'msmoe' if method == 'mcsmoe' else method}-G{g:g}"
        if method == "mcsmoe":
            names.append(f"{head}-svd" if recovery == "none" else f"{head}-kd-svd-kd")
        else:
            names.append(head if recovery == "none" else f"{head}-kd")
    return names


@dataclass(frozen=True)
class Rules:
    """Which selection rules an evaluation measures."""

    budgets: tuple[float, ...]
    thresholds: tuple[float, ...]
    allocations: tuple[str, ...] = ("uniform",)


def check_budgets(arm_name: str, budgets, num_experts: int, shared_experts: int) -> None:
    """Every budget must activate more experts than the shared ones (moefy.conversion.routers.budget_to_k)."""
    from moefy.conversion.routers import active_experts

    if shared_experts >= num_experts:
        raise MoefyError(
            f"grid.{arm_name}: shared_experts {shared_experts} must be below num_experts {num_experts}: "
            "at least one expert must be routed"
        )
    low = [b for b in budgets if active_experts(b, num_experts) <= shared_experts]
    if low:
        raise MoefyError(
            f"grid.{arm_name}: budget {', '.join(f'{b:g}' for b in low)} activates no more than its {shared_experts} "
            f"shared experts of {num_experts}; give budgets above {shared_experts / num_experts:.3g} or fewer shared experts"
        )


class Study:
    def __init__(self, config: dict[str, Any]):
        """`config` must be validated (moefy.config.validate fills in the defaults read here)."""
        self.config = config
        if config.get("second_corpus") and config["task"] != "causal_lm":
            raise MoefyError(
                f"second_corpus: a second corpus is measured by perplexity, so it needs task causal_lm, not {config['task']}; "
                "remove the section"
            )
        defaults = config["evaluate"]
        budgets: dict[Evaluation, set[float]] = {}
        thresholds: dict[Evaluation, set[float]] = {}
        allocations: dict[Evaluation, set[str]] = {}
        for name, arm in config["grid"].items():
            if "ffn+attention" in arm["convert"] and set(arm["recovery"]) != {"none"}:
                raise MoefyError(
                    f"grid.{name}: recovery {', '.join(r for r in arm['recovery'] if r != 'none')} of converted attention "
                    "projections is not supported; give that arm convert: [ffn] or recovery: [none]"
                )
            softmax = [r for r in arm["recovery"] if r.endswith("-softmax")]
            if softmax and set(arm["router"]) != {"linear"}:
                raise MoefyError(
                    f"grid.{name}: recovery {', '.join(softmax)} trains softmax gates on a linear router (the served MoE "
                    f"formats' router), not on {', '.join(r for r in arm['router'] if r != 'linear')}: "
                    "give that arm router: [linear], or move the other routers to an arm of their own"
                )
            for penalty, seed, split, num_experts, shared, router, recovery, convert in itertools.product(
                arm["penalty"],
                arm["seed"],
                arm["split"],
                arm["num_experts"],
                arm["shared_experts"],
                arm["router"],
                arm["recovery"],
                arm["convert"],
            ):
                evaluation = Evaluation(Variant(penalty, seed), split, num_experts, router, recovery, convert, shared)
                check_budgets(name, arm.get("budgets", defaults["budgets"]), num_experts, shared)
                if recovery != "none":
                    check_budgets(f"{name} (recover.budget)", [config["recover"]["budget"]], num_experts, shared)
                budgets.setdefault(evaluation, set()).update(arm.get("budgets", defaults["budgets"]))
                thresholds.setdefault(evaluation, set()).update(arm.get("thresholds", defaults["thresholds"]))
                allocations.setdefault(evaluation, set()).update(arm["allocation"])
        self._rules = {
            e: Rules(tuple(sorted(budgets[e])), tuple(sorted(thresholds[e])), tuple(sorted(allocations[e], reverse=True)))
            for e in sorted(budgets)
        }
        self._defaults = Rules(tuple(sorted(defaults["budgets"])), tuple(sorted(defaults["thresholds"])))
        upcycling = config["upcycling"]
        names = sorted(upcycling["models"])
        self.upcycled = [
            Upcycled(Variant(upcycling["penalty"], seed), name)
            for seed in upcycling["seeds"]
            for name in (names + ["dense"] if names else [])
        ]
        merging = config["merging"]
        unknown = sorted(set(merging["models"]) - set(names))
        if unknown:
            raise MoefyError(
                f"merging.models names {', '.join(unknown)}, not in upcycling.models ({', '.join(names) or 'none'}): "
                "merge models the study upcycles"
            )
        self.merged = [
            Merged(u, name)
            for u in self.upcycled
            if u.name in merging["models"]
            for name in merged_names(merging["groups"], merging["methods"], merging["recovery"])
        ]

    @property
    def evaluations(self) -> list[Evaluation]:
        return list(self._rules)

    @property
    def served(self) -> list[str]:
        """The serve folders (under serve/) of serve.budgets, .upcycled and .merged: the softmax-gated
        recoveries at each budget, the upcycled models, the merged ones."""
        serve = self.config["serve"]
        if (serve["budgets"] or serve["upcycled"] or serve["merged"]) and self.config["task"] != "causal_lm":
            raise MoefyError(
                f"serve: the served MoE classes are decoders, so serving needs task causal_lm, not {self.config['task']}; "
                "remove the section (an encoder exports with rule export)"
            )
        gated = [e for e in self._rules if e.recovery.endswith("-softmax")]
        for e in gated:
            check_budgets(f"{e.name} (serve.budgets)", serve["budgets"], e.num_experts, e.shared_experts)
        folders = [f"{e.converted}/{e.name}-b{budget:g}" for e in gated for budget in sorted(serve["budgets"])]
        if serve["upcycled"]:
            folders += [f"{u.variant.name}/{u.name}" for u in self.upcycled if u.name != "dense"]
        if serve["merged"]:
            folders += [f"{m.upcycled.variant.name}/{m.upcycled.name}-{m.name}" for m in self.merged if m.name != "full"]
        return folders

    @property
    def variants(self) -> list[Variant]:
        """Every fine-tuned model the study needs: those converted and those upcycled."""
        return sorted({e.variant for e in self._rules} | {u.variant for u in self.upcycled})

    def upcycle_settings(self, name: str) -> dict[str, Any]:
        """The upcycle keys of model `name` (validated: the section's defaults filled in)."""
        return dict(self.config["upcycling"]["models"][name])

    @property
    def distilled(self) -> list[Variant]:
        """The variants whose attention projections are distilled (an arm converts ffn+attention)."""
        return sorted({e.variant for e in self._rules if e.convert == "ffn+attention"})

    @property
    def width_multiple(self) -> int:
        """What the distilled MLPs' widths are rounded to: every expert count an ffn+attention
        conversion splits them into divides it (1 if there are none)."""
        return math.lcm(1, *(e.num_experts for e in self._rules if e.convert == "ffn+attention"))

    @property
    def expert_shapes(self) -> list[tuple[int, int]]:
        """Every (expert count, shared experts) of the grid's conversions: the kernels' shapes."""
        return sorted({(e.num_experts, e.shared_experts) for e in self._rules})

    def rules(self, evaluation: Evaluation) -> Rules:
        """The arms' budgets and thresholds; an evaluation outside the grid (asked for by file name)
        gets evaluate.budgets and evaluate.thresholds."""
        return self._rules.get(evaluation, self._defaults)
