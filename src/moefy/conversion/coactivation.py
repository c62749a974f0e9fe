"""Neuron co-activation counts, accumulated as a streaming matrix product.

C[i, j] counts the tokens on which neurons i and j both fire; C[i, i] counts the tokens on which
i fires. `update` takes the boolean firing mask of FFN.fired (which also defines firing for gated and
never-zero activations), or ReLU activations, which fire where h > 0. Each batch adds B^T B for its
binarised activations B [tokens, d_ff], so memory is the d_ff x d_ff accumulator plus one batch's
product (never a tokens x d_ff x d_ff tensor).

B is 0/1, so the product is exact both in int8 with int32 accumulation (torch._int_mm) and in
float32 while a count stays below 2^24 (the limit enforced here). Which one is faster depends on
the machine, not on what it supports: with VNNI int8 is several times faster, on an AVX2-only CPU
torch._int_mm works but ran 56x slower than float32. So the kernel is chosen by timing both on a
probe of the real width once per process (`fastest_kernel`); the counts are the same either way.
"""

from __future__ import annotations

import functools
import time

import torch

EXACT_LIMIT = 2**24
KERNELS = ("int8", "float32")
PROBE_ROWS = 512  # tokens in the timing probe: a multiple of 8, as torch._int_mm wants
PROBE_COLUMNS = 1024  # wider layers are probed on their first 1024 neurons: the same kernel speed per element


def _fired(h: torch.Tensor) -> torch.Tensor:
    return h if h.dtype == torch.bool else h > 0


def _seconds(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def probe_seconds(device_type: str, d_ff: int) -> dict[str, float]:
    """Best seconds per B^T B of a [PROBE_ROWS, min(d_ff, PROBE_COLUMNS)] 0/1 batch, per kernel that
    works on this device (int8 is left out where torch._int_mm refuses the device or gets it wrong)."""
    columns = min(d_ff, PROBE_COLUMNS)
    generator = torch.Generator().manual_seed(0)
    fired = (torch.rand(PROBE_ROWS, columns, generator=generator) < 0.2).to(device_type)
    as_float, as_int8 = fired.float(), fired.to(torch.int8)
    acc = torch.zeros(columns, columns, device=device_type)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)

    def float32() -> None:
        acc.addmm_(as_float.t(), as_float)
        sync()

    def int8() -> torch.Tensor:
        product = torch._int_mm(as_int8.t().contiguous(), as_int8)
        sync()
        return product

    float32()  # warm-up: first calls pay for allocation and kernel selection
    seconds = {"float32": min(_seconds(float32) for _ in range(3))}
    try:
        if not torch.equal(int8().float(), as_float.t() @ as_float):  # also int8's warm-up
            return seconds
    except (RuntimeError, AttributeError, NotImplementedError):
        return seconds
    first = _seconds(int8)
    # A kernel several times slower is not timed again (on an AVX2-only CPU one call took seconds).
    seconds["int8"] = first if first > 3 * seconds["float32"] else min(first, *(_seconds(int8) for _ in range(2)))
    return seconds


def choose_kernel(seconds: dict[str, float]) -> str:
    """int8 only where it is clearly (20%) faster than float32; float32 otherwise."""
    return "int8" if "int8" in seconds and seconds["int8"] * 1.2 < seconds["float32"] else "float32"


@functools.cache
def fastest_kernel(device_type: str, d_ff: int) -> tuple[str, tuple[tuple[str, float], ...]]:
    """The kernel for this device and width, and the probe's seconds per kernel (measured once)."""
    seconds = probe_seconds(device_type, d_ff)
    return choose_kernel(seconds), tuple(sorted(seconds.items()))


class CoactivationCounter:
    def __init__(self, d_ff: int, device: torch.device | str = "cpu", kernel: str | None = None):
        """`kernel`: int8 or float32; None measures which is faster here (fastest_kernel)."""
        device = torch.device(device)
        self.kernel = kernel or fastest_kernel(device.type, d_ff)[0]
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown co-activation kernel {self.kernel!r}; choose one of {', '.join(KERNELS)}")
        self._acc = torch.zeros(d_ff, d_ff, dtype=torch.int32 if self.kernel == "int8" else torch.float32, device=device)
        self.tokens = 0

    @property
    def counts(self) -> torch.Tensor:
        """The counts as float32 [d_ff, d_ff]; a distributed step all-reduces this tensor."""
        if self._acc.dtype != torch.float32:
            self._acc = self._acc.float()
        return self._acc

    def update(self, h: torch.Tensor) -> None:
        """Add some tokens' firing mask (bool) or ReLU activations, h [tokens, d_ff]."""
        if self.tokens + h.shape[0] > EXACT_LIMIT:
            raise ValueError(f"co-activation counts are exact up to {EXACT_LIMIT} tokens; lower activations.max_tokens")
        self.tokens += h.shape[0]
        if self._acc.dtype == torch.int32:
            fired = _fired(h).to(torch.int8)
            rows = fired.shape[0]
            if rows % 8:  # _int_mm wants the inner dimension in multiples of 8; zero rows count nothing
                fired = torch.cat([fired, fired.new_zeros(8 - rows % 8, fired.shape[1])])
            try:
                self._acc += torch._int_mm(fired.t().contiguous(), fired)
                return
            except RuntimeError:  # a shape this device's int8 kernel refuses: count in float32 from now on
                self._acc = self._acc.float()
                self.kernel = "float32"
        fired = _fired(h).to(torch.float32)
        self._acc.addmm_(fired.t(), fired)

    def sparsity(self) -> float:
        """Share of zero (non-firing) activations among the counted tokens."""
        if self.tokens == 0:
            return 0.0
        return 1.0 - float(self._acc.diagonal().sum()) / (self.tokens * self._acc.shape[0])


def excess(counts: torch.Tensor, tokens: int) -> torch.Tensor:
    """Co-activation above what independent firing would give: max(0, C_ij - C_ii C_jj / N)."""
    fired = counts.diagonal().double()
    return (counts.double() - torch.outer(fired, fired) / max(tokens, 1)).clamp(min=0).float()
