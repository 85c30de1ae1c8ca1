"""shvit_numpy against the PyTorch reference, its safetensors reader against the package, its
profiler against the paper, its CLI, and the promise that it imports nothing but numpy."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import shvit_numpy
import shvit_torch
from shvit_numpy.config import RESOLUTION, VARIANTS, SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_numpy.profile import count, summary
from shvit_numpy.weights import read_safetensors, write_safetensors
from tests.helpers import assert_close, randomize
from tests.runtimes import Numpy, Torch, block_paths

SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), num_classes=7)


def saved(cfg, tmp_path, seed=0):
    model = shvit_torch.create(cfg).eval()
    randomize(model, seed)
    path = tmp_path / "w.safetensors"
    shvit_torch.save(model, path)
    return model, path


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_torch_at_their_resolution(variant, tmp_path):
    model, path = saved(variant, tmp_path, seed=1)
    r = RESOLUTION[variant]
    x = np.random.default_rng(0).standard_normal((2 if variant == "s1" else 1, 3, r, r)).astype(np.float32)
    y = shvit_numpy.load(path)(x)
    assert_close(f"numpy {variant} logits", y, torch_logits(model, x), dtype=np.float32)


@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(distillation=True, types=("s", "s", "i")),
                                 SMALL.replace(partial_dim=(16, 24, 40), types=("s", "s", "s"), depth=(0, 1, 2))])
@pytest.mark.parametrize("shape", [(3, 3, 33, 18), (1, 3, 1, 7), (2, 3, 64, 65)])
@pytest.mark.parametrize("fold", [True, False])
def test_custom_configs_odd_sizes_folded_and_not(cfg, shape, fold, tmp_path):
    model, path = saved(cfg, tmp_path, seed=2)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    assert_close(f"numpy logits fold={fold}", shvit_numpy.load(path, fold=fold)(x), torch_logits(model, x))


def test_each_layer_alone_matches_torch(tmp_path):
    cfg = SMALL.replace(types=("s", "s", "s"))
    _, path = saved(cfg, tmp_path, seed=3)
    ref, numpy_rt = Torch(path, fold=False), Numpy(path, fold=False)
    rng = np.random.default_rng(2)
    for kind, (bpath, ch, flat) in block_paths(cfg).items():
        x = rng.standard_normal((2, ch) if flat else (2, ch, 9, 14)).astype(np.float32)
        assert_close(f"numpy {kind} ({bpath})", numpy_rt.block(bpath, x), ref.block(bpath, x))


def test_intermediates_and_attention(tmp_path):
    model, path = saved(SMALL, tmp_path, seed=4)
    x = np.random.default_rng(3).standard_normal((2, 3, 50, 35)).astype(np.float32)
    out = shvit_numpy.load(path).forward_intermediates(x)
    with torch.no_grad():
        ref = model.forward_intermediates(torch.from_numpy(x))
        h = model.stages[1].downsample(model.stages[0](model.patch_embed(torch.from_numpy(x))))
        attn = model.stages[1].blocks[0].mixer.m.attention(model.stages[1].blocks[0].conv(h))[2]  # (B, N, N)
    for i, (a, b) in enumerate(zip(out.stages, ref)):
        assert_close(f"stage {i + 1} output", a, b)
    assert sorted(out.attention) == ["stages.1.blocks.0.mixer.m", "stages.1.blocks.1.mixer.m",
                                     "stages.2.blocks.0.mixer.m"]
    assert out.attention["stages.2.blocks.0.mixer.m"].shape == (2, 1, 1)
    np.testing.assert_allclose(out.attention["stages.1.blocks.0.mixer.m"].sum(-1), 1, atol=1e-5)
    assert attn.shape == (2, 2 * 2, 2 * 2)  # 50 x 35 at stride 32: 2 x 2 tokens
    assert_close("attention matrix", out.attention["stages.1.blocks.0.mixer.m"], attn)
    assert_close("logits", out.logits, torch_logits(model, x))


@pytest.mark.parametrize("x,match", [
    (np.zeros((3, 32, 32), np.float32), "rank 3"), (np.zeros((1, 2, 32, 32), np.float32), "2 channels"),
    (np.zeros((1, 3, 32, 32), np.float64), "dtype float64"), (np.full((1, 3, 8, 8), np.nan, np.float32), "NaN"),
    ([[1.0]], "numpy array"),
])
def test_bad_input_raises_library_error(x, match, tmp_path):
    _, path = saved(SMALL, tmp_path)
    with pytest.raises(ShvitError, match=match):
        shvit_numpy.load(path)(x)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_safetensors_reader_matches_the_package(dtype, tmp_path):
    import safetensors.torch

    rng = np.random.default_rng(5)
    tensors = {"a.weight": torch.from_numpy(rng.standard_normal((3, 5, 1, 1)).astype(np.float32)).to(getattr(torch, dtype)),
               "b": torch.arange(7, dtype=torch.int64), "c.bias": torch.zeros(0)}
    safetensors.torch.save_file(tensors, tmp_path / "t.safetensors", metadata={"k": "v"})
    ours, meta = read_safetensors(tmp_path / "t.safetensors")
    assert meta == {"k": "v"} and set(ours) == set(tensors)
    for k, t in tensors.items():
        assert np.array_equal(ours[k], t.float().numpy() if t.is_floating_point() else t.numpy()), k
    write_safetensors(tmp_path / "o.safetensors", ours, {"x": "1"})  # and the package reads ours
    back = safetensors.torch.load_file(tmp_path / "o.safetensors")
    assert all(np.array_equal(back[k].numpy(), ours[k]) for k in ours)


def test_float16_weight_file_loads(tmp_path):
    import safetensors.numpy

    model, path = saved(SMALL, tmp_path, seed=6)
    state, meta = read_safetensors(path)
    half = {k: v.astype(np.float16) for k, v in state.items()}
    safetensors.numpy.save_file(half, tmp_path / "h.safetensors", metadata=meta)
    ref = shvit_torch.create(SMALL).eval()
    ref.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in half.items()}, strict=False)
    x = np.random.default_rng(4).standard_normal((1, 3, 40, 40)).astype(np.float32)
    assert_close("float16 file", shvit_numpy.load(tmp_path / "h.safetensors")(x), torch_logits(ref, x))


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'tinygrad', 'scipy', 'PIL', 'safetensors', 'sklearn'}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import numpy as np, shvit_numpy
from shvit_numpy import profile, run
m = shvit_numpy.load(sys.argv[1])
y = m(np.zeros((1, 3, 40, 40), np.float32))
m.forward_intermediates(np.zeros((1, 3, 40, 40), np.float32))
print(y.shape, sorted(k.split('.')[0] for k in sys.modules if k.split('.')[0] in {'torch', 'tinygrad', 'scipy', 'PIL'}))
"""


