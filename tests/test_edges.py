"""The edges of the equivalence suite, each checked against a reference that is NOT the project's
own code read backwards (issue 23).

* The authors' checkpoint format: their state-dict keys and shapes are generated here from the
  authors' model definition (SHViT's ``model/shvit.py``: the order in which its constructor
  appends modules, ``Conv2d_BN``'s ``c``/``bn`` children, timm's ``SqueezeExcite`` with its
  ``make_divisible``), not from ``shvit_numpy.names``; the project's mapping must send each one,
  in module order, to the canonical tensor of the same position and shape. Then an authors'
  file with distinct random tensors in every layer is loaded by the project (both readers: torch's
  and the numpy ``.pth`` reader) and its logits are compared with a forward pass written here in
  torch functional ops that reads every tensor by the AUTHORS' names.
* The evaluation preprocessing against torchvision's definitions (torchvision cannot be imported
  beside this torch, so its facts are written out here): ``Resize(int)`` sends the shorter side to
  the size and the longer to ``int(size * long / short)``, through PIL's own ``resize`` with
  ``BICUBIC`` on PIL images (and no resampling when the size already matches); ``CenterCrop``'s
  offsets are ``int(round((h - th) / 2))`` (Python's round: halves go to the even integer);
  ``ToTensor`` divides by 255 in float32; ``Normalize`` subtracts the mean and divides by the std in
  float32. The authors evaluate ``Resize(int(256 / 224 * res), bicubic)``, ``CenterCrop(res)``.
* float16 (tinygrad, ``half=True``): weights that put the attention scores far above float16's
  largest value (65504) and GroupNorm's squared deviations above it too; the model must still
  give the float32 reference's logits. The test first proves its own premise on the reference.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import shvit_torch
from shvit_numpy.config import VARIANTS, SHViTConfig
from shvit_numpy.names import authors_to_canonical, canonical_to_authors, state_shapes
from shvit_numpy.preprocess import load_image, preprocess_pil
from shvit_numpy.weights import load_weights, save_weights
from shvit_torch.model import from_weights
from tests.helpers import TOL, assert_close, random_state


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread (two, on a shared two-core machine, mostly wait on each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ================================================================================================
# 1. The authors' format
# ================================================================================================

# every block type, pdim and qk that differ per stage (stage 1 has no attention: a file cannot say its
# pdim or qk, and the defaults are read back), a distillation head; stage 3's width equals
# stage 2's, so its two downsample halves have the same shapes (only the values can tell them apart)
SMALL = SHViTConfig(embed_dim=(16, 24, 24), partial_dim=(4, 8, 12), depth=(2, 2, 2), qk_dim=(16, 4, 8),
                    types=("i", "s", "s"), num_classes=7, distillation=True)
S1 = VARIANTS["s1"]


def make_divisible(v, divisor=8, round_limit=0.9):
    """timm's rounding of SqueezeExcite's bottleneck (the authors build SqueezeExcite(hid, 0.25))."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < round_limit * v else new


