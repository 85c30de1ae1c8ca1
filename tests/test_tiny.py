"""shvit_tiny against the PyTorch reference (eval mode, random weights and BatchNorm statistics)
on tinygrad's CPU (clang) and CL (PoCL) devices; its JIT, folding, float16 and Tensor paths;
its CLI's device errors and bad inputs.

Compiling kernels dominates the cost (a new input shape or model means new kernels), so the
model is loaded once per module, most tests share one odd, non-square input shape, and all of
them run in one xdist worker (one process: compiled kernels are reused across tests).
"""

import numpy as np
import pytest
import torch
import tinygrad.codegen
import tinygrad.engine.realize
from tinygrad import Tensor

import shvit_tiny
import shvit_torch
from shvit_numpy.config import SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_tiny import run
from shvit_tiny.devices import available_devices, cl_is_cpu, resolve_device
from tests.helpers import TOL, assert_close, random_model_file, randomize

pytestmark = pytest.mark.xdist_group("tiny")

# Every block type, channel counts that are not multiples of the CPU kernels' 16-wide tile
# (qkv gives 2*16 + pdim = 36, 40, 44 channels), and a distillation head.
SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), num_classes=7, distillation=True)
X = np.random.default_rng(0).standard_normal((4, 3, 45, 38)).astype(np.float32)  # odd, non-square; 2 cores split 4 images

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
    return shvit_tiny.load(small[1], device="CPU", threads=1)  # one core: the split kernels' reference


@pytest.fixture(scope="module")
def ref(small):
    return torch_logits(small[0], X)


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_matches_torch_on_cpu(tiny_cpu, ref):
    assert tiny_cpu.device == "CPU" and tiny_cpu.config == SMALL
    assert_close("tiny CPU logits (distilled: mean of both heads)", tiny_cpu(X), ref, dtype=np.float32)


@pytest.mark.slow
def test_matches_torch_on_cl(small, ref):
    cl = shvit_tiny.load(small[1], device="CL")
    for call in range(2):  # the second call is TinyJit's replay: fast/replay.py's flat calls are for the CPU device only
        assert_close(f"tiny CL logits, call {call}", cl(X), ref, dtype=np.float32)
    assert cl.runner.replays == {X.shape: None} and cl.runner.lowered is None  # CL: the reference graph


@pytest.mark.slow
def test_jit_replay_equals_no_jit_and_the_reference_path(small, tiny_cpu, ref):
    """The fast path's JIT capture and replay answer exactly what its lazy graph does; the reference
    path (layers.py as written, tinygrad's own kernels: SHVIT_FAST=0 or fast=False), here on the
    unfolded model (BatchNorm kept, shvit_tiny's own layers), agrees with it and with torch."""
    calls = [tiny_cpu(X) for _ in range(3)]  # compiles and captures, then replays (flat C calls)
    assert len(tiny_cpu.runner.jits) == 1 and next(iter(tiny_cpu.runner.jits.values())).captured is not None
    no_jit = tiny_cpu(X, jit=False)
    for i, y in enumerate(calls):
        np.testing.assert_array_equal(y, no_jit, err_msg=f"call {i} (JIT) differs from the lazy graph")
    reference = shvit_tiny.load(small[1], device="CPU", fold=False, fast=False)
    assert hasattr(reference.stages[0].blocks[0].conv.m, "bn")  # really unfolded: BatchNorm kept
    got = [reference(X) for _ in range(3)]  # TinyJit: runs, captures, replays
    assert reference.runner is None and len(reference._jits) == 1  # the fast path never ran
    for i, y in enumerate(got):
        assert_close(f"reference path, call {i}", y, ref)
    assert_close("fast path vs reference path", no_jit, got[-1])


