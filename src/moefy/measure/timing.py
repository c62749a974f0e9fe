"""Paired wall-clock timing of MoE layers against the dense FFNs they replace.

Timing a whole MoE pass and a whole dense pass one after the other lets whatever else the machine
does in between move the ratio. So every PAIR_EVERY-th forward of a layer also runs the dense FFN
on the same tokens, right next to it (alternately before and after), and the FFN speed-up is the
ratio of those pairs. The layer itself knows nothing of this: the timer hooks its forward.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# Every call would add a dense FFN to each evaluate pass (+40% to the job); every other call still
# samples every batch length, as evaluation batches are sorted by length and each layer keeps its
# own count.
PAIR_EVERY = 2


def sync(t: torch.Tensor) -> None:
    """Wait for a GPU's kernels, which run asynchronously, so that the clock measures them."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@dataclass
class LayerClock:
    seconds: float = 0.0  # in the layer's forwards (router included)
    paired_seconds: float = 0.0  # the paired forwards' share of `seconds`
    dense_seconds: float = 0.0  # the dense FFN timed next to them
    calls: int = 0
    _started: float = 0.0
    _paired: bool = False
    _dense_first: bool = False


def time_dense(layer: nn.Module, x: torch.Tensor) -> float:
    """Seconds the layer's dense FFN takes on x (its output is dropped)."""
    with torch.no_grad():
        sync(x)
        started = time.perf_counter()
        sync(layer.dense(x.reshape(-1, layer.d_model)))
        return time.perf_counter() - started


@contextmanager
def paired_timing(layers: Sequence[nn.Module], paired: bool = True) -> Iterator[list[LayerClock]]:
    """While inside, time every forward of each MoE layer (MoEFFN) into its clock; with `paired`,
    also time the dense FFN next to every PAIR_EVERY-th forward that does not run dense anyway."""
    clocks = [LayerClock() for _ in layers]
    handles = []
    for layer, clock in zip(layers, clocks):

        def before(module, args, clock=clock):
            x = args[0]
            clock._paired = paired and not module.runs_dense and clock.calls % PAIR_EVERY == 0
            clock._dense_first = clock._paired and clock.calls % (2 * PAIR_EVERY) == PAIR_EVERY
            clock.calls += 1
            if clock._dense_first:
                clock.dense_seconds += time_dense(module, x)
            sync(x)
            clock._started = time.perf_counter()

        def after(module, args, out, clock=clock):
            sync(out)
            elapsed = time.perf_counter() - clock._started
            clock.seconds += elapsed
            if clock._paired:
                clock.paired_seconds += elapsed
                if not clock._dense_first:
                    clock.dense_seconds += time_dense(module, args[0])

        handles += [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    try:
        yield clocks
    finally:
        for handle in handles:
            handle.remove()


def total_seconds(clocks: Sequence[LayerClock]) -> tuple[float, float, float]:
    """(seconds in the layers' forwards, of it in the paired forwards, in the dense FFNs next to them)."""
    return tuple(sum(getattr(clock, name) for clock in clocks) for name in ("seconds", "paired_seconds", "dense_seconds"))
