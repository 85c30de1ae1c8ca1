"""shvit_tiny's CPU fast path (shvit_tiny/fast/) as code: its kernels' C source, its register
tiles, the scoped vector pass, and that importing the package or leaving the fast path changes
nothing in tinygrad. (Its answers against torch and against the reference path: tests/test_tiny.py
and the equivalence suite.) The kernel sources come from subprocesses with DEBUG=4, so this module
needs no compiled model and runs beside the tiny group.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from shvit_tiny.fast.target import compile_context, compile_workers, has_avx512

pytestmark = pytest.mark.xdist_group("fast-kernels")

KERNEL_SCRIPT = """
import contextlib, sys
import numpy as np
from tinygrad import Tensor
from shvit_tiny.fast.kernels import depthwise_kernel
from shvit_tiny.fast.lower import product, window_kernel
from shvit_tiny.fast.pack import pack_columns, padded_columns
from shvit_tiny.fast.target import compile_context
rng = np.random.default_rng(0)
T = lambda a: Tensor(np.ascontiguousarray(a), device="CPU")
with compile_context("CPU", 1) if sys.argv[1] == "fast" else contextlib.nullcontext():  # one core: unsplit tiles
    for m, k, n in ((64, 24, 32), (9, 5, 12), (24, 16, 40), (24, 20, 44), (49, 24, 32)):
        a, w, b, r = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,), (m, n)))
        bias = np.pad(b, (0, padded_columns(n) - n))  # as pack.kernel_weights pads a product's bias
        out = product(T(a), T(pack_columns(w)), T(bias), n, relu=True, residual=T(r)).numpy()
        np.testing.assert_allclose(out, np.maximum(a @ w + b, 0) + r, rtol=1e-5, atol=1e-5)
    x, wt = rng.standard_normal((1, 6, 6, 12)).astype(np.float32), rng.standard_normal((9, 12)).astype(np.float32)
    out = window_kernel(depthwise_kernel, T(x), T(wt), T(np.zeros(12, np.float32)), 12, 3, 1, 1, False).numpy()  # 4-float tiles
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(xp[:, i:i + 6, j:j + 6] * wt[3 * i + j] for i in range(3) for j in range(3))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
print("VALUES OK")
"""


def kernel_sources(parallel: str, context: str, dev: str | None = None) -> dict[str, str]:
    """The C tinygrad lowers kernels.py's UOp kernels to (SHVIT_C_KERNELS=0: csource.py's own C is
    checked against them below), by kernel name."""
    env = {k: v for k, v in os.environ.items() if k != "DEV"} | {"DEBUG": "4", "PARALLEL": parallel, "SHVIT_C_KERNELS": "0"}
    env |= {"DEV": dev} if dev else {}
    out = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT, context], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "VALUES OK" in out.stdout, out.stderr[-2000:]
    return dict(re.findall(r"void (\w+)\((.*?)\n}", out.stdout, re.S))  # kernel name -> its C


AVX2 = "CPU:CLANG:x86_64,x86-64-v3"  # compiled for an AVX2 CPU (16 registers of 8 floats); runs on any newer x86


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["0", "2"])
def test_fast_kernels_use_eight_float_vectors_and_give_exact_values(parallel):
    """fast/wide_vectors.py widens the kernels' 4-float accesses to 8 (2x the products' speed on
    AVX2), in this process (PARALLEL=0) and in tinygrad's spawned compile workers (PARALLEL=2),
    and the values are right. 44 output columns are computed as 48 (pack.padded_columns); a
    depthwise kernel over 12 channels, not a multiple of 8, keeps 4-float vectors."""
    sources = kernel_sources(parallel, "fast", AVX2)
    assert "float8" in sources["gemm_64_32_24"], "the 64x32 product was not widened"
    assert "float8" in sources["gemm_24_40_16"], "the 24x40 product was not widened"
    assert "float8" in sources["gemm_24_48_20"], "the 24x44 product (padded to 48) was not widened"
    assert "float8" not in sources["dw3s1_6_6_12"] and "float4" in sources["dw3s1_6_6_12"]


@pytest.mark.slow
def test_outside_the_fast_path_tinygrad_compiles_as_shipped():
    """The same kernels compiled outside compile_context: tinygrad's own 4-float vectors (the pass
    is active only while the fast path compiles), and still the same values."""
    sources = kernel_sources("0", "plain", AVX2)
    assert "float4" in sources["gemm_64_32_24"]
    assert not any("float8" in src or "float16" in src for src in sources.values())


@pytest.mark.slow
@pytest.mark.skipif(not has_avx512(), reason="16-float vectors are asked for on AVX-512 CPUs only")
def test_avx512_compiles_use_sixteen_float_vectors():
    """On an AVX-512 CPU, compile_context asks clang for 512-bit vectors and the products get
    16-float accesses where the width allows; the values stay exact."""
    sources = kernel_sources("2", "fast")
    assert "float16" in sources["gemm_56_32_24"]  # 16-column tiles (64 rows: 56 in 14-row tiles, then 8)
    assert "float8" in sources["gemm_24_40_16"] and "float16" not in sources["gemm_24_40_16"]  # 40 = 5 x 8
    assert "float16" in sources["gemm_24_48_20"]  # 44 padded to 48 = 3 x 16
    assert "float8" not in sources["dw3s1_6_6_12"]


def row_tile_of(source: str, rows: int) -> int:
    """A product kernel's register-tile rows: its row loop runs rows / tile times."""
    return rows // int(re.search(r"for \(int Lidx0 = 0; Lidx0 < (\d+);", source)[1])