def authors_shapes(cfg: SHViTConfig) -> dict[str, tuple]:
    """The authors' state dict, key -> shape, in their module order, as their ``SHViT.__init__``
    builds it: ``patch_embed`` (Conv2d_BN at 0, 2, 4, 6, ReLUs between), then for stage i its
    BasicBlocks appended to ``blocks{i+1}`` and, after them, the downsample appended to
    ``blocks{i+2}`` as three entries (Sequential(Residual(DW), Residual(FFN)), PatchMerging,
    Sequential(Residual(DW), Residual(FFN))), then ``head`` (and ``head_dist``), both BN_Linear."""
    out: dict[str, tuple] = {}

    def conv_bn(name, a, b, ks=1, groups=1):  # Conv2d_BN: Sequential(c=Conv2d(bias=False), bn=BatchNorm2d)
        out[f"{name}.c.weight"] = (b, a // groups, ks, ks)
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{p}"] = (b,)
        out[f"{name}.bn.num_batches_tracked"] = ()

    def ffn(name, ed):  # FFN(ed, 2 ed): pw1, act, pw2
        conv_bn(f"{name}.pw1", ed, 2 * ed)
        conv_bn(f"{name}.pw2", 2 * ed, ed)

    def basic_block(name, dim, qk, pdim, kind):  # conv, mixer (SHSA or Identity), ffn; each Residual(.m)
        conv_bn(f"{name}.conv.m", dim, dim, 3, dim)
        if kind == "s":  # SHSA: pre_norm (GroupNorm), qkv, proj = Sequential(ReLU, Conv2d_BN)
            out[f"{name}.mixer.m.pre_norm.weight"] = out[f"{name}.mixer.m.pre_norm.bias"] = (pdim,)
            conv_bn(f"{name}.mixer.m.qkv", pdim, 2 * qk + pdim)
            conv_bn(f"{name}.mixer.m.proj.1", dim, dim)
        ffn(f"{name}.ffn.m", dim)

    def half_downsample(name, ed):  # Sequential(Residual(DW), Residual(FFN))
        conv_bn(f"{name}.0.m", ed, ed, 3, ed)
        ffn(f"{name}.1.m", ed)

    def patch_merging(name, dim, out_dim):  # conv1, act, conv2, se, conv3
        hid = 4 * dim
        rd = make_divisible(hid * 0.25)
        conv_bn(f"{name}.conv1", dim, hid)
        conv_bn(f"{name}.conv2", hid, hid, 3, hid)
        out.update({f"{name}.se.fc1.weight": (rd, hid, 1, 1), f"{name}.se.fc1.bias": (rd,),
                    f"{name}.se.fc2.weight": (hid, rd, 1, 1), f"{name}.se.fc2.bias": (hid,)})
        conv_bn(f"{name}.conv3", hid, out_dim)

    e = cfg.embed_dim
    stem = [cfg.in_chans, e[0] // 8, e[0] // 4, e[0] // 2, e[0]]
    for i in range(4):
        conv_bn(f"patch_embed.{2 * i}", stem[i], stem[i + 1], 3)
    blocks = {1: [], 2: [], 3: []}  # the constructor's three lists: entries added in its loop order
    for i in range(3):
        for _ in range(cfg.depth[i]):
            blocks[i + 1].append(lambda n, i=i: basic_block(n, e[i], cfg.qk_dim[i], cfg.partial_dim[i], cfg.types[i]))
        if i < 2:  # down_ops 'subsample' after stages 1 and 2
            blocks[i + 2].append(lambda n, i=i: half_downsample(n, e[i]))
            blocks[i + 2].append(lambda n, i=i: patch_merging(n, e[i], e[i + 1]))
            blocks[i + 2].append(lambda n, i=i: half_downsample(n, e[i + 1]))
    for k in (1, 2, 3):
        for j, add in enumerate(blocks[k]):
            add(f"blocks{k}.{j}")
    for head in ("head", "head_dist") if cfg.distillation else ("head",):
        out.update({f"{head}.bn.{p}": (e[2],) for p in ("weight", "bias", "running_mean", "running_var")})
        out.update({f"{head}.bn.num_batches_tracked": (), f"{head}.l.weight": (cfg.num_classes, e[2]),
                    f"{head}.l.bias": (cfg.num_classes,)})
    return out


# A few of S1's keys written out by hand from the spec: authors' name -> (canonical name, shape).
S1_BY_HAND = {
    "patch_embed.0.c.weight": ("patch_embed.0.c.weight", (16, 3, 3, 3)),
    "blocks1.1.ffn.m.pw2.c.weight": ("stages.0.blocks.1.ffn.m.pw2.c.weight", (128, 256, 1, 1)),
    "blocks2.0.0.m.c.weight": ("stages.1.downsample.0.m.c.weight", (128, 1, 3, 3)),
    "blocks2.0.1.m.pw1.bn.running_var": ("stages.1.downsample.1.m.pw1.bn.running_var", (256,)),
    "blocks2.1.se.fc1.weight": ("stages.1.downsample.2.se.fc1.weight", (128, 512, 1, 1)),
    "blocks2.1.conv3.c.weight": ("stages.1.downsample.2.conv3.c.weight", (224, 512, 1, 1)),
    "blocks2.2.0.m.c.weight": ("stages.1.downsample.3.m.c.weight", (224, 1, 3, 3)),
    "blocks2.2.1.m.pw2.c.weight": ("stages.1.downsample.4.m.pw2.c.weight", (224, 448, 1, 1)),
    "blocks2.3.mixer.m.qkv.c.weight": ("stages.1.blocks.0.mixer.m.qkv.c.weight", (80, 48, 1, 1)),
    "blocks2.6.mixer.m.proj.1.bn.bias": ("stages.1.blocks.3.mixer.m.proj.1.bn.bias", (224,)),
    "blocks3.1.se.fc2.weight": ("stages.2.downsample.2.se.fc2.weight", (896, 224, 1, 1)),
    "blocks3.7.mixer.m.pre_norm.weight": ("stages.2.blocks.4.mixer.m.pre_norm.weight", (68,)),
    "head.l.weight": ("head.l.weight", (1000, 320)),
}


@pytest.mark.parametrize("cfg", [SMALL, S1], ids=["small", "s1"])
def test_authors_keys_map_name_by_name_and_shape_by_shape(cfg):
    """Position by position (both models register their tensors in forward order), the authors'
    key maps to the canonical key of the same shape, and back."""
    theirs = {k: s for k, s in authors_shapes(cfg).items() if not k.endswith("num_batches_tracked")}
    ours = state_shapes(cfg)
    assert len(theirs) == len(ours), f"the authors' model has {len(theirs)} tensors, the canonical list {len(ours)}"
    for (a, a_shape), (c, c_shape) in zip(theirs.items(), ours.items()):
        assert authors_to_canonical(a) == c, f"authors' {a!r} maps to {authors_to_canonical(a)!r}, the tensor at its place is {c!r}"
        assert canonical_to_authors(c) == a, f"canonical {c!r} is written as {canonical_to_authors(c)!r}, the authors call it {a!r}"
        assert tuple(a_shape) == tuple(c_shape), f"{a!r} has shape {a_shape} in the authors' model, {c!r} {c_shape}"
    if cfg == S1:
        for a, (c, shape) in S1_BY_HAND.items():
            assert theirs[a] == shape and authors_to_canonical(a) == c and ours[c] == shape, a


# ---- an authors' file, and the authors' forward pass by their names ----------------------------

class Reads(dict):
    """A state dict that remembers which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def authors_forward(sd: Reads, cfg: SHViTConfig, x: torch.Tensor) -> torch.Tensor:
    """The authors' ``SHViT.forward`` in eval mode, in torch functional ops, every tensor read by the
    authors' key (1x1 kernels may be stored 2-D, as in some release files)."""
    def t(key):
        return sd[key].float()

    def conv_bn(p, x, stride=1, pad=0, groups=1, relu=False):
        k = t(f"{p}.c.weight")
        y = F.conv2d(x, k[:, :, None, None] if k.ndim == 2 else k, None, stride, pad, 1, groups)
        y = F.batch_norm(y, t(f"{p}.bn.running_mean"), t(f"{p}.bn.running_var"), t(f"{p}.bn.weight"), t(f"{p}.bn.bias"),
                         False, 0.0, 1e-5)
        return y.relu() if relu else y

    def dw(p, x):
        return conv_bn(p, x, 1, 1, groups=x.shape[1])

    def ffn(p, x):
        return conv_bn(f"{p}.pw2", conv_bn(f"{p}.pw1", x, relu=True))

    def shsa(p, x, pdim, qk):
        B, C, H, W = x.shape
        x1, x2 = x[:, :pdim], x[:, pdim:]
        x1 = F.group_norm(x1, 1, t(f"{p}.pre_norm.weight"), t(f"{p}.pre_norm.bias"), 1e-5)
        q, k, v = conv_bn(f"{p}.qkv", x1).flatten(2).split([qk, qk, pdim], dim=1)  # (B, qk|qk|pdim, N)
        attn = (q.transpose(1, 2) @ k * qk ** -0.5).softmax(-1)  # (B, N, N)
        x1 = (v @ attn.transpose(1, 2)).reshape(B, pdim, H, W)
        return conv_bn(f"{p}.proj.1", torch.cat([x1, x2], 1).relu())

    def block(p, x, s):
        x = x + dw(f"{p}.conv.m", x)
        if cfg.types[s] == "s":
            x = x + shsa(f"{p}.mixer.m", x, cfg.partial_dim[s], cfg.qk_dim[s])
        return x + ffn(f"{p}.ffn.m", x)

    def se(p, x):
        def fc(name, y):
            w = t(f"{p}.{name}.weight")
            return F.conv2d(y, w[:, :, None, None] if w.ndim == 2 else w, t(f"{p}.{name}.bias"))
        return x * fc("fc2", fc("fc1", x.mean((2, 3), keepdim=True)).relu()).sigmoid()

    def patch_merging(p, x):
        x = conv_bn(f"{p}.conv1", x, relu=True)
        x = conv_bn(f"{p}.conv2", x, 2, 1, groups=x.shape[1], relu=True)
        return conv_bn(f"{p}.conv3", se(f"{p}.se", x))

    def head(p, x):
        y = F.batch_norm(x, t(f"{p}.bn.running_mean"), t(f"{p}.bn.running_var"), t(f"{p}.bn.weight"), t(f"{p}.bn.bias"),
                         False, 0.0, 1e-5)
        return F.linear(y, t(f"{p}.l.weight"), t(f"{p}.l.bias"))

    for i in range(4):
        x = conv_bn(f"patch_embed.{2 * i}", x, 2, 1, relu=i < 3)
    for j in range(cfg.depth[0]):
        x = block(f"blocks1.{j}", x, 0)
    for k in (2, 3):
        x = x + dw(f"blocks{k}.0.0.m", x)
        x = x + ffn(f"blocks{k}.0.1.m", x)
        x = patch_merging(f"blocks{k}.1", x)
        x = x + dw(f"blocks{k}.2.0.m", x)
        x = x + ffn(f"blocks{k}.2.1.m", x)
        for j in range(cfg.depth[k - 1]):
            x = block(f"blocks{k}.{3 + j}", x, k - 1)
    x = x.mean((2, 3))  # (B, C)
    y = head("head", x)
    return (y + head("head_dist", x)) / 2 if cfg.distillation else y


def write_authors_file(cfg, path, layout: str, seed: int) -> dict:
    """An authors' ``.pth`` with distinct random tensors in every layer, keys from ``authors_shapes``:

    * ``plain``: ``{'model': sd}``, float32;
    * ``views``: a training program's file (``model_ema`` holds other values, ``args`` a Namespace),
      1x1 kernels stored 2-D, every tensor of ``model`` a view into ONE shared storage at its own
      offset, and the 2-D kernels and the head transposed views (non-contiguous strides): the
      reader must honour storage offsets and strides;
    * ``half``: float16 tensors under a DistributedDataParallel ``module.`` prefix.
    Returns the state as saved (torch tensors)."""
    import argparse

    shapes = authors_shapes(cfg)
    values = random_state({k: s for k, s in shapes.items() if s != ()}, seed)
    sd = {k: torch.from_numpy(values[k]) if s != () else torch.tensor(7) for k, s in shapes.items()}
    if layout == "plain":
        obj = {"model": sd}
    elif layout == "half":
        obj = {"model": {f"module.{k}": v.half() if v.is_floating_point() else v for k, v in sd.items()}}
    else:
        two_d = {k: v[:, :, 0, 0] if v.ndim == 4 and v.shape[2:] == (1, 1) else v for k, v in sd.items()}
        flat = torch.cat([v.t().flatten() if v.ndim == 2 else v.flatten() for v in two_d.values() if v.is_floating_point()])
        model, offset = {}, 0
        for k, v in two_d.items():
            if not v.is_floating_point():
                model[k] = v
                continue
            n = v.numel()
            piece = flat[offset:offset + n]
            model[k] = piece.view(v.shape[1], v.shape[0]).t() if v.ndim == 2 else piece.view(v.shape)  # (out, in), strides (1, out)
            offset += n
        assert not model["head.l.weight"].is_contiguous() and model["head.l.weight"].storage_offset() > 0
        ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.items()}
        obj = {"model": model, "model_ema": ema, "epoch": 299, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]},
               "args": argparse.Namespace(model="shvit_s1", input_size=224)}
    torch.save(obj, path)
    return {k.removeprefix("module."): v for k, v in obj["model"].items()}


