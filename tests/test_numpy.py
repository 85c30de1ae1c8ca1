"""shvit_numpy against the PyTorch reference (eval mode, random weights AND random BatchNorm
statistics), its elementary operations against torch.nn.functional, BatchNorm folding, load
errors, the numpy-only promise, the profiler against the spec's figures, and the CLI.

Tolerance: tests.helpers.TOL["float32"] (atol = rtol = 1e-4) everywhere. Both sides compute in
float32 and differ only in summation order (im2col GEMM vs oneDNN, pairwise vs sequential
means), which moves logits of O(1) by ~1e-6; 1e-4 leaves room for the deepest variant (s4, 17
blocks) while a real bug (a wrong scale, a dropped residual, a swapped q/k) moves them by >1e-2.
The softmax check uses 1e-6 because it compares one operation, not a network.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import shvit_numpy
import shvit_torch
from shvit_numpy import layers as nl
from shvit_numpy import profile, run
from shvit_numpy.config import RESOLUTION, VARIANTS, SHViTConfig
from shvit_numpy.errors import ShvitError
from shvit_numpy.model import SHViT
from shvit_numpy.names import state_shapes
from shvit_numpy.profile import count, summary
from tests.helpers import assert_close, random_state, randomize
from tests.runtimes import Numpy, Torch, block_paths

SMALL = SHViTConfig(embed_dim=(16, 24, 40), partial_dim=(4, 8, 12), depth=(1, 2, 1), num_classes=7)


def saved(cfg, tmp_path, seed=0, **save_kw):
    """A torch model with random weights and BN statistics, and its canonical weight file."""
    model = shvit_torch.create(cfg).eval()
    randomize(model, seed)
    path = tmp_path / "w.safetensors"
    shvit_torch.save(model, path, **save_kw)
    return model, path


def torch_logits(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---- whole models ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_torch_at_their_resolution(variant, tmp_path):
    model, path = saved(variant, tmp_path, seed=1)
    r = RESOLUTION[variant]
    x = rand(2 if variant == "s1" else 1, 3, r, r)
    y = shvit_numpy.load(path)(x)
    assert_close(f"numpy {variant} logits", y, torch_logits(model, x), dtype=np.float32)


@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(distillation=True, types=("s", "s", "i")),
                                 SMALL.replace(partial_dim=(16, 24, 40), types=("s", "s", "s"), depth=(0, 1, 2))])
@pytest.mark.parametrize("shape", [(3, 3, 33, 18), (1, 3, 1, 7), (2, 3, 64, 65)])
def test_custom_configs_odd_sizes_folded_and_not(cfg, shape, tmp_path):
    model, path = saved(cfg, tmp_path, seed=2)
    x = rand(*shape, seed=1)
    ref = torch_logits(model, x)
    for fold in (True, False):
        assert_close(f"numpy logits fold={fold}", shvit_numpy.load(path, fold=fold)(x), ref, dtype=np.float32)


def test_each_layer_alone_matches_torch(tmp_path):
    cfg = SMALL.replace(types=("s", "s", "s"))
    _, path = saved(cfg, tmp_path, seed=3)
    for fold in (False, True):
        ref, numpy_rt = Torch(path, fold=fold), Numpy(path, fold=fold)
        for kind, (bpath, ch, flat) in block_paths(cfg).items():
            x = rand(*((2, ch) if flat else (2, ch, 9, 14)), seed=2)
            assert_close(f"numpy {kind} ({bpath}, fold={fold})", numpy_rt.block(bpath, x), ref.block(bpath, x))


def test_features_head_and_intermediates(tmp_path):
    model, path = saved(SMALL, tmp_path, seed=4)
    x = rand(2, 3, 50, 35, seed=3)
    m = shvit_numpy.load(path)
    out = m.forward_intermediates(x)
    with torch.no_grad():
        ref = model.forward_intermediates(torch.from_numpy(x))
        h = model.stages[1].downsample(model.stages[0](model.patch_embed(torch.from_numpy(x))))
        attn = model.stages[1].blocks[0].mixer.m.attention(model.stages[1].blocks[0].conv(h))[2]  # (B, N, N)
        feats = model.forward_features(torch.from_numpy(x))
    for i, (a, b) in enumerate(zip(out.stages, ref)):
        assert_close(f"stage {i + 1} output", a, b, dtype=np.float32)
    assert_close("forward_features", m.forward_features(x), feats, dtype=np.float32)
    assert_close("forward_head", m.forward_head(m.forward_features(x)), torch_logits(model, x))
    assert sorted(out.attention) == ["stages.1.blocks.0.mixer.m", "stages.1.blocks.1.mixer.m", "stages.2.blocks.0.mixer.m"]
    assert out.attention["stages.2.blocks.0.mixer.m"].shape == (2, 1, 1)
    assert attn.shape == (2, 2 * 2, 2 * 2)  # 50 x 35 at stride 32: 2 x 2 tokens
    assert_close("attention matrix", out.attention["stages.1.blocks.0.mixer.m"], attn, dtype=np.float32)
    assert_close("logits", out.logits, torch_logits(model, x))
    assert all(m.keep_attention is False and m.last_attention is None for m in m.attention_layers().values())


# ---- the elementary operations, one at a time -------------------------------------------------------

@pytest.mark.parametrize("cin,cout,k,stride,pad,hw", [
    (3, 8, 3, 2, 1, (17, 10)), (5, 7, 1, 1, 0, (6, 9)), (4, 6, 3, 1, 1, (1, 1)), (2, 3, 3, 2, 1, (1, 2)), (6, 4, 3, 2, 0, (9, 8))])
def test_dense_conv_is_im2col_matmul(cin, cout, k, stride, pad, hw):
    x, w = rand(3, cin, *hw, seed=5), rand(cout, cin, k, k, seed=6)
    got = nl.conv_dense(x.transpose(0, 2, 3, 1), w, stride, pad).transpose(0, 3, 1, 2)  # a strided NHWC view in
    assert_close("conv_dense", got, F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=pad), dtype=np.float32)


@pytest.mark.parametrize("groups,k,stride", [(1, 3, 2), (2, 3, 1), (3, 1, 1)])
@pytest.mark.parametrize("chunk_bytes", [1, nl.IM2COL_CHUNK_BYTES])  # im2col one image at a time, or all
def test_conv2d_layer_dense_and_grouped_with_bias(groups, k, stride, chunk_bytes, monkeypatch):
    monkeypatch.setattr(nl, "IM2COL_CHUNK_BYTES", chunk_bytes)
    conv = nl.Conv2d(6, 12, k, stride, k // 2, groups, bias=True)
    conv.weight, conv.bias = rand(*conv.weight.shape, seed=20), rand(*conv.bias.shape, seed=21)
    x = rand(3, 6, 11, 8, seed=22)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(conv.weight), torch.from_numpy(conv.bias), stride, k // 2, groups=groups)
    assert_close(f"Conv2d groups={groups}", conv(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2), ref, dtype=np.float32)


@pytest.mark.parametrize("stride,hw", [(1, (14, 14)), (1, (1, 5)), (2, (9, 14)), (2, (1, 1)), (1, (3, 1))])
def test_depthwise_conv_is_nine_shifted_multiply_adds(stride, hw):
    """The one depthwise test: nl.Conv2d with groups = channels (conv_depthwise, bias added) against torch."""
    c = 6
    conv = nl.Conv2d(c, c, 3, stride, 1, groups=c, bias=True)
    conv.weight, conv.bias = rand(c, 1, 3, 3, seed=8), rand(c, seed=9)
    x = rand(5, c, *hw, seed=7)
    got = conv(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(conv.weight), torch.from_numpy(conv.bias), stride=stride, padding=1, groups=c)
    assert_close(f"depthwise stride {stride}", got, ref, dtype=np.float32)


def test_group_norm_softmax_and_sigmoid():
    gn = nl.GroupNorm(5)
    gn.weight, gn.bias = rand(5, seed=9), rand(5, seed=10)
    x = rand(3, 5, 4, 7, seed=11) * 3 + 2
    ref = F.group_norm(torch.from_numpy(x), 1, torch.from_numpy(gn.weight), torch.from_numpy(gn.bias), eps=1e-5)
    assert_close("GroupNorm(1 group)", gn(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2), ref, dtype=np.float32)
    s = rand(2, 4, 9, seed=12) * 1e4  # exp would overflow without the max subtraction
    got = nl.softmax(s)
    assert np.isfinite(got).all() and got.dtype == np.float32
    assert_close("softmax", got, torch.from_numpy(s).softmax(-1), atol=1e-6, rtol=1e-6)
    before = s.copy()
    nl.softmax(s)
    assert np.array_equal(s, before), "softmax changed its input"
    z = rand(100, seed=13) * 20
    assert_close("sigmoid", nl.sigmoid(z), torch.sigmoid(torch.from_numpy(z)), dtype=np.float32)


def test_batchnorm_folding_algebra_per_layer():
    """Each fold equals the layer it replaces: ConvBN -> Conv2d, Residual(depthwise) -> one conv with
    +1 on the centre tap, NormLinear -> Linear."""
    rng = np.random.default_rng(14)

    def randomize_bn(bn):
        c = bn.weight.shape[0]
        bn.weight, bn.bias = rng.uniform(-1.5, 1.5, c).astype(np.float32), rng.normal(0, 0.3, c).astype(np.float32)
        bn.running_mean, bn.running_var = rng.normal(0, 0.3, c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)

    x = rand(2, 11, 7, 8, seed=15)  # (B, H, W, C)
    for layer in (nl.ConvBN(8, 6, 3, 2, 1), nl.ConvBN(8, 5), nl.Residual(nl.ConvBN(8, 8, 3, 1, 1, groups=8))):
        cb = layer.m if isinstance(layer, nl.Residual) else layer
        cb.c.weight = rand(*cb.c.weight.shape, seed=16)
        randomize_bn(cb.bn)
        want = layer(x)
        folded = layer.fuse()
        assert isinstance(folded, nl.Conv2d) and folded.bias is not None
        assert_close(f"folded {type(layer).__name__}", folded(x), want, dtype=np.float32)
    head = nl.NormLinear(8, 3)
    head.l.weight, head.l.bias = rand(3, 8, seed=17), rand(3, seed=18)
    randomize_bn(head.bn)
    v = rand(4, 8, seed=19)
    want = head(v)
    assert_close("folded head", head.fuse()(v), want, dtype=np.float32)


def param_count(module) -> int:
    """Every weight array in a numpy model tree (BatchNorm running statistics excluded)."""
    if isinstance(module, list):
        return sum(param_count(m) for m in module)
    total = 0
    for name, value in vars(module).items():
        if isinstance(value, np.ndarray) and not name.startswith("running_"):
            total += value.size
        elif isinstance(value, (nl.Module, list)):
            total += param_count(value)
    return total


def test_folding_removes_exactly_the_batchnorm_parameters():
    cfg = VARIANTS["s1"]
    model = SHViT(cfg).load_state(random_state(state_shapes(cfg), 0))
    assert param_count(model) == 6_330_808
    assert param_count(model.fuse()) == 6_308_660  # the spec's figures
    assert sum(p.numel() for p in shvit_torch.create("s1").fuse().parameters()) == 6_308_660


# ---- errors ---------------------------------------------------------------------------------------

def test_load_state_names_the_bad_tensor():
    state = random_state(state_shapes(SMALL), 0)
    with pytest.raises(ShvitError, match="missing tensor 'head.l.bias'"):
        SHViT(SMALL).load_state({k: v for k, v in state.items() if k != "head.l.bias"})
    with pytest.raises(ShvitError, match=r"'patch_embed.0.c.weight' has shape \[3, 3, 3, 3\], expected \[2, 3, 3, 3\]"):
        SHViT(SMALL).load_state({**state, "patch_embed.0.c.weight": np.zeros((3, 3, 3, 3), np.float32)})


# ---- numpy only -----------------------------------------------------------------------------------

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
np.save(sys.argv[2], np.ones((1, 3, 20, 30), np.float32))
assert run.main(['--weights', sys.argv[1], '--input', sys.argv[2], '--topk', '1']) == 0
print(y.shape, sorted(k.split('.')[0] for k in sys.modules if k.split('.')[0] in {'torch', 'tinygrad', 'scipy', 'PIL'}))
"""


