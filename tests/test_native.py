"""The compiled looped kernel (moefy.native): the same outputs as the Python loop, used where it
applies, and the Python loop wherever it does not or cannot be built."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.activations import GELUActivation

from moefy import native
from moefy.adapters.ffn import FFN
from moefy.conversion.routers import MLPRouter
from moefy.moe import layer as moe_module
from moefy.moe.layer import MoEFFN

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernel():
    """The built kernel; without a compiler it is skipped, except where MOEFY_REQUIRE_NATIVE is set
    (CI), whose machines have one: there a failed build fails."""
    built = native.looped_kernel()
    if built is None:
        message = f"the native looped kernel did not build: {native.implementation(CPU)}"
        if os.environ.get("MOEFY_REQUIRE_NATIVE"):
            pytest.fail(message)
        pytest.skip(message)
    return built


def layer(gated: bool, bias: bool, act: nn.Module, d: int = 16, d_ff: int = 96, experts: int = 12, d_out: int | None = None):
    torch.manual_seed(1)
    ffn = FFN(
        0,
        nn.Linear(d, d_ff, bias=bias),
        act,
        nn.Linear(d_ff, d_out or d, bias=bias),
        lambda m: None,
        w_gate=nn.Linear(d, d_ff, bias=bias) if gated else None,
    )
    labels = torch.randperm(d_ff, generator=torch.Generator().manual_seed(2)) % experts
    return MoEFFN(ffn, labels, MLPRouter(d, experts), experts)


def python_loop(moe: MoEFFN, x, picked, h=None, gates=None):
    out = x.new_zeros(x.shape[0], moe.d_out) if moe.b_out is None else moe.b_out.expand(x.shape[0], -1).clone()
    return moe._looped_python(x, picked, h, out, gates)


@pytest.mark.parametrize(
    "gated,bias,act,d_out",
    [
        (True, False, nn.SiLU(), None),
        (False, True, nn.GELU(), None),
        (True, True, nn.ReLU(), None),
        (False, True, nn.GELU(approximate="tanh"), None),
        (False, True, nn.ReLU(), 8),  # a distilled projection narrower than its input
    ],
)
@pytest.mark.parametrize("share", [0.3, 1.01])  # popular experts computed for every token, or none
@pytest.mark.parametrize("oracle", [False, True])
@pytest.mark.parametrize("weighed", [False, True])  # softmax-gated picks, each output scaled by its gate
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_kernel_gives_the_python_loops_outputs(
    kernel, gated, bias, act, d_out, share, oracle, weighed, dtype, monkeypatch
):
    """float32 to 1e-6; bfloat16 to 2e-2 (outputs of magnitude ~1; the same ops as the Python loop but
    the scatter-add, which rounds each sum to bfloat16 in either, in another order where tokens share rows)."""
    moe = layer(gated, bias, act, d_out=d_out).to(dtype)
    monkeypatch.setattr(moe_module, "LOOPED_DENSE_SHARE", share)
    monkeypatch.setattr(moe_module, "NATIVE_BLOCK_TOKENS", 16)  # 40 tokens: blocks of 16, 16 and 8
    calls = []
    monkeypatch.setattr(moe_module.native, "looped_kernel", lambda: calls.append(1) or kernel)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tokens in (1, 5, 40):
            x = torch.randn(tokens, 16, generator=generator).to(dtype)
            picked = torch.rand(tokens, 12, generator=generator) < 0.4  # also tokens with no expert
            gates = (picked * torch.rand(tokens, 12, generator=generator) * 3).to(dtype) if weighed else None
            h = moe.dense_activations(x) if oracle else None
            expected = python_loop(moe, x, picked, None if h is None else h.clone(), gates)
            got = moe.experts_forward(x, picked if gates is None else gates, kernel="looped", h=h)
            assert got.dtype == dtype
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-2)
    assert len(calls) == 3


def test_the_threads_share_out_the_blocks_with_the_same_outputs(kernel, monkeypatch):
    """Each thread takes whole blocks, its matmuls on one thread (splitting an expert's small matmuls
    over two threads made the loop twice as slow): a batch is cut into at least one block per thread."""
    moe = layer(False, True, nn.GELU())
    blocks = []

    class Spy:
        def looped(self, *args):
            blocks.append(args[11])
            return kernel.looped(*args)

    monkeypatch.setattr(moe_module.native, "looped_kernel", Spy)
    monkeypatch.setattr(moe_module, "LOOPED_DENSE_SHARE", 0.4)  # popular experts: out written by addmm_ too
    x, picked = torch.randn(64, 16), torch.rand(64, 12) < 0.5
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = moe.experts_forward(x, picked, kernel="looped")
            torch.set_num_threads(2)
            two = moe.experts_forward(x, picked, kernel="looped")
        with torch.inference_mode():  # the other thread writes the output made in this mode too
            inferred = moe.experts_forward(x, picked, kernel="looped")
    finally:
        torch.set_num_threads(threads)
    assert blocks == [64, 32, 32]
    torch.testing.assert_close(inferred, two, rtol=0, atol=0)
    assert kernel.parallel(), "built without OpenMP, at::parallel_for runs every block on one thread"
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)
    torch.testing.assert_close(one, python_loop(moe, x, picked), rtol=0, atol=1e-6)


@pytest.mark.parametrize("why", ["autograd", "float64", "activation"])
def test_the_python_loop_runs_where_the_native_kernel_does_not_apply(why, monkeypatch):
    act = nn.Tanh() if why == "activation" else nn.GELU()  # looped.cpp has no tanh
    moe = layer(False, True, act)
    monkeypatch.setattr(moe_module.native, "looped_kernel", lambda: pytest.fail("the native kernel was asked for"))
    x, picked = torch.randn(10, 16), torch.rand(10, 12) < 0.5
    if why == "float64":
        moe, x = moe.double(), x.double()
    if why == "autograd":
        x.requires_grad_()
    out = moe.experts_forward(x, picked, kernel="looped")
    if why == "autograd":
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_without_a_build_the_layers_run_the_python_loop_and_say_why(monkeypatch, capsys):
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failure", None)

    def no_compiler():
        raise RuntimeError("Error building extension 'moefy_looped'\nc++: command not found")

    monkeypatch.setattr(native, "_build", no_compiler)
    assert native.looped_kernel() is None
    assert native.implementation(CPU) == "python (RuntimeError: c++: command not found)"
    assert "could not be built (RuntimeError: c++: command not found)" in capsys.readouterr().err
    moe = layer(True, True, nn.ReLU())
    x, picked = torch.randn(30, 16), torch.rand(30, 12) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(moe.experts_forward(x, picked, kernel="looped"), python_loop(moe, x, picked), rtol=0, atol=0)


def test_on_another_device_the_python_loop_is_named_and_nothing_is_built(monkeypatch):
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("nothing should be built for a GPU"))
    assert native.implementation(torch.device("cuda")) == "python (the native kernel is for CPUs, this is cuda)"


def test_a_build_left_by_a_killed_process_does_not_block_the_next(tmp_path, monkeypatch):
    """torch's extension builder waits as long as its lock file exists; a process killed while
    building leaves it behind. Under moefy's own (OS) lock the stale file is removed first."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = native.cache_folder()
    assert folder.is_relative_to(tmp_path / "moefy" / "native")
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # what a killed build leaves
    built = object()

    def load(name, sources, build_directory, **kwargs):
        assert not (Path(build_directory) / "lock").exists(), "the stale lock would make torch wait forever"
        assert Path(build_directory) == folder and sources == [str(native.SOURCE)]
        return built

    monkeypatch.setattr(cpp_extension, "load", load)
    assert native._build() is built


