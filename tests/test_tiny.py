"""shvit_tiny against the PyTorch reference (eval mode, random weights and BatchNorm statistics)
on tinygrad's CPU (clang) and CL (PoCL) devices; its JIT, folding, float16 and Tensor paths;
its CLI's device errors and bad inputs.

Compiling kernels dominates the cost (a new input shape or model means new kernels), so the
model is loaded once per module, most tests share one odd, non-square input shape, and all of
them run in one xdist worker (one process: compiled kernels are reused across tests).
"""
import contextlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from tinygrad import Tensor

import shvit_tiny
import shvit_torch
from shvit_numpy.config import SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_tiny import run
from shvit_tiny.devices import available_devices, cl_is_cpu, compile_context, has_avx512, resolve_device
from tests.helpers import TOL, assert_close, random_model_file, randomize

pytestmark = pytest.mark.xdist_group("tiny")

# Every block type, channel counts that are not multiples of the CPU kernels' 16-wide tile
# (qkv gives 2*16 + pdim = 36, 40, 44 channels), and a distillation head.
SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), num_classes=7, distillation=True)
X = np.random.default_rng(0).standard_normal((2, 3, 45, 38)).astype(np.float32)  # odd, non-square

# --half against float32 torch: tests.helpers.TOL["float16"] (1e-2). float16 keeps 11 significant
# bits (relative step 1e-3) and the error grows over the ~25 layers; measured max |error| /
# (1 + |logit|): 4e-4 on SMALL here and 3.6e-3 on s1 at 64x96 (random weights): a ~3x margin.
HALF_TOL = TOL["float16"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "small.safetensors"
    return random_model_file(SMALL, 21, path), path


@pytest.fixture(scope="module")
def tiny_cpu(small):
    return shvit_tiny.load(small[1], device="CPU")


@pytest.fixture(scope="module")
def ref(small):
    return torch_logits(small[0], X)


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_matches_torch_on_cpu(tiny_cpu, ref):
    assert tiny_cpu.device == "CPU" and tiny_cpu.config == SMALL
    assert_close("tiny CPU logits (distilled: mean of both heads)", tiny_cpu(X), ref, dtype=np.float32)


def test_matches_torch_on_cl(small, ref):
    cl = shvit_tiny.load(small[1], device="CL")
    for call in range(2):  # the second call is TinyJit's replay: replay.py's flat calls are for the CPU device only
        assert_close(f"tiny CL logits, call {call}", cl(X), ref, dtype=np.float32)
    assert cl._replays == {X.shape: None}


def test_jit_replay_equals_no_jit_and_unfolded(small, tiny_cpu, ref):
    calls = [tiny_cpu(X) for _ in range(3)]  # compiles, then TinyJit captures, then replays
    jit = tiny_cpu._jits[(X.shape, tiny_cpu.dtype, "CPU")]
    assert len(tiny_cpu._jits) == 1 and jit.captured is not None
    no_jit = tiny_cpu(X, jit=False)
    for i, y in enumerate(calls):
        np.testing.assert_array_equal(y, no_jit, err_msg=f"call {i} (JIT) differs from the lazy graph")
    unfolded = shvit_tiny.load(small[1], device="CPU", fold=False)
    assert hasattr(unfolded.stages[0].blocks[0].conv.m, "bn")  # really unfolded: BatchNorm kept
    assert_close("unfolded", unfolded(X, jit=False), ref)
    assert_close("folded vs unfolded", no_jit, unfolded(X, jit=False))


def test_cpu_replay_is_the_jits_own_answer(tiny_cpu, monkeypatch):
    """replay.py: from a shape's second call on, numpy batches on the CPU device run the capture as
    flat C calls; bit for bit TinyJit's replay, for new inputs (not the last output again)."""
    from shvit_tiny.replay import CpuReplay, cpu_replay

    tiny_cpu(X)
    replay = tiny_cpu._replays[X.shape]
    assert isinstance(replay, CpuReplay) and len(replay.calls) > 20
    jit = tiny_cpu._jits[(X.shape, tiny_cpu.dtype, "CPU")]
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal(X.shape).astype(np.float32)
        y = tiny_cpu(x)
        np.testing.assert_array_equal(y, jit(Tensor(x, device="CPU").realize()).numpy(), err_msg=f"seed {seed}")
        assert not np.array_equal(y, tiny_cpu(X))
    monkeypatch.setenv("SHVIT_REPLAY", "0")
    assert cpu_replay(jit, "CPU", X.shape, tiny_cpu.dtype) is None


def test_product_weights_are_packed_on_the_cpu_only(tiny_cpu, small):
    """load() lays out each 1x1 convolution's and the head's weight on the host, packed for the CPU
    product kernel (layers.pack_columns); the host's packing is the device's own, and the dense 3x3
    stem and other devices keep plain (K, N) matrices."""
    from shvit_tiny.layers import pack_columns

    ffn = tiny_cpu.stages[0].blocks[0].ffn.m.pw1  # folded: ConvBN -> Conv2d
    for name, layer in (("FFN pw1", ffn), ("head", tiny_cpu.head)):
        assert layer.w_mat.ndim == 3, name
        np.testing.assert_array_equal(layer.w_mat.numpy(), pack_columns(layer.matrix() if name != "head" else layer.weight.T).numpy(),
                                      err_msg=name)
    assert tiny_cpu.patch_embed[0].w_mat.ndim == 2
    cl = shvit_tiny.load(small[1], device="CL")
    assert cl.stages[0].blocks[0].ffn.m.pw1.w_mat.ndim == 2 and cl.head.w_mat.ndim == 2


def test_odd_batch_and_shape(small, tiny_cpu):
    """Batch 1 and 33 x 70: row counts of the CPU products (15, 6, 2 pixels) that no tile divides."""
    x = np.random.default_rng(1).standard_normal((1, 3, 33, 70)).astype(np.float32)
    assert_close("1 x 3 x 33 x 70", tiny_cpu(x), torch_logits(small[0], x))


def test_tensor_in_tensor_out(tiny_cpu, ref):
    y = tiny_cpu(Tensor(X, device="CPU"))
    assert isinstance(y, Tensor) and y.shape == (2, 7)
    assert_close("tensor path", y.numpy(), ref)


def test_forward_intermediates_match_torch(small, tiny_cpu):
    with torch.no_grad():
        want = [t.numpy() for t in small[0].forward_intermediates(torch.from_numpy(X))]
    got = [t.numpy() for t in tiny_cpu.forward_intermediates(Tensor(X, device="CPU"))]
    assert [g.shape for g in got] == [w.shape for w in want] == [(2, 16, 3, 3), (2, 24, 2, 2), (2, 40, 1, 1)]
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"stage {i + 1} output", g, w)