def test_imports_nothing_but_numpy(tmp_path):
    _, path = saved(SMALL, tmp_path)
    r = subprocess.run([sys.executable, "-c", BLOCKER, str(path), str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "(1, 7) []"
    assert r.stdout.startswith("x.npy[0]: ")  # the CLI ran, torch-free


# ---- profiler -------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,res,params,macs", [
    ("s1", 224, 6_330_808, 241.32e6), ("s2", 224, 11_483_072, 365.39e6), ("s3", 224, 14.2e6, 600.57e6), ("s4", 256, 16.5e6, 986.22e6)])
def test_profiler_reproduces_the_spec(variant, res, params, macs):
    s = summary(count(VARIANTS[variant], res))
    assert abs(s["params"] - params) / params < 0.01  # s3, s4: the paper's rounded 14.2M, 16.5M
    assert round(s["macs"] / 1e6, 2) == macs / 1e6  # the spec's measured MACs, to the 10k
    assert s["params"] == sum(p.numel() for p in shvit_torch.create(variant).parameters())
    assert s["params_folded"] == param_count(SHViT(VARIANTS[variant]).fuse())


def test_profiler_shapes_follow_odd_inputs():
    rows = {r.name: r for r in count(SMALL, 97, 50)}
    assert rows["patch_embed.6"].shape == (16, 7, 4)  # ceil(97 / 16), ceil(50 / 16)
    assert rows["stages.2.blocks.0.ffn.m.pw2"].shape == (40, 2, 1)
    assert rows["stages.1.blocks.0.mixer.m.attn"].macs == (4 * 2) ** 2 * (16 + 8)  # N^2 (qk + pdim)


