"""The looped MoE kernel compiled to native code, built on this machine on first use.

The Python loop of moefy.moe.layer spends, around its matmuls, a few microseconds of dispatch per op and
expert and generic indexing code in each gather and scatter-add; at half the experts on a CPU that
overhead alone kept the MoE layer at about the dense FFN's speed. looped.cpp runs the same
algorithm in one call (see its header). It is compiled with torch's JIT extension builder (a C++
compiler, ninja and the Python headers: all there with a usual Python and build tools) into a
per-source folder of the user's cache, once per machine, under a lock so that parallel jobs build
it once. Where it cannot be built the layers run the Python loop, and `implementation` says why,
so the calibrate step's file and evaluate's records name the kernel that was measured.

A build is reused only by a process that would emit the same build: the folder is per source file
(its text and its path: two checkouts on one machine each build their own), and the build always
runs the ninja installed with this Python (its scripts folder first on PATH). Ninja releases hash
the build command differently (1.13 from PyPI, 1.11 from Debian), so processes finding different
ninjas on PATH (Snakemake puts the interpreter's folder first for its jobs, a plain shell may not)
each rebuilt the other's kernel, 30 s every time.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

SOURCE = Path(__file__).with_name("looped.cpp")
# Codes of the activations looped.cpp computes in place (its Activation enum).
ACTIVATIONS = {
    0: torch.relu,
    1: F.gelu,
    2: lambda t: F.gelu(t, approximate="tanh"),
    3: F.silu,
}

_module: ModuleType | None = None
_failure: str | None = None


def cache_folder() -> Path:
    """Where the compiled kernel lives: one folder per source file (text and path) and torch version."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moefy" / "native"
    identity = SOURCE.read_bytes() + str(SOURCE.resolve()).encode() + torch.__version__.encode() + sys.version.encode()
    digest = hashlib.sha1(identity).hexdigest()[:16]
    return root / digest


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    folder = cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "moefy.lock", "w") as lock:
        # An OS lock is released when its process dies; torch's own lock file is not, so one left by
        # a build that was killed would make every later build wait forever: while this lock is
        # held nobody else is building, and such a file is stale.
        fcntl.flock(lock, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        if not any(folder.glob("*.so")):
            print("moefy: compiling the native looped MoE kernel (once on this machine, about 30 s)", file=sys.stderr, flush=True)
        # at::parallel_for runs its range on torch's OpenMP threads only in code compiled with
        # OpenMP; without it, serially on one.
        openmp = ["-fopenmp"]
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), path])  # this Python's ninja
        try:
            return load(
                "moefy_looped",
                [str(SOURCE)],
                build_directory=str(folder),
                extra_cflags=["-O3", *openmp],
                extra_ldflags=openmp,
                verbose=False,
            )
        finally:
            os.environ["PATH"] = path


def looped_kernel() -> ModuleType | None:
    """The compiled kernel, built on the first call; None where it cannot be (see `implementation`)."""
    global _module, _failure
    if _module is None and _failure is None:
        try:
            _module = _build()
        except Exception as err:  # no compiler, no headers, a failed build: the Python loop runs instead
            lines = [line for line in str(err).splitlines() if line.strip()]
            _failure = f"{type(err).__name__}: {lines[-1] if lines else repr(err)}"
            print(
                f"moefy: the native looped kernel could not be built ({_failure}); the Python loop runs instead", file=sys.stderr
            )
    return _module


def implementation(device: torch.device) -> str:
    """The looped kernel that runs on `device`: 'native', or 'python (why)'. On a CPU it builds the
    native kernel if not yet tried; elsewhere it never runs, and nothing is built."""
    if device.type != "cpu":
        return f"python (the native kernel is for CPUs, this is {device.type})"
    return "native" if looped_kernel() is not None else f"python ({_failure})"


def activation_code(act: nn.Module) -> int | None:
    """The code of the activation looped.cpp computes exactly as `act` does, or None. Told by the
    values on a probe rather than by class, so that the activation classes of Hugging Face models
    that call the same torch function are recognised too."""
    probe = torch.linspace(-8, 8, 257)
    with torch.no_grad():
        try:
            values = act(probe)
        except Exception:  # noqa: BLE001 - an activation that cannot run on a CPU float tensor
            return None
        for code, reference in ACTIVATIONS.items():
            if torch.equal(values, reference(probe)):
                return code
    return None