@pytest.mark.slow
@pytest.mark.parametrize("dev, tiles, parts, widest", [
    (AVX2, {"gemm_64_32_24": (64, 4), "gemm_49_32_24": (49, 7)}, (), "float8"),  # 4 x 16 tiles, 7 x 8 for 49 rows
    pytest.param(None, {"gemm_56_32_24": (56, 14), "gemm_42_32_24": (42, 14)}, ("gemm_8_32_24_at56", "gemm_7_32_24_at42"),
                 "float16", marks=pytest.mark.skipif(not has_avx512(), reason="this CPU has no AVX-512")),
])
def test_register_tiles_follow_the_target_cpu(dev, tiles, parts, widest):
    """The kernels are tiled for the CPU clang compiles for: DEV's (x86-64-v3 = AVX2, checked here
    on whichever CPU this is) or this machine's. AVX2: 64 rows in 4-row tiles, 49 (a 7x7 map at
    batch 1) in 7-row ones. AVX-512: 14-row tiles, the rows 14 does not divide in a kernel of their
    own (kernels.row_parts: 64 = 56 + 8, 49 = 42 + 7); the values are checked in KERNEL_SCRIPT."""
    sources = kernel_sources("0", "fast", dev)
    for name, (rows, tile) in tiles.items():
        assert row_tile_of(sources[name], rows) == tile, name
        assert widest in sources[name] and (widest == "float16" or "float16" not in sources[name]), name
    assert all(name in sources for name in parts), sorted(sources)


IMPORT_SCRIPT = """
import tinygrad.codegen as codegen
import tinygrad.codegen.opt.heuristic as heuristic
from tinygrad.engine import worker
hooked = lambda: (codegen.memory_coalescing, heuristic.hand_coded_optimizations, worker._init_worker)
before = hooked()
import shvit_tiny, shvit_tiny.fast, shvit_tiny.fast.runner, shvit_tiny.fast.hooks
assert hooked() == before, "importing shvit_tiny changed tinygrad"
from shvit_tiny.fast.target import compile_context
with compile_context("CPU", 2):
    assert all(now is not then for now, then in zip(hooked(), before))
    with compile_context("CPU"):  # nested: still on
        assert getattr(codegen.memory_coalescing, "shvit_wide", False)
    assert getattr(codegen.memory_coalescing, "shvit_wide", False) and getattr(heuristic.hand_coded_optimizations, "shvit_split", False)
assert hooked() == before, "leaving the fast path left tinygrad changed"
print("UNTOUCHED")
"""


def test_import_and_the_fast_path_leave_tinygrad_untouched():
    """`import shvit_tiny` replaces nothing in tinygrad; the vector pass is in place only inside
    compile_context (nestable) and tinygrad's own functions are back after it."""
    out = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0 and "UNTOUCHED" in out.stdout, out.stderr[-2000:]