def test_profiler_cli_json_and_macro(capsys):
    """In this process (its bad flags: tests/test_bad_input.py)."""
    assert profile.main(["--variant", "s1", "--json", "--macro"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["params"] == 6_330_808 and d["params_folded"] == 6_308_660 and round(d["macs"] / 1e6, 2) == 241.32
    assert sum(row["macs"] for row in d["layers"]) == d["macs"] and {"name", "shape", "params", "macs", "act_bytes"} <= set(d["layers"][0])
    shvit = [m for m in d["macro"] if m["layout"].startswith("SHViT")]
    conv = [m for m in d["macro"] if m["layout"].startswith("conventional")]
    assert [m["tokens"] for m in shvit] == [196, 49, 16] and [m["tokens"] for m in conv] == [3136, 784, 196, 49]
    assert profile.main(["--variant", "s4", "--macro"]) == 0
    text = capsys.readouterr().out
    assert "SHViT-s4 at 256x256" in text and "986.22M" in text and "16x the tokens" in text


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_is_the_model(tmp_path, capsys):
    """shvit_numpy.run in this process (a torch-free run: test_imports_nothing_but_numpy; its input
    errors: tests/test_bad_input.py)."""
    labels = [f"class-{c}" for c in "abcdefg"]
    model, path = saved(SMALL, tmp_path, seed=7, labels=labels)
    x = rand(2, 3, 37, 41, seed=6)
    np.save(tmp_path / "x.npy", x)
    assert run.main(["--weights", str(path), "--input", str(tmp_path / "x.npy"), "--save-logits", str(tmp_path / "y.npy"),
                     "--topk", "2"]) == 0
    y = np.load(tmp_path / "y.npy")
    assert np.array_equal(y, shvit_numpy.load(path)(x))  # the CLI is the model, bit for bit
    assert_close("cli logits", y, torch_logits(model, x))
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["x.npy[0]", "x.npy[1]"]
    assert lines[0].split(": ")[1].startswith(labels[int(y[0].argmax())] + " (") and lines[0].count("class-") == 2