def test_s1_once(tmp_path):
    model = shvit_torch.create("s1").eval()
    randomize(model, seed=22)
    shvit_torch.save(model, tmp_path / "s1.safetensors")
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 96)).astype(np.float32)  # 64 x 96 keeps compiling cheap
    tiny = shvit_tiny.load(tmp_path / "s1.safetensors", device="CPU")
    assert tiny.config.num_classes == 1000 and tiny.head_dist is None
    assert_close("tiny s1", tiny(x), torch_logits(model, x))


def test_half_agrees_on_top1_within_bound(small, ref):
    y = shvit_tiny.load(small[1], device="CPU", half=True)(X)
    assert y.dtype == np.float32  # logits come back in float32
    assert (y.argmax(1) == ref.argmax(1)).all()
    assert_close("tiny --half logits", y, ref, **HALF_TOL)
    assert np.abs(y - ref).max() > 1e-6  # it really ran in float16


@pytest.mark.parametrize("x,match", [
    (np.zeros((3, 32, 32), np.float32), "rank 3"), (np.zeros((1, 4, 32, 32), np.float32), "4 channels"),
    (np.zeros((1, 3, 32, 32), np.float64), "dtype float64"), (np.full((1, 3, 8, 8), np.inf, np.float32), "infinite"),
])
def test_bad_input_raises_library_error(tiny_cpu, x, match):
    with pytest.raises(ShvitError, match=match):
        tiny_cpu(x)


def test_default_device_prefers_cpu_to_a_cpu_opencl():
    works = available_devices()
    assert "CPU" in works and resolve_device(None) == works[0]
    if "CL" in works and cl_is_cpu():  # PoCL here: tinygrad's own order would pick it first
        assert works.index("CPU") < works.index("CL")
    assert resolve_device("clang") == "CPU" and resolve_device("cl") == "CL"