def test_another_tinygrad_runs_the_reference_path_and_says_so_once(monkeypatch, capsys):
    """With a tinygrad other than the pinned one, nothing of the fast path runs (no kernels, no
    replay, no vector pass) and one line on stderr says why."""
    import shvit_tiny.fast as fast
    from shvit_tiny.fast import hooks, replay

    monkeypatch.setattr(fast, "tinygrad_version", lambda: "0.99.0")
    monkeypatch.setattr(fast, "_SAID", set())

    class Model:
        use_fast = True

    assert not fast.applies(Model()) and not fast.applies(Model())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tinygrad 0.99.0 is not the pinned 0.14.0" in err[0] and "fast path is off" in err[0], err
    assert replay.cpu_replay(object(), "CPU", (1, 3, 8, 8), None) is None
    with hooks.active() as on:
        assert on is False
    monkeypatch.setattr(fast, "tinygrad_version", lambda: fast.PINNED)
    monkeypatch.setenv("SHVIT_FAST", "0")
    assert not fast.applies(Model())
    monkeypatch.delenv("SHVIT_FAST")
    assert fast.applies(Model()) and not fast.applies(type("Off", (), {"use_fast": False})())


def test_compile_context_leaves_other_devices_and_your_dev_alone(monkeypatch):
    from tinygrad.helpers import DEV, Target

    monkeypatch.setenv("PARALLEL", "2")  # a PARALLEL of yours is left alone too
    before = [repr(t) for t in DEV.value]
    with compile_context("CL"):
        assert [repr(t) for t in DEV.value] == before
    monkeypatch.setattr(DEV, "_value", [Target("CPU", "CLANG", "x86_64,native")])
    with compile_context("CPU"):  # a renderer/arch you chose
        assert [repr(t) for t in DEV.value] == ["CPU:CLANG:x86_64,native"]
    monkeypatch.setattr(DEV, "_value", [Target("METAL")])
    if has_avx512():
        with compile_context("CPU"):
            assert [repr(t) for t in DEV.value] == ["CPU:CLANG:x86_64,native,prefer-vector-width=512", "METAL"]
    assert [repr(t) for t in DEV.value] == ["METAL"]