def test_every_build_runs_this_pythons_ninja(tmp_path, monkeypatch):
    """Ninja 1.11 and 1.13 hash a build's command differently: processes finding different ninjas on
    PATH rebuilt each other's kernel. The build finds this Python's first; PATH is restored after."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    found = []

    def load(name, sources, build_directory, **kwargs):
        found.append(shutil.which("ninja"))
        return object()

    monkeypatch.setattr(cpp_extension, "load", load)
    native._build()
    assert found == [str(Path(sysconfig.get_path("scripts")) / "ninja")]
    assert os.environ["PATH"] == "/usr/bin:/bin"


def test_the_cache_folder_follows_the_source_so_an_edited_kernel_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = native.cache_folder()
    edited = tmp_path / "looped.cpp"
    edited.write_bytes(native.SOURCE.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(native, "SOURCE", edited)
    assert native.cache_folder() != before


def test_each_checkout_builds_its_own_kernel(tmp_path, monkeypatch):
    """The same source text in another checkout emits another build file (its path is in it):
    sharing a folder, the two would rebuild each other's kernel."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    here = native.cache_folder()
    other = tmp_path / "checkout" / "looped.cpp"
    other.parent.mkdir()
    other.write_bytes(native.SOURCE.read_bytes())
    monkeypatch.setattr(native, "SOURCE", other)
    assert native.cache_folder() != here


@pytest.mark.parametrize(
    "act,code",
    [
        (nn.ReLU(), 0),
        (nn.GELU(), 1),
        (GELUActivation(), 1),  # a Hugging Face class calling the same torch function
        (nn.GELU(approximate="tanh"), 2),
        (nn.SiLU(), 3),
        (nn.Tanh(), None),
        (nn.LeakyReLU(), None),
    ],
)
def test_activations_are_recognised_by_their_values(act, code):
    assert native.activation_code(act) == code
