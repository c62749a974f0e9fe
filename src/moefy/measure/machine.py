"""What machine a measurement was taken on: CPU model, the instruction sets that decide kernel
speed, torch's kernel level, the device. Written beside timings and precision choices, because the
same study gives other speeds (and, in bf16, other numbers) on another CPU."""

from __future__ import annotations

import os
import platform
from functools import cache
from pathlib import Path

import torch

# The flags that change which kernels are fast: bf16 and int8 dot products, AMX tiles, AVX-512.
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    path = Path("/proc/cpuinfo")
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    return model, flags


def describe(device: torch.device | str = "cpu") -> dict:
    model, flags = _cpuinfo()
    device = torch.device(device)
    return {
        "cpu": model,
        "cpu_flags": [flag for flag in FLAGS_OF_INTEREST if flag in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