@pytest.mark.parametrize("cfg, layout", [(SMALL, "plain"), (SMALL, "views"), (SMALL, "half"), (S1, "views")],
                         ids=["small-plain", "small-views", "small-half", "s1-views"])
def test_authors_file_gives_the_logits_of_a_forward_by_the_authors_names(tmp_path, cfg, layout):
    path = tmp_path / "authors.pth"
    write_authors_file(cfg, path, layout, seed=31)
    saved = torch.load(path, weights_only=False)["model"]  # torch's own reader, for the reference
    sd = Reads({k.removeprefix("module."): v for k, v in saved.items()})
    x = torch.randn(2, 3, 75, 58, generator=torch.Generator().manual_seed(4))  # odd, non-square
    with torch.no_grad():
        ref = authors_forward(sd, cfg, x)
        assert sd.read == {k for k in sd if not k.endswith("num_batches_tracked")}, "the reference left tensors unread"
        by_torch = shvit_torch.load(path)  # torch.load (weights_only) + the mapping
        by_numpy = from_weights(load_weights(path))  # the numpy .pth reader + the mapping
        assert by_torch.config == cfg and by_numpy.config == cfg
        # eval mode with random BatchNorm statistics: float32, summation order only
        assert_close(f"{layout} authors' file via shvit_torch.load", by_torch(x), ref)
        assert_close(f"{layout} authors' file via the numpy .pth reader", by_numpy(x), ref)


