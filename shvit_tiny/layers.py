"""SHViT's building blocks in tinygrad, named as in the spec and in shvit_numpy/layers.py (diff
this file against that one: the classes, attributes and math are the same; the idioms differ).

Layout: activations are channels-last, (B, H, W, C), as in shvit_numpy. A 1x1 convolution is then
ONE matrix product over contiguous channels, (B*H*W, C_in) @ (C_in, C_out), and the tokens of
attention are ``x.reshape(B, H*W, C)``. Weights keep PyTorch's layout and names ((C_out,
C_in/groups, k, k)), so the same weight file loads everywhere; the model converts NCHW input once,
at its edge.

Everything is lazy: a call builds a graph, which tinygrad fuses into kernels and compiles for the
tensor's device (CPU, CL, METAL, CUDA, ...) when the result is realised. ``.contiguous()`` marks
where a result is realised into its own buffer instead of being fused into what reads it (each
one says why). This file is the reference path; on the CPU device the model runs the same layer
tree through hand-written kernels instead (shvit_tiny/fast/, tested equal to this).
"""
from __future__ import annotations

import contextlib
import contextvars

from tinygrad import Tensor

from shvit_numpy.tree import Module, fuse

_DEVICE = contextvars.ContextVar("shvit_tiny_device", default=None)


@contextlib.contextmanager
def building_on(device: str | None):
    """Layers made inside this block hold their weights on ``device`` (None: tinygrad's default,
    which tinygrad finds by opening every backend it knows: ~0.5 s)."""
    token = _DEVICE.set(device)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def param(*shape: int) -> Tensor:
    """A weight's placeholder: shaped, never filled (no memory until realised); loading sets
    every one (as shvit_numpy's zeros, but free: S1 makes ~550 on every load)."""
    return Tensor.empty(*shape, device=_DEVICE.get())


# ---- elementary operations ---------------------------------------------------------------------

