"""SHViT's building blocks in plain NumPy, named as in the spec and in shvit_torch/layers.py.

Layout: activations are channels-last, (B, H, W, C). Then a 1x1 convolution is ONE matrix
product over the last axis, (B*H*W, C_in) @ (C_in, C_out), a depthwise 3x3 is nine shifted
multiply-adds of contiguous channel vectors, and the tokens of attention are simply
``x.reshape(B, H*W, C)``. Weights keep PyTorch's layout and names ((C_out, C_in/groups, k, k))
so that the same weight file loads everywhere; the model converts NCHW input once, at its edge.

Every class mirrors its shvit_torch twin attribute for attribute, and its ``forward`` is what
calling the layer runs, as in torch (``Module``, from shvit_numpy/tree.py, which all three
packages walk alike); ``fuse()`` folds BatchNorm into the convolution before it (see
``ConvBN.fuse`` for the algebra).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .tree import Module, fuse

# ---- elementary operations ---------------------------------------------------------------------

def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)); below x = -88 exp(-x) overflows float32 to inf, which rightly gives 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def softmax(s: np.ndarray, axis: int = -1, inplace: bool = False) -> np.ndarray:
    """Numerically stable: exp(s - max) never overflows, and the max cancels in the ratio.
    ``inplace=True`` reuses ``s`` (for a fresh score matrix: no N x N temporaries)."""
    e = np.subtract(s, s.max(axis=axis, keepdims=True), out=s if inplace else None)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def pad_hw(x: np.ndarray, p: int) -> np.ndarray:
    """Zero padding of H and W: (B, H, W, C) -> (B, H+2p, W+2p, C), a fresh C-contiguous array."""
    if not p:
        return x
    B, H, W, C = x.shape
    out = np.zeros((B, H + 2 * p, W + 2 * p, C), x.dtype)  # calloc'd: only the interior is written
    out[:, p:p + H, p:p + W] = x
    return out


def im2col(x: np.ndarray, k: int, stride: int, padding: int) -> np.ndarray:
    """(B, H, W, C) -> (B, H', W', k, k, C) windows: a strided VIEW, no copy until used."""
    x = pad_hw(x, padding)
    B, H, W, C = x.shape
    Ho, Wo = (H - k) // stride + 1, (W - k) // stride + 1
    sb, sh, sw, sc = x.strides
    return as_strided(x, (B, Ho, Wo, k, k, C), (sb, sh * stride, sw * stride, sh, sw, sc), writeable=False)


IM2COL_CHUNK_BYTES = 1 << 20  # the im2col copy is made ~1 MiB (a few images) at a time, while it is in cache


def conv_dense(x: np.ndarray, w: np.ndarray, stride: int, padding: int, bias: np.ndarray | None = None) -> np.ndarray:
    """Dense convolution as a matrix product: (B*H'*W', k*k*C_in) @ (k*k*C_in, C_out), + bias.

    A 1x1 convolution needs no im2col: the pixels are already the rows, (B*H*W, C_in) @ (C_in, C_out).
    Otherwise the im2col rows are copied out of the strided view for a few images at a time and
    multiplied straight into their slice of the output: the same product, split by rows, so the
    copy is still in cache when BLAS reads it (and never the whole batch's worth of memory).
    """
    cout, cin, k, _ = w.shape
    if k == 1 and stride == 1 and padding == 0:  # one GEMM over all pixels (an N-D matmul would
        y = (x.reshape(-1, cin) @ w[:, :, 0, 0].T).reshape(*x.shape[:-1], cout)  # run one per row)
        if bias is not None:
            y += bias
        return y
    cols = im2col(x, k, stride, padding)  # (B, H', W', k, k, C_in), a view
    B, Ho, Wo = cols.shape[:3]
    w_mat = w.transpose(2, 3, 1, 0).reshape(k * k * cin, cout)  # rows ordered (ky, kx, c) like cols
    out = np.empty((B, Ho, Wo, cout), x.dtype)
    step = max(1, IM2COL_CHUNK_BYTES // max(1, cols[0].size * cols.itemsize))
    for b0 in range(0, B, step):
        rows = cols[b0:b0 + step].reshape(-1, k * k * cin)  # the im2col copy: (b*H'*W', k*k*C_in)
        y = out[b0:b0 + step].reshape(-1, cout)  # (b*H'*W', C_out), a view of the output
        np.matmul(rows, w_mat, out=y)
        if bias is not None:
            y += bias
    return out


def conv_grouped(x: np.ndarray, w: np.ndarray, stride: int, padding: int, groups: int,
                 bias: np.ndarray | None = None) -> np.ndarray:
    """Grouped convolution as ONE batched matrix product over the groups:
    (G, B*H'*W', k*k*C_in/G) @ (G, k*k*C_in/G, C_out/G). (SHViT itself only has dense and
    depthwise convolutions; this is the general case, for completeness.)"""
    cout, cin_g, k, _ = w.shape
    g = groups
    cols = im2col(x, k, stride, padding)  # (B, H', W', k, k, C_in)
    B, Ho, Wo = cols.shape[:3]
    cols = cols.reshape(B * Ho * Wo, k * k, g, cin_g).transpose(2, 0, 1, 3).reshape(g, B * Ho * Wo, k * k * cin_g)
    w_mat = w.reshape(g, cout // g, cin_g, k, k).transpose(0, 3, 4, 2, 1).reshape(g, k * k * cin_g, cout // g)
    y = (cols @ w_mat).transpose(1, 0, 2).reshape(B, Ho, Wo, cout)  # (G, M, C_out/G) -> (M, C_out), group-major
    if bias is not None:
        y += bias
    return y


def conv_depthwise(x: np.ndarray, w: np.ndarray, stride: int, padding: int, bias: np.ndarray | None = None) -> np.ndarray:
    """Depthwise k x k convolution: each channel its own k x k filter, the sum of k*k shifted maps.

    out[b, y, x, c] = sum over (i, j) of xp[b, s*y + i, s*x + j, c] * w[c, 0, i, j]: tap (i, j) is
    ONE vectorised pass over a strided window of the padded map, scaled per channel (nine passes
    for 3x3), never a loop over pixels.
    """
    C, _, k, _ = w.shape
    xp = pad_hw(x, padding)  # (B, H + 2p, W + 2p, C)
    B, H, W, _ = xp.shape
    Ho, Wo = (H - k) // stride + 1, (W - k) // stride + 1
    out = np.zeros((B, Ho, Wo, C), x.dtype)
    for i in range(k):
        for j in range(k):
            window = xp[:, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride]  # (B, Ho, Wo, C)
            out += window * w[:, 0, i, j]  # tap (i, j): per-channel weights broadcast over the last axis
    if bias is not None:
        out += bias
    return out


# ---- layers with weights -----------------------------------------------------------------------

class Conv2d(Module):
    """A convolution (dense, depthwise or grouped) with optional bias; weight is (C_out, C_in/groups, k, k)."""

    def __init__(self, cin, cout, k=1, stride=1, padding=0, groups=1, bias=False):
        self.stride, self.padding, self.groups = stride, padding, groups
        self.weight = np.zeros((cout, cin // groups, k, k), np.float32)
        self.bias = np.zeros(cout, np.float32) if bias else None

    def forward(self, x):  # (B, H, W, C_in) -> (B, H', W', C_out)
        w, g = self.weight, self.groups
        if g == 1:
            return conv_dense(x, w, self.stride, self.padding, self.bias)
        if g == w.shape[0] and w.shape[1] == 1:  # depthwise: one input channel per output channel
            return conv_depthwise(x, w, self.stride, self.padding, self.bias)
        return conv_grouped(x, w, self.stride, self.padding, g, self.bias)


class BatchNorm2d(Module):
    """Inference BatchNorm: y = (x - mean) * g / sqrt(var + eps) + beta, per channel (last axis)."""

    def __init__(self, c, eps=1e-5):
        self.weight, self.bias = np.ones(c, np.float32), np.zeros(c, np.float32)
        self.running_mean, self.running_var = np.zeros(c, np.float32), np.ones(c, np.float32)
        self.eps = eps

    def scale_shift(self):
        """The affine map BatchNorm is at inference: y = x * scale + shift."""
        scale = self.weight / np.sqrt(self.running_var + np.float32(self.eps))
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
        conv.weight = (self.c.weight * scale[:, None, None, None]).astype(np.float32)
        conv.bias = shift.astype(np.float32)
        return conv


class ReLU(Module):
    """max(x, 0). ``inplace=True`` (as torch's flag) overwrites x: the model uses it only where x
    is a fresh temporary (after a stem convolution, on the attention output)."""

    def __init__(self, inplace: bool = False):
        self.inplace = inplace

    def forward(self, x):
        return np.maximum(x, 0, out=x if self.inplace else None)


def relu_(x: np.ndarray) -> np.ndarray:
    """In-place ReLU for temporaries a layer has just made itself."""
    return np.maximum(x, 0, out=x)


class Residual(Module):
    """x + m(x)."""

    def __init__(self, m):
        self.m = m

    def forward(self, x):
        y = self.m(x)  # a fresh array: add the shortcut into it (x + m(x), one allocation fewer)
        y += x
        return y

    def fuse(self):
        """x + dwconv(x) is one depthwise conv. Channel c of a depthwise conv sees only channel c,
        and the identity on it is the k x k kernel delta with a 1 at the centre tap (padding k // 2):
        x + (w' * x + b') = (w' + delta) * x + b'. So fold BN into the conv, then add 1 at the centre."""
        if isinstance(self.m, ConvBN) and self.m.c.groups == self.m.c.weight.shape[0] and self.m.c.weight.shape[1] == 1:
            conv = self.m.fuse()
            conv.weight[:, 0, conv.weight.shape[2] // 2, conv.weight.shape[3] // 2] += 1.0
            return conv
        self.m = fuse(self.m)
        return self


class FFN(Module):
    """1x1 C -> 2C, ReLU, 1x1 2C -> C."""

    def __init__(self, c, hidden):
        self.pw1, self.pw2 = ConvBN(c, hidden), ConvBN(hidden, c)

    def forward(self, x):
        return self.pw2(relu_(self.pw1(x)))  # (B, H, W, hidden) -> (B, H, W, C)


class GroupNorm(Module):
    """GroupNorm with ONE group: normalise each sample over all of (H, W, C), then a per-channel affine."""

    def __init__(self, c, eps=1e-5):
        self.weight, self.bias, self.eps = np.ones(c, np.float32), np.zeros(c, np.float32), eps

    def forward(self, x):  # (B, H, W, C) -> same
        d = x - x.mean(axis=(1, 2, 3), keepdims=True)  # centred, per sample
        var = np.square(d).mean(axis=(1, 2, 3), keepdims=True)  # (B, 1, 1, 1), biased, as torch
        d /= np.sqrt(var + np.float32(self.eps))
        d *= self.weight
        d += self.bias
        return d


class SingleHeadAttention(Module):
    """SHSA: one attention head over the first ``pdim`` channels; the other C - pdim pass untouched.

    The paper's point: heads in multi-head attention are largely redundant, so one head on a
    fraction of the channels keeps the global mixing at a fraction of the cost, while the
    untouched channels carry local (convolutional) information alongside.
    """

    def __init__(self, dim, qk_dim, pdim):
        self.dim, self.qk_dim, self.pdim = dim, qk_dim, pdim
        self.scale = np.float32(qk_dim ** -0.5)
        self.pre_norm = GroupNorm(pdim)
        self.qkv = ConvBN(pdim, 2 * qk_dim + pdim)
        self.proj = [ReLU(inplace=True), ConvBN(dim, dim)]
        self.keep_attention, self.last_attention = False, None

    def attention(self, x):
        """(B, H, W, C) -> attended x1 (B, H, W, pdim), untouched x2 (B, H, W, C - pdim), attn (B, N, N)."""
        B, H, W, _ = x.shape
        x1, x2 = x[..., :self.pdim], x[..., self.pdim:]
        qkv = self.qkv(self.pre_norm(x1)).reshape(B, H * W, -1)  # (B, N, 2qk + pdim): tokens are pixels
        q, k, v = np.split(qkv, [self.qk_dim, 2 * self.qk_dim], axis=-1)  # (B, N, qk), (B, N, qk), (B, N, pdim)
        # Tokens are rows here, so the spec's q^T k (channels-first) is q @ k^T, and its v attn^T is attn @ v.
        scores = q @ k.transpose(0, 2, 1)  # (B, N, N): query x key dot products
        scores *= self.scale
        attn = softmax(scores, inplace=True)  # over the keys: each query's row sums to 1
        x1 = (attn @ v).reshape(B, H, W, self.pdim)  # each query's weighted mean of the values
        return x1, x2, attn

    def forward(self, x):
        x1, x2, attn = self.attention(x)
        if self.keep_attention:
            self.last_attention = attn
        y = np.concatenate([x1, x2], axis=-1)  # (B, H, W, C)
        for layer in self.proj:  # ReLU, then 1x1 ConvBN C -> C
            y = layer(y)
        return y


class SqueezeExcite(Module):
    """x * sigmoid(fc2(relu(fc1(mean over H, W)))): a per-channel gate from global context."""

    def __init__(self, ch, rd):
        self.fc1, self.fc2 = Conv2d(ch, rd, bias=True), Conv2d(rd, ch, bias=True)

    def forward(self, x):  # (B, H, W, C)
        s = x.mean(axis=(1, 2), keepdims=True)  # (B, 1, 1, C)
        return x * sigmoid(self.fc2(np.maximum(self.fc1(s), 0)))


class PatchMerging(Module):
    """Halve H and W, C -> C': 1x1 to 4C, ReLU, depthwise 3x3 stride 2, ReLU, SE, 1x1 to C'."""

    def __init__(self, dim, out_dim, rd):
        hid = 4 * dim
        self.conv1 = ConvBN(dim, hid)
        self.conv2 = ConvBN(hid, hid, 3, 2, 1, groups=hid)
        self.se = SqueezeExcite(hid, rd)
        self.conv3 = ConvBN(hid, out_dim)

    def forward(self, x):
        x = relu_(self.conv1(x))  # (B, H, W, 4C)
        x = relu_(self.conv2(x))  # (B, H/2, W/2, 4C)
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
        self.weight, self.bias = np.zeros((cout, cin), np.float32), np.zeros(cout, np.float32)

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
        lin.weight = (self.l.weight * scale[None, :]).astype(np.float32)
        lin.bias = (self.l.weight @ shift + self.l.bias).astype(np.float32)
        return lin