def test_no_compile_pool_of_one(monkeypatch):
    """With one core to use, tinygrad lowers in this process instead of a one-worker pool."""
    from tinygrad.helpers import PARALLEL

    monkeypatch.delenv("PARALLEL", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert compile_workers() == 0
    with compile_context("CL"):
        assert PARALLEL.value == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(PARALLEL, "value", 8)
    assert compile_workers() is None  # cores to spare: tinygrad's pool as it is
    monkeypatch.setenv("PARALLEL", "1")
    assert compile_workers() is None  # yours


# ---- csource.py: the kernels written as C, against kernels.py lowered by tinygrad ------------------

def twin_cases(rng):
    """One call per branch of csource.py (name, function of nothing -> the output Tensor): products
    8 x 32 tiles, 16 rows, 7 rows, 96 rows (weights not prefetched), the 14-row part and the rest (AVX-512: 64 = 56 + 8, 49 = 42 + 7, 32 = 28 + 4), a residual with padded columns (with and without ReLU),
    columns outside rows, 4-float and scalar tiles; attention's sum with values at an unaligned
    offset; dense convolutions channels-first with a frame out, framed in, zero-padded at stride 1
    and 2 with 3-float-vector tiles; depthwise 16- and 4-channel tiles at stride 1 and 2."""
    from tinygrad import Tensor

    from shvit_tiny.fast import csource
    from shvit_tiny.fast.kernels import attend_kernel, conv_kernel, depthwise_kernel
    from shvit_tiny.fast.lower import product, window_kernel
    from shvit_tiny.fast.pack import pack_columns, padded_columns

    def arrays(*shapes):  # drawn once per case: both runs read the same inputs
        return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]

    def T(a):
        return Tensor(a, device="CPU")

    def gemm(m, k, n, relu, residual):
        x, w, b, r = arrays((m, k), (k, n), (n,), (m, n))
        b, w = np.pad(b, (0, padded_columns(n) - n)), pack_columns(w)
        return lambda: product(T(x), T(w), T(b), n, relu, T(r) if residual else None)

    def attend(bt, n, qk, p):
        a, qkv = arrays((bt, n, n), (bt, n, 2 * qk + p))

        def run():
            out = Tensor.empty(bt, n, p, device="CPU")
            return out.custom_kernel(T(a), T(qkv), fxn=csource.fxn(attend_kernel, offset=2 * qk))[0]
        return run

    def conv(x_shape, c, n, stride, **layout):
        x, w, b = arrays(x_shape, (9 * c, n), (n,))
        return lambda: window_kernel(conv_kernel, T(x), T(w), T(b), n, 3, stride, 1, True, **layout)

    def depthwise(h, c, stride):
        x, w, b = arrays((2, h, h, c), (9, c), (c,))
        return lambda: window_kernel(depthwise_kernel, T(x), T(w), T(b), c, 3, stride, 1, True)

    return [("gemm 64 rows, relu + residual, split by rows", gemm(64, 64, 64, True, True)),
            ("gemm 96 rows, weights not prefetched", gemm(96, 24, 32, False, True)),
            ("gemm 16 rows", gemm(16, 40, 64, False, False)),
            ("gemm 49 rows, 44 columns padded, residual", gemm(49, 20, 44, False, True)),
            ("gemm 24 rows, 44 columns padded, relu + residual", gemm(24, 20, 44, True, True)),
            ("gemm columns outside rows, split by columns", gemm(32, 288, 1024, True, False)),
            ("gemm 12 columns (4-float tiles)", gemm(9, 5, 12, False, True)),
            ("gemm 6 columns (scalar tiles)", gemm(8, 5, 6, True, False)),
            ("attention's sum, unaligned values, split by images", attend(16, 16, 4, 20)),
            ("conv channels-first, frame out, split by images", conv((4, 3, 32, 32), 3, 16, 2, channels_first=True, framed_out=True)),
            ("conv framed in", conv((2, 10, 10, 16), 16, 32, 2, framed_in=True)),
            ("conv zero-padded, stride 1, 48 channels", conv((2, 8, 8, 8), 8, 48, 1)),
            ("depthwise 32 channels, split by rows", depthwise(16, 32, 1)),
            ("depthwise 12 channels, stride 2", depthwise(7, 12, 2))]


def test_c_kernels_answer_bit_for_bit_as_tinygrad_lowers_the_uop_kernels(monkeypatch):
    """csource.py's C (the default where clang compiles the CPU device) and kernels.py's UOp
    kernels lowered by tinygrad (the reference: SHVIT_C_KERNELS=0) give the same bits for every
    kernel kind, compiled for two cores: the larger ones split into slices, the smaller whole.
    And the C is what ran."""
    from tinygrad.uop.ops import Ops

    from shvit_tiny.fast import csource

    slices, prefetched = [], []
    for name, run in twin_cases(np.random.default_rng(0)):
        answers = []
        for flag in ("1", "0"):
            monkeypatch.setenv("SHVIT_C_KERNELS", flag)
            with compile_context("CPU", 2):
                assert csource.applies() == (flag == "1")
                out = run()
                if flag == "1":  # csource's PROGRAM (with its C SOURCE) is in the graph, not a SINK to lower
                    programs = [u for u in out.uop.toposort() if u.op is Ops.PROGRAM]
                    slices += [u.arg.global_size[0] for u in programs]
                    prefetched += [(u.arg.name, "__builtin_prefetch" in u.src[2].arg) for u in programs if u.arg.name.startswith("gemm")]
                answers.append(out.numpy())
        np.testing.assert_array_equal(answers[0], answers[1], err_msg=name)
    assert len(slices) >= 14 and 1 in slices and 8 in slices and 2 in slices, slices
    # the weights are prefetched where a product has few rows (kernels.weight_prefetch), not elsewhere
    assert all(hint == (int(name.split("_")[1]) <= 64) for name, hint in prefetched) and len(prefetched) > 8, prefetched