def taps(x: Tensor, k: int, stride: int, padding: int) -> list[Tensor]:
    """The k*k shifted (and strided) views of the zero-padded map, (B, H, W, C) -> each
    (B, H', W', C), in (ky, kx) order: a k x k convolution is a weighted sum of them."""
    B, H, W, C = x.shape
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    xp = x.pad(((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else x
    return [xp[:, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride, :] for i in range(k) for j in range(k)]


def conv_dense(x: Tensor, w: Tensor, stride: int, padding: int, bias: Tensor | None = None) -> Tensor:
    """Dense convolution as a matrix product: (B*H'*W', k*k*C_in) @ (k*k*C_in, C_out), + bias.

    A 1x1 convolution needs no im2col: the pixels are already the rows, (B*H*W, C_in) @ (C_in, C_out).
    Otherwise the k*k windows are concatenated along the channels (im2col, realised: a product that
    gathered its windows in its inner loop ran 3x slower) and multiplied by the weight matrix.
    """
    cout, cin, k, _ = w.shape
    w_mat = w.permute(2, 3, 1, 0).reshape(k * k * cin, cout)  # rows ordered (ky, kx, c) like the windows
    if k == 1 and stride == 1 and padding == 0:
        cols = x  # (B, H, W, C_in): the pixels are already the rows
    else:
        cols = Tensor.cat(*taps(x.contiguous(), k, stride, padding), dim=-1).contiguous()  # (B, H', W', k*k*C_in)
    B, Ho, Wo, K = cols.shape
    y = cols.reshape(B * Ho * Wo, K) @ w_mat  # (B*H'*W', C_out): one product over all pixels
    return (y if bias is None else y + bias).reshape(B, Ho, Wo, cout)


def conv_depthwise(x: Tensor, w: Tensor, stride: int, padding: int, bias: Tensor | None = None) -> Tensor:
    """Depthwise k x k convolution: each channel its own k x k filter, the sum of k*k shifted maps.

    out[b, y, x, c] = sum over (i, j) of xp[b, s*y + i, s*x + j, c] * w[c, 0, i, j]: tinygrad fuses
    the nine scaled taps into one element-wise kernel.
    """
    C, _, k, _ = w.shape
    w_taps = w.reshape(C, k * k).T  # (k*k, C): the weights of tap (i, j), per channel
    out = None
    for t, tap in enumerate(taps(x.contiguous(), k, stride, padding)):  # (B, H', W', C) each; x realised
        out = tap * w_taps[t] if out is None else out + tap * w_taps[t]  # unpadded (else its producer writes a padded copy)
    # realised: else tinygrad fuses the nine taps into the next matrix product and recomputes them
    # there for every output channel (10x slower)
    return (out if bias is None else out + bias).contiguous()


# ---- layers with weights -----------------------------------------------------------------------

class Conv2d(Module):
    """A convolution (dense or depthwise) with optional bias; weight is (C_out, C_in/groups, k, k)."""

    def __init__(self, cin, cout, k=1, stride=1, padding=0, groups=1, bias=False):
        self.stride, self.padding, self.groups = stride, padding, groups
        self.weight = param(cout, cin // groups, k, k)
        self.bias = param(cout) if bias else None

    def forward(self, x):  # (B, H, W, C_in) -> (B, H', W', C_out)
        w, g = self.weight, self.groups
        if g == 1:
            return conv_dense(x, w, self.stride, self.padding, self.bias)
        if g == w.shape[0] and w.shape[1] == 1:  # depthwise: one input channel per output channel
            return conv_depthwise(x, w, self.stride, self.padding, self.bias)
        raise NotImplementedError("grouped convolutions other than depthwise (SHViT has none)")


class BatchNorm2d(Module):
    """Inference BatchNorm: y = (x - mean) * g / sqrt(var + eps) + beta, per channel (last axis)."""

    def __init__(self, c, eps=1e-5):
        self.weight, self.bias = param(c), param(c)
        self.running_mean, self.running_var = param(c), param(c)
        self.eps = eps

    def scale_shift(self):
        """The affine map BatchNorm is at inference: y = x * scale + shift."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x):
        scale, shift = self.scale_shift()
        return x * scale + shift


BatchNorm1d = BatchNorm2d  # the same per-channel map on (B, C)


class ConvBN(Module):
    """Conv2d without bias (``c``), then BatchNorm2d (``bn``)."""

    def __init__(self, cin, cout, k=1, stride=1, padding=0, groups=1):
        self.c = Conv2d(cin, cout, k, stride, padding, groups)
        self.bn = BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.c(x))

    def fuse(self) -> Conv2d:
        """BN(conv(x)) = scale * (w * x) + shift = (scale * w) * x + shift, per output channel:
        w' = w * g / sqrt(var + eps),  b' = beta - mean * g / sqrt(var + eps)."""
        scale, shift = self.bn.scale_shift()
        conv = Conv2d(1, 1, stride=self.c.stride, padding=self.c.padding, groups=self.c.groups, bias=True)
        conv.weight = self.c.weight * scale.reshape(-1, 1, 1, 1)
        conv.bias = shift
        return conv


class ReLU(Module):
    """max(x, 0)."""

    def forward(self, x):
        return x.relu()


class Residual(Module):
    """x + m(x)."""

    def __init__(self, m):
        self.m = m

    def forward(self, x):
        return x + self.m(x)

    def fuse(self):
        """x + dwconv(x) is one depthwise conv. Channel c of a depthwise conv sees only channel c,
        and the identity on it is the k x k kernel delta with a 1 at the centre tap (padding k // 2):
        x + (w' * x + b') = (w' + delta) * x + b'. So fold BN into the conv, then add 1 at the centre."""
        if isinstance(self.m, ConvBN) and self.m.c.groups == self.m.c.weight.shape[0] and self.m.c.weight.shape[1] == 1:
            conv = self.m.fuse()
            p = conv.weight.shape[2] // 2
            delta = Tensor.ones(1, 1, 1, 1, device=conv.weight.device, dtype=conv.weight.dtype).pad(((0, 0), (0, 0), (p, p), (p, p)))
            conv.weight = conv.weight + delta  # (1, 1, k, k): 1 at the centre tap, 0 around it
            return conv
        self.m = fuse(self.m)
        return self


class FFN(Module):
    """1x1 C -> 2C, ReLU, 1x1 2C -> C."""

    def __init__(self, c, hidden):
        self.pw1, self.pw2 = ConvBN(c, hidden), ConvBN(hidden, c)

    def forward(self, x):
        return self.pw2(self.pw1(x).relu())  # (B, H, W, hidden) -> (B, H, W, C)


class GroupNorm(Module):
    """GroupNorm with ONE group: normalise each sample over all of (H, W, C), then a per-channel
    affine. Computed in float32 even when the model runs in float16 (the variance of a wide map
    overflows float16's range, 65504, long before the activations do)."""

    def __init__(self, c, eps=1e-5):
        self.weight, self.bias, self.eps = param(c), param(c), eps

    def forward(self, x):  # (B, H, W, C) -> same
        h = x.float()
        d = h - h.mean(axis=(1, 2, 3), keepdim=True)  # centred, per sample
        var = (d * d).mean(axis=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1), biased, as torch
        d = d * (var + self.eps).rsqrt()
        return (d * self.weight.float() + self.bias.float()).cast(x.dtype)


class SingleHeadAttention(Module):
    """SHSA: one attention head over the first ``pdim`` channels; the other C - pdim pass untouched.

    The paper's point: heads in multi-head attention are largely redundant, so one head on a
    fraction of the channels keeps the global mixing at a fraction of the cost, while the
    untouched channels carry local (convolutional) information alongside.
    """

    def __init__(self, dim, qk_dim, pdim):
        self.dim, self.qk_dim, self.pdim = dim, qk_dim, pdim
        self.scale = qk_dim ** -0.5
        self.pre_norm = GroupNorm(pdim)
        self.qkv = ConvBN(pdim, 2 * qk_dim + pdim)
        self.proj = [ReLU(), ConvBN(dim, dim)]

    def attention(self, x):
        """(B, H, W, C) -> attended x1 (B, H, W, pdim), untouched x2 (B, H, W, C - pdim), attn (B, N, N)."""
        B, H, W, _ = x.shape
        x1, x2 = x[..., :self.pdim], x[..., self.pdim:]
        qkv = self.qkv(self.pre_norm(x1)).reshape(B, H * W, -1)  # (B, N, 2qk + pdim): tokens are pixels
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.pdim], dim=-1)  # (B, N, qk), (B, N, qk), (B, N, pdim)
        # Tokens are rows here, so the spec's q^T k (channels-first) is q @ k^T, and its v attn^T is attn @ v.
        scores = (q @ k.transpose(1, 2)).float() * self.scale  # (B, N, N), float32 even in a float16 model
        # over the keys: each query's row sums to 1; realised once (else tinygrad recomputes the
        # exponentials inside the next product, once per value channel)
        attn = scores.softmax(-1).cast(x.dtype).contiguous()
        # each query's weighted mean of the values; realised, else the concatenation after runs this
        # product for all C channels
        x1 = (attn @ v).reshape(B, H, W, self.pdim).contiguous()
        return x1, x2, attn

    def forward(self, x):
        x1, x2, _ = self.attention(x)
        y = x1.cat(x2, dim=-1) if x2.shape[-1] else x1  # (B, H, W, C)
        for layer in self.proj:  # ReLU, then 1x1 ConvBN C -> C
            y = layer(y)
        return y


class SqueezeExcite(Module):
    """x * sigmoid(fc2(relu(fc1(mean over H, W)))): a per-channel gate from global context."""

    def __init__(self, ch, rd):
        self.fc1, self.fc2 = Conv2d(ch, rd, bias=True), Conv2d(rd, ch, bias=True)

    def forward(self, x):  # (B, H, W, C)
        s = x.mean(axis=(1, 2), keepdim=True)  # (B, 1, 1, C)
        # the gate realised once per image: else tinygrad recomputes the sigmoid for every pixel
        gate = self.fc2(self.fc1(s).relu()).sigmoid().contiguous()  # (B, 1, 1, C)
        # the gated map realised too: fused into the next product, the gating made it 4x slower
        return (x * gate).contiguous()


class PatchMerging(Module):
    """Halve H and W, C -> C': 1x1 to 4C, ReLU, depthwise 3x3 stride 2, ReLU, SE, 1x1 to C'."""

    def __init__(self, dim, out_dim, rd):
        hid = 4 * dim
        self.conv1 = ConvBN(dim, hid)
        self.conv2 = ConvBN(hid, hid, 3, 2, 1, groups=hid)
        self.se = SqueezeExcite(hid, rd)
        self.conv3 = ConvBN(hid, out_dim)

    def forward(self, x):
        x = self.conv1(x).relu()  # (B, H, W, 4C)
        x = self.conv2(x).relu()  # (B, H/2, W/2, 4C)
        return self.conv3(self.se(x))  # (B, H/2, W/2, C')


class BasicBlock(Module):
    """Residual depthwise 3x3 (local mixing), residual SHSA (type "s": global mixing), residual FFN."""

    def __init__(self, dim, qk_dim, pdim, kind):
        self.conv = Residual(ConvBN(dim, dim, 3, 1, 1, groups=dim))
        self.mixer = Residual(SingleHeadAttention(dim, qk_dim, pdim)) if kind == "s" else None
        self.ffn = Residual(FFN(dim, 2 * dim))

    def forward(self, x):
        x = self.conv(x)
        if self.mixer is not None:
            x = self.mixer(x)
        return self.ffn(x)


class Stage(Module):
    """An optional downsample (5 layers, stages 2 and 3), then BasicBlocks."""

    def __init__(self, downsample, blocks):
        self.downsample, self.blocks = downsample, blocks

    def forward(self, x):
        for layer in (self.downsample or []) + self.blocks:
            x = layer(x)
        return x


class Linear(Module):
    def __init__(self, cin, cout):
        self.weight, self.bias = param(cout, cin), param(cout)

    def forward(self, x):  # (B, C_in) -> (B, C_out)
        return x @ self.weight.T + self.bias


class NormLinear(Module):
    """BatchNorm1d then Linear: the classifier head."""

    def __init__(self, cin, cout):
        self.bn, self.l = BatchNorm1d(cin), Linear(cin, cout)

    def forward(self, x):
        return self.l(self.bn(x))

    def fuse(self) -> Linear:
        """W (x * s + t) + b = (W * s) x + (W t + b), with s, t the BatchNorm's scale and shift."""
        scale, shift = self.bn.scale_shift()
        lin = Linear(1, 1)
        lin.weight = self.l.weight * scale.reshape(1, -1)
        lin.bias = self.l.weight @ shift + self.l.bias
        return lin