# ================================================================================================
# 2. Preprocessing against torchvision's definitions
# ================================================================================================

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the spec's numbers, not the module's


def torchvision_eval(im: Image.Image, res: int) -> np.ndarray:
    """The authors' evaluation transform (``Resize(int(256 / 224 * res), interpolation=3)``,
    ``CenterCrop(res)``, ``ToTensor()``, ``Normalize(mean, std)``) after ``convert('RGB')``, from
    torchvision's definitions for a PIL image (written here: torchvision does not import beside
    this torch)."""
    im = im.convert("RGB")
    size = int((256 / 224) * res)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - res) / 2.0)), int(round((new_w - res) / 2.0))
    im = im.crop((left, top, left + res, top + res))
    t = torch.from_numpy(np.array(im, np.uint8)).permute(2, 0, 1).to(torch.float32).div(255)  # ToTensor
    mean, std = torch.as_tensor(MEAN, dtype=torch.float32), torch.as_tensor(STD, dtype=torch.float32)
    return t.sub(mean[:, None, None]).div(std[:, None, None]).numpy()  # Normalize


# (width, height, res, mode): odd and even, portrait and landscape, down- and upsampling, one
# image already at its resize size, greyscale and RGBA. The checks below make sure the cases
# still hit the arithmetic a rounding change would move.
IMAGES = [(500, 375, 224, "RGB"), (375, 500, 224, "RGB"), (369, 333, 224, "RGB"), (333, 369, 224, "L"),
          (641, 427, 224, "RGBA"), (256, 292, 224, "RGB"), (63, 51, 40, "RGB"), (51, 63, 40, "RGB"),
          (47, 30, 24, "RGB"), (30, 47, 24, "L"), (39, 39, 32, "RGB")]