def test_imports_nothing_but_numpy(tmp_path):
    _, path = saved(SMALL, tmp_path)
    r = subprocess.run([sys.executable, "-c", BLOCKER, str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 7) []"


@pytest.mark.parametrize("variant,res,params,macs", [
    ("s1", 224, 6_330_808, 241.32e6), ("s2", 224, 11_483_072, 365.39e6), ("s3", 224, 14.2e6, 600.57e6), ("s4", 256, 16.5e6, 986.22e6)])
def test_profiler_reproduces_the_paper(variant, res, params, macs):
    s = summary(count(VARIANTS[variant], res))
    assert abs(s["params"] - params) / params < 0.01
    assert abs(s["macs"] - macs) / macs < 0.0005  # the spec's measured MACs, well inside the paper's 0.5%
    torch_params = sum(p.numel() for p in shvit_torch.create(variant).parameters())
    assert s["params"] == torch_params


def test_profiler_cli_json_and_macro():
    r = subprocess.run([sys.executable, "-m", "shvit_numpy.profile", "--variant", "s1", "--json", "--macro"],
                       capture_output=True, text=True)
    d = json.loads(r.stdout)
    assert d["params"] == 6_330_808 and round(d["macs"] / 1e6, 2) == 241.32 and len(d["layers"]) > 50
    shvit = [m for m in d["macro"] if m["layout"].startswith("SHViT")]
    conv = [m for m in d["macro"] if m["layout"].startswith("conventional")]
    assert [m["tokens"] for m in shvit] == [196, 49, 16] and conv[0]["tokens"] == 3136
    bad = subprocess.run([sys.executable, "-m", "shvit_numpy.profile", "--variant", "s7"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown variant 's7'" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_matches_the_model_and_fails_cleanly(tmp_path):
    model, path = saved(SMALL, tmp_path, seed=7)
    x = np.random.default_rng(6).standard_normal((2, 3, 37, 41)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, "-m", "shvit_numpy.run", "--weights", str(path), "--input", str(tmp_path / "x.npy"),
                        "--save-logits", str(tmp_path / "y.npy"), "--topk", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert_close("cli logits", np.load(tmp_path / "y.npy"), torch_logits(model, x))
    assert r.stdout.count("x.npy[") == 2
    np.save(tmp_path / "bad.npy", x[0])
    r = subprocess.run([sys.executable, "-m", "shvit_numpy.run", "--weights", str(path), "--input", str(tmp_path / "bad.npy")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "rank 3" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "shvit_numpy.run", "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments: --device" in r.stderr
