"""SHViT's building blocks in tinygrad, named as in the spec, shvit_torch/layers.py and
shvit_numpy/layers.py (diff this file against that one: the math is the same).

Layout: NCHW, as tinygrad's ``conv2d``. Everything is lazy: a call builds a graph that
tinygrad fuses into kernels and compiles for the tensor's device (CPU, CL, METAL, CUDA, ...)
when the result is realised. ``fuse()`` folds BatchNorm into the convolution before it.
"""
from __future__ import annotations

import numpy as np
from tinygrad import Tensor


class Module:
    """A plain container: its sub-layers are attributes (or lists), named like the weights."""

    def children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module) or (isinstance(value, list) and value and isinstance(value[0], Module)):
                yield name, value


def fuse(module):
    """Replace, depth first, every layer that has ``fuse()`` by its folded form."""
    if hasattr(module, "fuse"):
        return module.fuse()
    for name, child in list(module.children()):
        setattr(module, name, [fuse(c) for c in child] if isinstance(child, list) else fuse(child))
    return module


def per_channel(v: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, 1), to broadcast over NCHW."""
    return v.reshape(1, -1, 1, 1)


# ---- layers with weights -----------------------------------------------------------------------

class Conv2d(Module):
    """A convolution (dense or depthwise) with optional bias; weight is (C_out, C_in/groups, k, k)."""

    def __init__(self, cin, cout, k=1, stride=1, padding=0, groups=1, bias=False):
        self.stride, self.padding, self.groups = stride, padding, groups
        self.weight = Tensor.zeros(cout, cin // groups, k, k)
        self.bias = Tensor.zeros(cout) if bias else None

    def __call__(self, x):  # (B, C_in, H, W) -> (B, C_out, H', W')
        return x.conv2d(self.weight, self.bias, groups=self.groups, stride=self.stride, padding=self.padding)


class BatchNorm2d(Module):
    """Inference BatchNorm: y = (x - mean) * g / sqrt(var + eps) + beta, per channel."""

    def __init__(self, c, eps=1e-5):
        self.weight, self.bias = Tensor.ones(c), Tensor.zeros(c)
        self.running_mean, self.running_var = Tensor.zeros(c), Tensor.ones(c)
        self.eps = eps

    def scale_shift(self):
        """The affine map BatchNorm is at inference: y = x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def __call__(self, x):
        scale, shift = self.scale_shift()
        return x * per_channel(scale) + per_channel(shift) if x.ndim == 4 else x * scale + shift


BatchNorm1d = BatchNorm2d  # the same per-channel map on (B, C)


class ConvBN(Module):
    """Conv2d without bias (``c``), then BatchNorm2d (``bn``)."""

    def __init__(self, cin, cout, k=1, stride=1, padding=0, groups=1):
        self.c = Conv2d(cin, cout, k, stride, padding, groups)
        self.bn = BatchNorm2d(cout)

    def __call__(self, x):
        return self.bn(self.c(x))

    def fuse(self) -> Conv2d:
        """BN(conv(x)) = scale * (w * x) + shift = (scale * w) * x + shift, per output channel:
        w' = w * g / sqrt(var + eps),  b' = beta - mean * g / sqrt(var + eps)."""
        scale, shift = self.bn.scale_shift()
        conv = Conv2d(1, 1, stride=self.c.stride, padding=self.c.padding, groups=self.c.groups, bias=True)
        conv.weight = (self.c.weight * scale.reshape(-1, 1, 1, 1)).realize()
        conv.bias = shift.realize()
        return conv


class ReLU(Module):
    def __call__(self, x):
        return x.relu()