def test_the_image_cases_reach_every_rounding():
    """Guards the next test's strength: each rounding choice is exercised where it matters."""
    long_frac, crop_half_odd, resize_frac = set(), set(), set()
    for w, h, res, _ in IMAGES:
        size = 256 / 224 * res
        resize_frac.add(size % 1 >= 0.5)  # int() and round() of the resize size differ
        exact = int(size) * max(w, h) / min(w, h)
        long_frac.add(exact % 1 >= 0.5)  # int() and round() of the longer side differ
        for d in (int(size) - res, int(exact) - res):
            crop_half_odd.add(d % 4 == 3)  # (d / 2) = odd + 0.5: round() and floor differ
    assert long_frac == resize_frac == crop_half_odd == {True, False}
    assert {w < h for w, h, _, _ in IMAGES} == {True, False} and {w % 2 for w, _, _, _ in IMAGES} == {0, 1}


@pytest.mark.parametrize("w, h, res, mode", IMAGES)
def test_preprocessing_is_torchvisions_pixel_for_pixel(tmp_path, w, h, res, mode):
    rng = np.random.default_rng(w * 1000 + h)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = 127 + 60 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None] * np.array([1.0, -0.5, 0.8])
    pixels = np.clip(smooth + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)  # edges everywhere
    im = Image.fromarray(pixels, "RGB")
    if mode == "L":
        im = im.convert("L")
    elif mode == "RGBA":
        im = Image.fromarray(np.dstack([pixels, rng.integers(0, 256, (h, w), np.uint8)]), "RGBA")
    ref = torchvision_eval(im, res)
    assert ref.shape == (3, res, res)
    assert_close(f"preprocess_pil {w}x{h} {mode} at {res}", preprocess_pil(im, res), ref, atol=0, rtol=0, dtype=np.float32)
    im.save(tmp_path / "im.png")  # lossless: the file path decodes the same pixels
    assert_close(f"load_image {w}x{h} {mode} at {res}", load_image(tmp_path / "im.png", res), ref, atol=0, rtol=0)