@pytest.mark.slow
def test_fuse_in_tinygrad_equals_folding_on_the_host(small):
    """SHViT.fuse() (tinygrad's own BatchNorm folding, layers.py) on real weights gives what load()'s
    host folding (shvit_numpy's) gives, tensor by tensor."""
    host = shvit_tiny.load(small[1], device="CPU")
    mine = shvit_tiny.load(small[1], device="CPU", fold=False, fast=False).fuse()
    from shvit_numpy.tree import leaves

    theirs = dict(leaves(host, Tensor))
    names = [name for name, _ in leaves(mine, Tensor)]
    assert names == list(theirs), "the folded trees differ"
    for name, t in leaves(mine, Tensor):
        assert_close(f"folded {name}", t.numpy(), theirs[name].numpy(), atol=1e-5, rtol=1e-5)


def test_cpu_replay_is_the_jits_own_answer(tiny_cpu, monkeypatch):
    """fast/replay.py: from a shape's second call on, numpy batches on the CPU device run the
    capture as flat C calls; bit for bit TinyJit's replay, for new inputs (not the last output again),
    whether the kernels read the batch in place or a copy of it (then pointed back at their buffer);
    a batch with a NaN or an infinity anywhere is refused as the numpy check would refuse it."""
    from shvit_tiny.fast.replay import CpuReplay, cpu_replay

    tiny_cpu(X)
    replay = tiny_cpu.runner.replays[X.shape]
    assert isinstance(replay, CpuReplay) and len(replay.kernels) > 20
    jit = tiny_cpu.runner.jits[(X.shape, tiny_cpu.dtype, "CPU")]
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal(X.shape).astype(np.float32)
        y = tiny_cpu(x)
        np.testing.assert_array_equal(y, jit(Tensor(x, device="CPU").realize()).numpy(), err_msg=f"seed {seed}")
        assert not np.array_equal(y, tiny_cpu(X))
    # the batch is read where it lies (no copy in) when aligned as the kernels reading it declare, else copied
    x = np.random.default_rng(3).standard_normal(X.shape).astype(np.float32)
    kept, want = x.copy(), jit(Tensor(x, device="CPU").realize()).numpy()
    assert replay.in_slots and replay.in_align in (4, 16, 32, 64)
    np.testing.assert_array_equal(tiny_cpu(x), want, err_msg="read in place")
    assert replay.reading == x.ctypes.data and np.array_equal(x, kept), "not read in place, or written"
    shifted = np.empty(x.size + 1, np.float32)[1:].reshape(x.shape)  # one float off the array's alignment
    shifted[:] = x
    monkeypatch.setattr(replay, "in_align", max(replay.in_align, 8))
    np.testing.assert_array_equal(tiny_cpu(shifted), want, err_msg="copied in after a call read in place")
    assert replay.reading == replay.in_addr
    # the batch's finiteness checked by the replay itself (pool.c, with the kernels): any element, any slice
    assert replay.checks_finite() and shvit_tiny.fast.checks_finite(tiny_cpu, x)
    for value, at in ((np.nan, 0), (np.inf, x.size // 2 + 1), (-np.inf, x.size - 1)):
        bad = x.copy()
        bad.reshape(-1)[at] = value
        with pytest.raises(ShvitError, match="input holds NaN or infinite values, expected finite numbers"):
            tiny_cpu(bad)
        with pytest.raises(ShvitError, match="input holds NaN or infinite values"):  # no replay: numpy's check
            tiny_cpu(bad, jit=False)
    np.testing.assert_array_equal(tiny_cpu(x), want, err_msg="after a batch refused")
    monkeypatch.setenv("SHVIT_REPLAY", "0")
    assert cpu_replay(jit, "CPU", X.shape, tiny_cpu.dtype) is None


def test_kernels_split_across_cores_answer_bit_for_bit_as_one_core(small, tiny_cpu, monkeypatch):
    """fast/parallel.py: kernels compiled split across 2 cores (tinygrad's THREAD opt, asked by
    kernels.py for the fast path's own kernels: here for every one whose images divide, however
    small, and tinygrad's own kernels, cut by generic_split.py), their slices run at once by
    pool.c's threads, answer bit for bit what one core does;
    so do the same slices called from Python one by one (no C compiler); four Python threads calling
    one model at once with two batches each get their own batch's answer (SHViT.__call__'s lock)."""
    import concurrent.futures

    from shvit_tiny.fast import generic_split, kernels, parallel, target
    from shvit_tiny.fast.replay import cpu_replay

    want = [tiny_cpu(X) for _ in range(2)][-1]  # one core (the fixture's threads=1), the second call: the replay
    assert {k[1] for k in tiny_cpu.runner.replays[X.shape].kernels} == {1}  # nothing split
    monkeypatch.setattr(kernels, "worth_splitting", lambda macs: True)
    monkeypatch.setattr(generic_split, "SLICE_ELEMENTS", 16)  # read in this process (no compile workers)
    monkeypatch.setattr(target, "compile_workers", lambda: 0)
    programs = {}  # tinygrad keeps one program per kernel graph, split or not: here the 2-core ones are compiled anew
    monkeypatch.setattr(tinygrad.codegen, "to_program_cache", programs)
    monkeypatch.setattr(tinygrad.engine.realize, "to_program_cache", programs)
    m = shvit_tiny.load(small[1], device="CPU", threads=2, cache=False)  # compiled here, with the settings above
    assert [m(X) for _ in range(2)] and m.runner.cores == 2
    replay = m.runner.replays[X.shape]
    split = {name.split("_")[0] for name, k in zip(jit_names(m, X), replay.kernels) if k[1] > 1}  # 2 to 8 slices
    assert {"conv3s2", "dw3s1", "gemm", "attend"} <= split, split
    generic = [k[1] for name, k in zip(jit_names(m, X), replay.kernels) if not name.startswith(("gemm", "conv", "dw", "attend", "frame"))]
    assert sum(n > 1 for n in generic) > len(generic) // 2, generic  # tinygrad's own, cut by fast/generic_split.py
    assert replay.array is not None and parallel.pool(2).threads == 2
    other = m(X[::-1].copy())  # another input first: a slice left uncomputed would keep its values
    np.testing.assert_array_equal(m(X), want, err_msg="2 threads")
    np.testing.assert_array_equal(other, want[::-1], err_msg="2 threads, images reversed")
    with concurrent.futures.ThreadPoolExecutor(4) as ex:  # four callers, two batches: each gets its own answer
        for i, y in enumerate(ex.map(lambda i: m(X[::-1] if i % 2 else X), range(8))):
            np.testing.assert_array_equal(y, want[::-1] if i % 2 else want, err_msg=f"concurrent call {i}")
    monkeypatch.setattr(parallel, "library", lambda: None)
    slow = cpu_replay(m.runner.jits[(X.shape, m.dtype, "CPU")], "CPU", X.shape, m.dtype, 2)
    assert slow.array is None and len(slow.calls) > len(slow.kernels)  # each slice its own ctypes call
    np.testing.assert_array_equal(slow(X), want, err_msg="slices called from Python")


def test_fast_weights_are_packed_for_their_kernels(tiny_cpu):
    """fast/pack.py lays each product's weight out as (Np/P, K, P): packed[jo, k, ji] = W[k, jo*P + ji],
    zero columns past N; the dense 3x3 stem reads (9*C_in, C_out), a depthwise conv (9, C)."""
    tiny_cpu(X)  # the fast path builds its weights on the first call
    from shvit_numpy.tree import leaves
    from shvit_tiny.fast.pack import padded_stem
    from shvit_tiny.layers import Conv2d, Linear

    weights, stem = tiny_cpu.runner.lowered.weights, padded_stem(tiny_cpu)
    layers = dict(leaves(tiny_cpu, (Conv2d, Linear)))
    assert len(weights) == len(layers)
    checked = set()
    for name, layer in layers.items():
        packed = weights[id(layer)][0].numpy()
        w = layer.weight.numpy()
        if w.ndim == 2 or w.shape[-1] == 1 and layer.groups == 1:  # a product: W = weight.T (K, N)
            m = w.T if w.ndim == 2 else w[:, :, 0, 0].T
            P = packed.shape[2]
            unpacked = packed.transpose(1, 0, 2).reshape(m.shape[0], -1)  # (K, Np)
            np.testing.assert_array_equal(unpacked[:, :m.shape[1]], m, err_msg=name)
            assert not unpacked[:, m.shape[1]:].any() and unpacked.shape[1] % P == 0, name
            checked.add("product")
        elif layer.groups == 1:  # the stem: channels padded with zeros (pack.padded_stem), in and out
            cout, cin = stem[id(layer)]
            padded = np.zeros((cout, cin) + w.shape[2:], np.float32)
            padded[:w.shape[0], :w.shape[1]] = w
            np.testing.assert_array_equal(packed, padded.transpose(2, 3, 1, 0).reshape(-1, cout), err_msg=name)
            checked.add("dense" if (cout, cin) == w.shape[:2] else "dense, padded")
        else:
            np.testing.assert_array_equal(packed, w.reshape(w.shape[0], -1).T, err_msg=name)
            checked.add("depthwise")
    assert checked == {"product", "dense", "dense, padded", "depthwise"}


@pytest.mark.slow
def test_odd_batch_and_shape(small, tiny_cpu):
    """Batch 1 and 33 x 70: row counts of the CPU products (15, 6, 2 pixels) that no tile divides."""
    x = np.random.default_rng(1).standard_normal((1, 3, 33, 70)).astype(np.float32)
    assert_close("1 x 3 x 33 x 70", tiny_cpu(x), torch_logits(small[0], x))


def test_tensor_in_tensor_out(tiny_cpu, ref):
    y = tiny_cpu(Tensor(X, device="CPU"))
    assert isinstance(y, Tensor) and y.shape == (len(X), 7)
    assert_close("tensor path", y.numpy(), ref)


@pytest.mark.slow
def test_forward_intermediates_match_torch(small, tiny_cpu):
    with torch.no_grad():
        want = [t.numpy() for t in small[0].forward_intermediates(torch.from_numpy(X))]
    got = [t.numpy() for t in tiny_cpu.forward_intermediates(Tensor(X, device="CPU"))]
    assert [g.shape for g in got] == [w.shape for w in want] == [(len(X), 16, 3, 3), (len(X), 24, 2, 2), (len(X), 40, 1, 1)]
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(f"stage {i + 1} output", g, w)


@pytest.mark.slow
def test_s1_once(tmp_path):
    model = shvit_torch.create("s1").eval()
    randomize(model, seed=22)
    shvit_torch.save(model, tmp_path / "s1.safetensors")
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 96)).astype(np.float32)  # 64 x 96 keeps compiling cheap
    tiny = shvit_tiny.load(tmp_path / "s1.safetensors", device="CPU")
    assert tiny.config.num_classes == 1000 and tiny.head_dist is None
    assert_close("tiny s1", tiny(x), torch_logits(model, x))


@pytest.mark.slow
def test_half_agrees_on_top1_within_bound(small, ref):
    y = shvit_tiny.load(small[1], device="CPU", half=True)(X)
    assert y.dtype == np.float32  # logits come back in float32
    assert (y.argmax(1) == ref.argmax(1)).all()
    assert_close("tiny --half logits", y, ref, **HALF_TOL)
    assert np.abs(y - ref).max() > 1e-6  # it really ran in float16


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
                     "--save-logits", str(tmp_path / "y.npy"), "--bench", "2", "--topk", "2", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert_close("cli logits", np.load(tmp_path / "y.npy"), ref)
    assert "images/s" in err and "first call" in err and f"CPU float32 batch {len(X)}" in err
    assert len(out.strip().splitlines()) == len(X)  # one line per image


def jit_names(m, x) -> list[str]:
    """The names of the kernels ``m``'s capture for ``x`` runs, in order (conv3s2_..., gemm_..., ...)."""
    jit = m.runner.jits[(x.shape, m.dtype, "CPU")]
    return [c.src[0].arg.name for c in jit.captured.linear.src]