class Residual(Module):
    """x + m(x)."""

    def __init__(self, m):
        self.m = m

    def __call__(self, x):
        return x + self.m(x)

    def fuse(self):
        """x + dwconv(x) is one depthwise conv: the identity is a kernel with 1 at its centre tap."""
        if isinstance(self.m, ConvBN) and self.m.c.groups > 1:
            conv = self.m.fuse()
            C, _, k, _ = conv.weight.shape
            centre = np.zeros((C, 1, k, k), np.float32)
            centre[:, 0, k // 2, k // 2] = 1.0
            conv.weight = (conv.weight + Tensor(centre, device=conv.weight.device, dtype=conv.weight.dtype)).realize()
            return conv
        self.m = fuse(self.m)
        return self


class FFN(Module):
    """1x1 C -> 2C, ReLU, 1x1 2C -> C."""

    def __init__(self, c, hidden):
        self.pw1, self.pw2 = ConvBN(c, hidden), ConvBN(hidden, c)

    def __call__(self, x):
        return self.pw2(self.pw1(x).relu())


class GroupNorm(Module):
    """GroupNorm with ONE group: normalise each sample over all of (C, H, W), then a per-channel
    affine. Computed in float32 even when the model runs in float16."""

    def __init__(self, c, eps=1e-5):
        self.weight, self.bias, self.eps = Tensor.ones(c), Tensor.zeros(c), eps

    def __call__(self, x):  # (B, C, H, W)
        h = x.float()
        mean = h.mean(axis=(1, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean(axis=(1, 2, 3), keepdim=True)  # biased, as torch
        h = (h - mean) * (var + self.eps).rsqrt()
        return (h * per_channel(self.weight.float()) + per_channel(self.bias.float())).cast(x.dtype)


class SingleHeadAttention(Module):
    """SHSA: one attention head over the first ``pdim`` channels; the other C - pdim pass untouched.

    The paper's point: heads in multi-head attention are largely redundant, so one head on a
    fraction of the channels keeps the global mixing at a fraction of the cost.
    """

    def __init__(self, dim, qk_dim, pdim):
        self.dim, self.qk_dim, self.pdim = dim, qk_dim, pdim
        self.scale = qk_dim ** -0.5
        self.pre_norm = GroupNorm(pdim)
        self.qkv = ConvBN(pdim, 2 * qk_dim + pdim)
        self.proj = [ReLU(), ConvBN(dim, dim)]

    def attention(self, x):
        """(B, C, H, W) -> attended x1 (B, pdim, H, W), untouched x2 (B, C - pdim, H, W), attn (B, N, N)."""
        B, C, H, W = x.shape
        x1, x2 = x[:, :self.pdim], x[:, self.pdim:]
        qkv = self.qkv(self.pre_norm(x1)).reshape(B, -1, H * W)  # (B, 2qk + pdim, N): tokens are pixels
        q, k, v = qkv[:, :self.qk_dim], qkv[:, self.qk_dim:2 * self.qk_dim], qkv[:, 2 * self.qk_dim:]
        scores = (q.transpose(1, 2) @ k).float() * self.scale  # (B, N, N), float32 even in half mode
        attn = scores.softmax(-1).cast(x.dtype)  # rows are queries, sum to 1
        x1 = (v @ attn.transpose(1, 2)).reshape(B, self.pdim, H, W)  # each query's weighted mean of the values
        return x1, x2, attn

    def __call__(self, x):
        x1, x2, _ = self.attention(x)
        y = x1.cat(x2, dim=1) if x2.shape[1] else x1  # (B, C, H, W)
        for layer in self.proj:  # ReLU, then 1x1 ConvBN C -> C
            y = layer(y)
        return y


class SqueezeExcite(Module):
    """x * sigmoid(fc2(relu(fc1(mean over H, W)))): a per-channel gate from global context."""

    def __init__(self, ch, rd):
        self.fc1, self.fc2 = Conv2d(ch, rd, bias=True), Conv2d(rd, ch, bias=True)

    def __call__(self, x):  # (B, C, H, W)
        s = x.mean(axis=(2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * self.fc2(self.fc1(s).relu()).sigmoid()


class PatchMerging(Module):
    """Halve H and W, C -> C': 1x1 to 4C, ReLU, depthwise 3x3 stride 2, ReLU, SE, 1x1 to C'."""

    def __init__(self, dim, out_dim, rd):
        hid = 4 * dim
        self.conv1 = ConvBN(dim, hid)
        self.conv2 = ConvBN(hid, hid, 3, 2, 1, groups=hid)
        self.se = SqueezeExcite(hid, rd)
        self.conv3 = ConvBN(hid, out_dim)

    def __call__(self, x):
        x = self.conv1(x).relu()
        x = self.conv2(x).relu()
        return self.conv3(self.se(x))


class BasicBlock(Module):
    """Residual depthwise 3x3 (local mixing), residual SHSA (type "s": global mixing), residual FFN."""

    def __init__(self, dim, qk_dim, pdim, kind):
        self.conv = Residual(ConvBN(dim, dim, 3, 1, 1, groups=dim))
        self.mixer = Residual(SingleHeadAttention(dim, qk_dim, pdim)) if kind == "s" else None
        self.ffn = Residual(FFN(dim, 2 * dim))

    def __call__(self, x):
        x = self.conv(x)
        if self.mixer is not None:
            x = self.mixer(x)
        return self.ffn(x)


class Stage(Module):
    """An optional downsample (5 layers, stages 2 and 3), then BasicBlocks."""

    def __init__(self, downsample, blocks):
        self.downsample, self.blocks = downsample, blocks

    def __call__(self, x):
        for layer in (self.downsample or []) + self.blocks:
            x = layer(x)
        return x


class Linear(Module):
    def __init__(self, cin, cout):
        self.weight, self.bias = Tensor.zeros(cout, cin), Tensor.zeros(cout)

    def __call__(self, x):  # (B, C_in) -> (B, C_out)
        return x @ self.weight.T + self.bias


class NormLinear(Module):
    """BatchNorm1d then Linear: the classifier head."""

    def __init__(self, cin, cout):
        self.bn, self.l = BatchNorm1d(cin), Linear(cin, cout)

    def __call__(self, x):
        return self.l(self.bn(x))

    def fuse(self) -> Linear:
        """W (x * s + t) + b = (W * s) x + (W t + b), with s, t the BatchNorm's scale and shift."""
        scale, shift = self.bn.scale_shift()
        lin = Linear(1, 1)
        lin.weight = (self.l.weight * scale.reshape(1, -1)).realize()
        lin.bias = (self.l.weight @ shift + self.l.bias).realize()
        return lin