# ================================================================================================
# 3. float16 where float16 overflows
# ================================================================================================

# One attention block, the model's last (stages 1 and 2 have no blocks: only the stem and the two
# downsamples come before it), so few kernels compile. 128 x 96 gives stage 3 a 2 x 2 map: 4 tokens.
HALF_CFG = SHViTConfig(embed_dim=(16, 24, 32), partial_dim=(4, 8, 8), depth=(0, 0, 1), num_classes=5)
HALF_X = np.random.default_rng(5).standard_normal((2, 3, 128, 96)).astype(np.float32)
F16_MAX = 65504.0
BLOCK = "stages.2.blocks.0"


def overflowing_state(seed: int = 17) -> dict[str, np.ndarray]:
    """Random weights, then three changes in the attention block (all exact in float16):

    * scores: q's and k's first channel are the constant 265 (zero kernel rows, BatchNorm bias),
      which adds 265^2 = 70225 > 65504 to EVERY score: softmax ignores a constant, float16 scores
      are infinite;
    * GroupNorm: the block's depthwise branch scales the attention's pdim channels by ~500, so the
      squared deviations GroupNorm averages reach ~1e5-1e6, infinite in float16;
    * those channels stay out of the FFN (zero kernel columns) and the head divides them by ~300
      (its BatchNorm variance), so the logits stay O(1) and a wrong attention output shows."""
    st = random_state(state_shapes(HALF_CFG), seed)
    qk, pdim = HALF_CFG.qk_dim[2], HALF_CFG.partial_dim[2]
    qkv = f"{BLOCK}.mixer.m.qkv"
    for ch in (0, qk):  # q's first channel, k's first channel
        st[f"{qkv}.c.weight"][ch] = 0
        st[f"{qkv}.bn.weight"][ch], st[f"{qkv}.bn.running_var"][ch] = 1, 1 - 1e-5
        st[f"{qkv}.bn.running_mean"][ch], st[f"{qkv}.bn.bias"][ch] = 0, 265
    dw = f"{BLOCK}.conv.m.bn.weight"
    st[dw][:pdim] = np.sign(st[dw][:pdim]) * 500
    st[f"{BLOCK}.ffn.m.pw1.c.weight"][:, :pdim] = 0
    st["head.bn.running_var"][:pdim] = 1e5
    return st


@pytest.fixture(scope="module")
def half_case(tmp_path_factory):
    path = tmp_path_factory.mktemp("half") / "overflow.safetensors"
    save_weights(path, HALF_CFG, overflowing_state())
    model = shvit_torch.load(path)
    seen = {}
    attention = model.stages[2].blocks[0].mixer.m
    attention.pre_norm.register_forward_hook(lambda m, i, o: seen.update(norm_in=i[0]))
    with torch.no_grad():
        ref = model(torch.from_numpy(HALF_X)).numpy()
        x1 = seen["norm_in"]  # (B, pdim, H, W)
        qkv = attention.qkv(attention.pre_norm(x1)).flatten(2)
        scores = qkv[:, :16].transpose(1, 2) @ qkv[:, 16:32]  # (B, N, N), before the scale
        sq_dev = (x1 - x1.mean((1, 2, 3), keepdim=True)) ** 2
    return path, ref, dict(scores=scores, sq_dev=sq_dev, logits=ref)


def test_the_float16_case_overflows_float16(half_case):
    """The premise, on the float32 reference: every score and many squared deviations exceed
    float16's range, the scores still differ between keys, and the logits are O(1)."""
    _, ref, r = half_case
    scores = r["scores"]
    assert scores.min() > F16_MAX, f"smallest score {scores.min():.0f}: float16 holds it"
    spread = scores.amax(-1) - scores.amin(-1)  # softmax sees only these differences
    assert spread.min() > 0.2, f"the keys' scores differ by {spread.min():.3g}: the attention would be uniform"
    assert r["sq_dev"].max() > 4 * F16_MAX and (r["sq_dev"] > F16_MAX).float().mean() > 0.3
    assert 0.05 < np.abs(ref).max() < 50, f"logits {ref}"