def test_cli_runs_and_saves_logits(small, ref, tmp_path, capsys):
    """In this process, so the kernels compiled above are reused (the error cases below run the
    real command)."""
    np.save(tmp_path / "x.npy", X)
    code = run.main(["--weights", str(small[1]), "--input", str(tmp_path / "x.npy"), "--device", "cpu",
                     "--save-logits", str(tmp_path / "y.npy"), "--bench", "2", "--topk", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert_close("cli logits", np.load(tmp_path / "y.npy"), ref)
    assert "images/s" in err and "first call" in err and "CPU float32 batch 2" in err
    assert len(out.strip().splitlines()) == 2  # one line per image


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "shvit_tiny.run", *map(str, args)], capture_output=True, text=True, env=env)


def assert_one_line_error(r, match):
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("args,match", [
    (["--device", "METAL"], "device METAL is not available on this machine; available: CPU"),
    (["--device", "quantum"], "unknown device 'quantum'"), (["--bench", "-1"], "--bench and --beam take a count >= 0"),
])
def test_cli_device_and_flag_errors(small, tmp_path, args, match):
    np.save(tmp_path / "x.npy", X)
    assert_one_line_error(run_cli("--weights", small[1], "--input", tmp_path / "x.npy", *args), match)


def test_cli_without_clang_says_how_to_install_it(small, tmp_path):
    np.save(tmp_path / "x.npy", X)
    env = {**os.environ, "PATH": str(tmp_path)}  # no clang on this PATH
    env.pop("CC", None)
    r = run_cli("--weights", small[1], "--input", tmp_path / "x.npy", "--device", "CPU", env=env)
    assert_one_line_error(r, "apt-get install clang")


def test_cli_bad_weights_file(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    np.save(tmp_path / "x.npy", X)
    r = run_cli("--weights", tmp_path / "w.safetensors", "--input", tmp_path / "x.npy", "--device", "CPU")
    assert_one_line_error(r, "not a valid safetensors file")


def test_cli_bad_input_array(small, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 4, 16, 16), np.float32))
    r = run_cli("--weights", small[1], "--input", tmp_path / "x.npy", "--device", "CPU")
    assert_one_line_error(r, "4 channels")


WIDE_SCRIPT = """
import contextlib, sys
import numpy as np
from tinygrad import Tensor
import shvit_tiny
from shvit_tiny.devices import compile_context
from shvit_tiny.layers import conv_depthwise, matmul_bias
rng = np.random.default_rng(0)
with compile_context("CPU") if sys.argv[1] == "wide" else contextlib.nullcontext():
    for m, k, n in ((64, 24, 32), (9, 5, 12), (24, 16, 40), (24, 20, 44), (49, 24, 32)):
        a, w, b, r = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n), (n,), (m, n)))
        out = matmul_bias(*(Tensor(t, device="CPU") for t in (a, w, b)), relu=True, residual=Tensor(r, device="CPU")).numpy()
        np.testing.assert_allclose(out, np.maximum(a @ w + b, 0) + r, rtol=1e-5, atol=1e-5)
    x, wt = rng.standard_normal((1, 6, 6, 12)).astype(np.float32), rng.standard_normal((9, 12)).astype(np.float32)
    out = conv_depthwise(Tensor(x, device="CPU"), Tensor(wt, device="CPU"), None, 3, 1, 1).numpy()  # 12 channels: 4-float tiles
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = sum(xp[:, i:i + 6, j:j + 6] * wt[3 * i + j] for i in range(3) for j in range(3))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
print("VALUES OK")
"""


