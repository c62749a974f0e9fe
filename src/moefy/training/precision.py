"""Training precision: bf16 autocast only where it is measured to be faster than float32.

A CPU that *supports* bf16 is not one where it is fast: on an AVX2-only CPU oneDNN emulates bf16
and a training step ran several times slower than in float32, while CPUs with AVX512-BF16 or AMX
(and most GPUs) run it several times faster. So `auto` times one training step of an FFN-shaped
block in both precisions, on the device and threads the fine-tune will use, and takes bf16 only
with a clear margin (the two give different numbers, so a coin toss must not decide).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from moefy.config import PRECISIONS, check_names

# bf16 must be at least this much faster to be chosen over float32.
MARGIN = 1.5
PROBE_TOKENS = 512


def _step_seconds(block: nn.Module, x: torch.Tensor, bf16: bool, repeats: int = 3) -> float:
    """Best seconds of forward + backward of `block` on x (after one warm-up step)."""
    best = float("inf")
    for attempt in range(repeats + 1):
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        started = time.perf_counter()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = block(x).float().square().mean()
        loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        if attempt:
            best = min(best, time.perf_counter() - started)
    return best


def probe_seconds(device: torch.device, d_model: int, d_ff: int) -> dict[str, float]:
    """Seconds of one training step of Linear(d, d_ff) -> ReLU -> Linear(d_ff, d) on PROBE_TOKENS
    tokens, in fp32 and under bf16 autocast (bf16 left out where autocast refuses it)."""
    generator = torch.Generator().manual_seed(0)
    block = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model)).to(device)
    x = torch.randn(PROBE_TOKENS, d_model, generator=generator).to(device)
    seconds = {"fp32": _step_seconds(block, x, bf16=False)}
    try:
        seconds["bf16"] = _step_seconds(block, x, bf16=True)
    except RuntimeError:
        pass
    return seconds


def choose(seconds: dict[str, float]) -> str:
    return "bf16" if "bf16" in seconds and seconds["bf16"] * MARGIN < seconds["fp32"] else "fp32"


def resolve(precision: str, device: torch.device, d_model: int, d_ff: int) -> tuple[str, dict[str, float]]:
    """The precision to train in ('fp32' or 'bf16') and, for `auto`, the probe's seconds per precision."""
    check_names("finetune.precision", precision, PRECISIONS)
    if precision != "auto":
        return precision, {}
    seconds = probe_seconds(device, d_model, d_ff)
    return choose(seconds), seconds
