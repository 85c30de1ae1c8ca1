"""shvit_tiny against the PyTorch reference on tinygrad's CPU (clang) and CL (PoCL) devices,
its JIT, folding and float16 paths, and its CLI's device errors. Compiling kernels dominates
the cost, so models are cached per module and shapes are few."""
import os
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
from tests.helpers import TOL, assert_close, randomize

pytestmark = pytest.mark.xdist_group("tiny")
SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), num_classes=7, distillation=True)
X = np.random.default_rng(0).standard_normal((2, 3, 45, 38)).astype(np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    model = shvit_torch.create(SMALL).eval()
    randomize(model, seed=21)
    path = tmp_path_factory.mktemp("tiny") / "small.safetensors"
    shvit_torch.save(model, path)
    return model, path


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("device", ["CPU", "CL"])
def test_matches_torch_on_each_device(small, device):
    model, path = small
    tiny = shvit_tiny.load(path, device=device)
    assert_close(f"tiny {device} logits", tiny(X), torch_logits(model, X), dtype=np.float32)


def test_odd_sizes_jit_and_no_jit_and_unfolded(small):
    model, path = small
    x = np.random.default_rng(1).standard_normal((1, 3, 17, 70)).astype(np.float32)
    ref = torch_logits(model, x)
    folded, unfolded = shvit_tiny.load(path, device="CPU"), shvit_tiny.load(path, device="CPU", fold=False)
    results = [folded(x), folded(x), folded(x), folded(x, jit=False), unfolded(x, jit=False)]  # 3rd call replays the JIT
    for i, y in enumerate(results):
        assert_close(f"call {i}", y, ref)
    assert len(folded._jits) == 1


def test_tensor_in_tensor_out(small):
    model, path = small
    tiny = shvit_tiny.load(path, device="CPU")
    y = tiny(Tensor(X, device="CPU"))
    assert isinstance(y, Tensor) and y.shape == (2, 7)
    assert_close("tensor path", y.numpy(), torch_logits(model, X))


def test_s1_once(tmp_path):
    model = shvit_torch.create("s1").eval()
    randomize(model, seed=22)
    shvit_torch.save(model, tmp_path / "s1.safetensors")
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 96)).astype(np.float32)  # small input keeps compile cheap
    assert_close("tiny s1", shvit_tiny.load(tmp_path / "s1.safetensors", device="CPU")(x), torch_logits(model, x))


def test_half_agrees_on_top1_within_bound(small):
    model, path = small
    ref = torch_logits(model, X)
    y = shvit_tiny.load(path, device="CPU", half=True)(X)
    assert y.dtype == np.float32  # logits come back in float32
    assert (y.argmax(1) == ref.argmax(1)).all()
    assert_close("tiny --half logits", y, ref, **TOL["float16"])
    assert np.abs(y - ref).max() > 0  # it really ran in float16


@pytest.mark.parametrize("x,match", [
    (np.zeros((3, 32, 32), np.float32), "rank 3"), (np.zeros((1, 4, 32, 32), np.float32), "4 channels"),
    (np.zeros((1, 3, 32, 32), np.float64), "dtype float64"), (np.full((1, 3, 8, 8), np.inf, np.float32), "infinite"),
])
def test_bad_input_raises_library_error(small, x, match):
    with pytest.raises(ShvitError, match=match):
        shvit_tiny.load(small[1], device="CPU")(x)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "shvit_tiny.run", *map(str, args)], capture_output=True, text=True, env=env)


def test_cli_runs_and_saves_logits(small, tmp_path):
    model, path = small
    np.save(tmp_path / "x.npy", X)
    r = run_cli("--weights", path, "--input", tmp_path / "x.npy", "--device", "cpu", "--save-logits", tmp_path / "y.npy",
                "--bench", "2")
    assert r.returncode == 0, r.stderr
    assert_close("cli logits", np.load(tmp_path / "y.npy"), torch_logits(model, X))
    assert "images/s" in r.stderr and "first call" in r.stderr


@pytest.mark.parametrize("args,match", [
    (["--device", "METAL"], "device METAL is not available on this machine; available: "),
    (["--device", "quantum"], "unknown device 'quantum'"), (["--bench", "-1"], "--bench and --beam take a count >= 0"),
])
def test_cli_device_and_flag_errors(small, tmp_path, args, match):
    np.save(tmp_path / "x.npy", X)
    r = run_cli("--weights", small[1], "--input", tmp_path / "x.npy", *args)
    assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_without_clang_says_how_to_install_it(small, tmp_path):
    np.save(tmp_path / "x.npy", X)
    env = {**os.environ, "PATH": str(tmp_path)}  # no clang on this PATH
    r = run_cli("--weights", small[1], "--input", tmp_path / "x.npy", "--device", "CPU", env=env)
    assert r.returncode == 2 and "apt-get install clang" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_cli_bad_weights_file(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    np.save(tmp_path / "x.npy", X)
    r = run_cli("--weights", tmp_path / "w.safetensors", "--input", tmp_path / "x.npy", "--device", "CPU")
    assert r.returncode == 2 and "not a valid safetensors file" in r.stderr and "Traceback" not in r.stderr, r.stderr