def kernel_sources(parallel: str, context: str, dev: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DEV"} | {"DEBUG": "4", "PARALLEL": parallel} | ({"DEV": dev} if dev else {})
    out = subprocess.run([sys.executable, "-c", WIDE_SCRIPT, context], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "VALUES OK" in out.stdout, out.stderr[-2000:]
    return dict(re.findall(r"void (\w+)\((.*?)\n}", out.stdout, re.S))  # kernel name -> its C


@pytest.mark.parametrize("parallel", ["0", "2"])
def test_cpu_kernels_use_eight_float_vectors(parallel):
    """shvit_tiny.wide_vectors widens the CPU kernels' 4-float accesses to 8 (2x the products'
    speed on AVX2/AVX-512), in this process (PARALLEL=0) and in tinygrad's spawned compile
    workers (PARALLEL=2), and the values stay exact. 44 output columns are computed as 48
    (layers.padded_columns); a depthwise kernel over 12 channels, not a multiple of 8, keeps
    4-float vectors."""
    sources = kernel_sources(parallel, "plain")
    assert "float8" in sources["gemm_64_32_24"], "the 64x32 product was not widened"
    assert "float8" in sources["gemm_24_40_16"], "the 24x40 product was not widened"
    assert "float8" in sources["gemm_24_48_20"], "the 24x44 product (padded to 48) was not widened"
    assert "float8" not in sources["dw3s1_6_6_12"] and "float4" in sources["dw3s1_6_6_12"]


@pytest.mark.skipif(not has_avx512(), reason="16-float vectors are asked for on AVX-512 CPUs only")
def test_avx512_compiles_use_sixteen_float_vectors():
    """Under compile_context (the model's JIT compiles in it), clang is asked for 512-bit vectors
    and the products get 16-float accesses where the width allows; the values stay exact."""
    sources = kernel_sources("2", "wide")
    assert "float16" in sources["gemm_64_32_24"]  # 16-column tiles
    assert "float8" in sources["gemm_24_40_16"] and "float16" not in sources["gemm_24_40_16"]  # 40 = 5 x 8
    assert "float16" in sources["gemm_24_48_20"]  # 44 padded to 48 = 3 x 16
    assert "float8" not in sources["dw3s1_6_6_12"]


def row_tile_of(source: str, rows: int) -> int:
    """A product kernel's register-tile rows: its row loop runs rows / tile times."""
    return rows // int(re.search(r"for \(int Lidx0 = 0; Lidx0 < (\d+);", source)[1])


@pytest.mark.parametrize("dev, rows, rows_49, widest", [
    ("CPU:CLANG:x86_64,x86-64-v3", 4, 7, "float8"),  # an AVX2 CPU (16 registers of 8 floats): 4 x 16 tiles, 7 x 8 for 49 rows
    pytest.param(None, 8, 7, "float16", marks=pytest.mark.skipif(not has_avx512(), reason="this CPU has no AVX-512")),
])
def test_register_tiles_follow_the_target_cpu(dev, rows, rows_49, widest):
    """The CPU kernels are tiled for the CPU clang compiles for: DEV's (x86-64-v3 = AVX2, checked
    here on whichever CPU this is: its code runs on any AVX-512 CPU too) or this machine's; 49
    rows (a 7x7 map at batch 1) get 7-row tiles, not 1."""
    sources = kernel_sources("0", "wide", dev)
    gemm, gemm_49 = sources["gemm_64_32_24"], sources["gemm_49_32_24"]
    assert row_tile_of(gemm, 64) == rows and row_tile_of(gemm_49, 49) == rows_49
    assert widest in gemm and (widest == "float16" or "float16" not in gemm)
    assert widest in gemm_49 and (widest == "float16" or "float16" not in gemm_49)


def test_compile_context_leaves_other_devices_and_your_dev_alone(monkeypatch):
    from tinygrad.helpers import DEV, Target

    monkeypatch.setenv("PARALLEL", "2")  # a PARALLEL of yours is left alone too: nothing else to set
    assert isinstance(compile_context("CL"), contextlib.nullcontext)
    monkeypatch.setattr(DEV, "_value", [Target("CPU", "CLANG", "x86_64,native")])
    assert isinstance(compile_context("CPU"), contextlib.nullcontext)  # a renderer/arch you chose
    monkeypatch.setattr(DEV, "_value", [Target("METAL")])
    if has_avx512():
        with compile_context("CPU"):
            assert [repr(t) for t in DEV.value] == ["CPU:CLANG:x86_64,native,prefer-vector-width=512", "METAL"]
    assert [repr(t) for t in DEV.value] == ["METAL"]


def test_no_compile_pool_of_one(monkeypatch):
    """With one core to use, tinygrad lowers in this process instead of a one-worker pool."""
    from tinygrad.helpers import PARALLEL

    from shvit_tiny.devices import compile_workers

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
