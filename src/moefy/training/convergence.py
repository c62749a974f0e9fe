"""When a training loop stopped at its cap while still improving, and how a step says so.

Every trained part of a study (the routers, the distilled attention projections, the fine-tuned
model, a recovered or upcycled MoE) is trained by a loop that measures a held-out loss or metric
after each epoch, keeps the best epoch, and stops either after `patience` epochs without a better
one or at its cap (its epochs, or optimiser steps). A run *stopped at its cap while still
improving* when its last epoch was better than every earlier measurement (the start included,
where the loop measured it). Patience cannot have ended such a run (its last epoch reset the
count), so the cap did, while the held-out value was still moving the right way: the part is
probably under-trained, and its numbers say less about the method than about the cap.

The rule reads only the best epoch and the epochs run, so that every loop applies the same one;
each loop only counts an epoch as best when it beats the start. A step records the flag in its
metrics JSON (`stopped_at_cap`), prints `warning` once in its log, and adds its stage to the
model folder's training.json (`note`), from which the evaluate step copies it into every record,
so that the report shows it beside the results it concerns.
"""

from __future__ import annotations

KEY = "stopped_at_cap"


def stopped_at_cap(best_epoch: int, epochs_run: int) -> bool:
    """Whether a run's last epoch was its best (and it ran at least one): ended by its cap, still improving."""
    return epochs_run > 0 and best_epoch == epochs_run


def warning(what: str, cap: str) -> str:
    """The one log line a job prints when `what` stopped at `cap` (e.g. "router.mlp_epochs 30") still improving."""
    return (
        f"WARNING: {what} stopped at its cap ({cap}) while still improving (its last epoch had the best held-out "
        f"value): it is probably under-trained; raise {cap.split()[0]} to train it to convergence"
    )


def note(training: dict, stage: str) -> dict:
    """`training` (a model folder's training.json) with `stage` (e.g. "finetune", "router 3/6 layers")
    added to its list of stages that stopped at their cap while still improving."""
    stages = [s for s in training.get(KEY, []) if s != stage]
    return training | {KEY: [*stages, stage]}


def stages(training: dict, extra: str | None = None) -> str:
    """The stages a model (its training.json) and `extra` (e.g. its router's) stopped at their cap
    while still improving, as one field of an evaluation record ("" when none did)."""
    found = [*training.get(KEY, []), *([extra] if extra else [])]
    return "; ".join(found)