@pytest.mark.slow
def test_float16_model_survives_overflowing_scores_and_groupnorm_on_cpu(half_case):
    """tinygrad in float16 on the CPU device: scores, softmax and GroupNorm statistics in float32
    give the float32 reference's logits; a float16 version of any of them does not (made by
    hand: float16 scores are inf and the softmax NaN; a float16 softmax rounds the scores to
    multiples of 16 and flattens the attention; float16 GroupNorm variance is inf and the
    normalised map zero)."""
    import shvit_tiny

    path, ref, _ = half_case
    y = shvit_tiny.load(path, device="CPU", half=True)(HALF_X)
    assert_close("tiny float16 logits, overflowing scores and GroupNorm", y, ref, **TOL["float16"])
    assert np.abs(y - ref).max() > 1e-6  # it really ran in float16


EMULATED_HALF = pytest.mark.skipif(sys.version_info < (3, 12), reason=(
    "tinygrad's PYTHON emulator has no float16 before Python 3.12 (PythonRenderer.supported_dtypes); "
    "the CPU test above covers the float32 choices"))


@pytest.mark.slow
@EMULATED_HALF
@pytest.mark.parametrize("device", [pytest.param("PYTHON::METAL", marks=pytest.mark.xdist_group("emulated-metal")),
                                    pytest.param("PYTHON::sm_80", marks=pytest.mark.xdist_group("emulated-cuda"))])
def test_float16_model_survives_overflow_on_emulated_gpus(half_case, tmp_path, device):
    path, ref, _ = half_case
    np.save(tmp_path / "x.npy", HALF_X)
    out = tmp_path / "logits.npy"
    script = textwrap.dedent(f"""
        from shvit_tiny import run
        assert run.main(["--weights", {str(path)!r}, "--input", {str(tmp_path / 'x.npy')!r}, "--device", {device!r},
                         "--half", "--save-logits", {str(out)!r}]) == 0
    """)
    env = os.environ | {"PYTHONPATH": os.getcwd(), "SHVIT_CACHE": "0"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_close(f"{device} float16 logits, overflowing scores and GroupNorm", np.load(out), ref, **TOL["float16"])


# ================================================================================================
# 4. The training step's choices, against their definitions (DeiT's recipe, which SHViT follows)
# ================================================================================================

def _train_setup(distillation: bool, label_smoothing: float = 0.0):
    from shvit_torch import train

    torch.manual_seed(0)
    cfg = SMALL.replace(distillation=distillation)
    model = shvit_torch.create(cfg).train()
    teacher = shvit_torch.create(cfg.replace(distillation=False)).eval() if distillation else None
    step = train.Step(model, model, torch.optim.AdamW(train.param_groups(model, 0.05), lr=1e-3), torch.device("cpu"),
                      label_smoothing=label_smoothing, teacher=teacher)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = torch.softmax(torch.randn(4, cfg.num_classes, generator=torch.Generator().manual_seed(2)), 1)  # mixed
    return train, model, teacher, step, x, target


def test_loss_is_label_smoothed_cross_entropy_and_hard_distillation():
    """Without a teacher: cross-entropy against (1 - eps) target + eps / classes. With one: half of
    it on the class head, half a plain cross-entropy of the distillation head against the
    teacher's argmax (DeiT's hard distillation); the class head's logits are returned."""
    for distill in (False, True):
        train, model, teacher, step, x, target = _train_setup(distill, label_smoothing=0.1)
        torch.manual_seed(3)
        loss, logits = train.compute_loss(step, x, target)
        torch.manual_seed(3)
        with torch.no_grad():
            out = model(x)
            heads = out if distill else (out,)
            smooth = 0.9 * target + 0.1 / target.shape[1]
            ce = -(smooth * heads[0].log_softmax(1)).sum(1).mean()
            if distill:
                hard = teacher(x).argmax(1)
                ce = 0.5 * ce - 0.5 * heads[1].log_softmax(1)[torch.arange(len(x)), hard].mean()
        assert_close(f"loss (distillation {distill})", loss.detach(), ce, atol=1e-5)
        assert_close("logits returned are the class head's", logits.detach(), heads[0], atol=1e-5)


def test_weight_decay_only_on_convolution_and_linear_kernels():
    """No decay on any BatchNorm, GroupNorm or bias parameter: found by module type, not by shape."""
    train, model, _, step, _, _ = _train_setup(True)
    decay_of = {id(p): g["weight_decay"] for g in step.opt.param_groups for p in g["params"]}
    assert len(decay_of) == len(list(model.parameters()))
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            kernel = isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and name == "weight"
            assert decay_of[id(p)] == (0.05 if kernel else 0.0), f"{mod_name}.{name}: weight decay {decay_of[id(p)]}"
