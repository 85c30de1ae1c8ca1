"""The fast path's weights, laid out on the host once, in the order its kernels read them.

A product's weight (K, N) is read by a register tile of P output columns for every k. Packed as
(N/P, K, P), those P columns for every k lie one after another in memory, so the product streams
its weights sequentially instead of reading P floats every N (at batch 1 every weight comes from
memory once per call, 25 MB for S1: read as one stream per tile, stage 3's products took 48 us,
not 90). Output widths that are not a whole number of register tiles are padded with zero columns
(``padded_columns``); so are the stem's convolutions' channels (``padded_stem``: the next one
reads the zero channels with zero weights). A dense k x k convolution reads (k*k*C_in, C_out) and
a depthwise one (k*k, C). Made in numpy from the model's realised weights (tinygrad would compile ~100 one-off
layout kernels), then copied to the device.
"""
from __future__ import annotations

import numpy as np

from shvit_numpy.tree import leaves

from .kernels import tile
from .target import target_has_avx512


def padded_columns(n: int) -> int:
    """A product's output columns, rounded up so the register tile is a whole number of vectors
    wide: to a multiple of 32 on AVX-512 (two 16-float vectors: the 8 x 32 tile), else of 16,
    where that adds at most 1/8 more columns; else to a multiple of 16 where 8 does not divide n.
    A count such as S2's 308 = 4 x 77 (or S3's qkv, 107, a prime) would otherwise get 4- or
    1-channel tiles (S2 at batch 16: 115 ms, padded to 16: 66), and S2's 616 = 8 x 77 8-channel
    ones (its 6 products 616 x 308: 4.0 ms, padded to 640: 2.6 ms, one core of a Xeon). The extra
    columns are computed from zero weights and dropped. Up to 16 columns, and counts 16 divides,
    are left as they are: there the gate ``j < n`` (bias and residual read as 0 past n) would
    divide a tile at a whole vector, which tinygrad turns into a split range the tile no longer
    fits (S4's 336 padded to 352: 16 GFLOPS, 8x slower than 336 in 16-column tiles)."""
    if n <= 16 or n % 16 == 0:
        return n
    for step in (32, 16) if target_has_avx512() else (16,):
        if (padded := -(-n // step) * step) - n <= n // 8:
            return padded
    return n if n % 8 == 0 else -(-n // 16) * 16


def column_block(n: int) -> int:
    """Columns per block of a packed product weight (n padded): 32 where they divide n, else 48
    (kernels.channel_tile's three-vector tile), else 16, 8, ..."""
    return tile(n, (32, 48, 16, 8, 4, 2, 1))


def pack_columns(m: np.ndarray) -> np.ndarray:
    """(K, N) -> (Np/P, K, P), Np = padded_columns(N) (zero columns added), P = column_block(Np):
    packed[jo, k, ji] = m[k, jo*P + ji]."""
    K, N = m.shape
    Np = padded_columns(N)
    P = column_block(Np)
    return np.pad(m, ((0, 0), (0, Np - N))).reshape(K, Np // P, P).transpose(1, 0, 2)


def is_product(conv) -> bool:
    """A 1x1, stride-1, unpadded dense convolution: one matrix product over all pixels."""
    return conv.groups == 1 and conv.weight.shape[-1] == 1 and conv.stride == 1 and conv.padding == 0


def layout(layer, w: np.ndarray) -> np.ndarray:
    """A Conv2d's or Linear's weight as its kernel reads it: products packed, a dense k x k conv
    (k*k*C_in, C_out) with rows in (ky, kx, c) order, a depthwise one (k*k, C)."""
    if w.ndim == 2:  # Linear: y = x @ W.T
        return pack_columns(w.T)
    cout, cin_g, k, _ = w.shape
    if layer.groups == 1:
        m = w.transpose(2, 3, 1, 0).reshape(k * k * cin_g, cout)
        return pack_columns(m) if is_product(layer) else m
    return w.reshape(cout, k * k).T


def host(t) -> np.ndarray:
    """A realised tinygrad Tensor's values (its buffer read directly where it is one), as numpy."""
    base = t.uop.base
    if base is t.uop and base.is_realized:
        return base.buffer.numpy().reshape(t.shape)
    return t.numpy()


def kernel_weights(model) -> dict[int, tuple]:
    """id(layer) -> (weight as its kernel reads it, bias or zeros, both padded as the kernel computes) for every Conv2d and Linear of
    ``model`` (float32 on the CPU device), as realised device Tensors."""
    from ..layers import Conv2d, Linear
    from ..model import device_tensor

    out, stem = {}, padded_stem(model)
    for _, layer in leaves(model, (Conv2d, Linear)):
        w = host(layer.weight).astype(np.float32)
        n = w.shape[0]
        bias = np.zeros(n, np.float32) if layer.bias is None else host(layer.bias).astype(np.float32)
        if id(layer) in stem:  # zero output channels added, and input channels where the conv before added some
            cout, cin = stem[id(layer)]
            w = np.pad(w, ((0, cout - n), (0, cin - w.shape[1]), (0, 0), (0, 0)))
            bias = np.pad(bias, (0, cout - n))
        elif w.ndim == 2 or is_product(layer):  # a product's bias: zeros for its padded columns
            bias = np.pad(bias, (0, padded_columns(n) - n))
        out[id(layer)] = (device_tensor(layout(layer, w), model.device), device_tensor(bias, model.device))
    return out


def padded_channels(n: int) -> int:
    """A stem convolution's output channels, rounded up to a multiple of 16 (one 16-float
    register) where 8 does not divide them or that adds at most a third: S4's 28 and 56 and S3's
    24 ran in 4- and 8-channel tiles (S4's stem: 105 of 340 ms at batch 16 on one core, 57
    padded; S3's first two convolutions 12 and 20 ms, padded 7.4 and 14.7 although the second
    then reads a third more input channels)."""
    padded = -(-n // 16) * 16
    return padded if n % 8 or padded - n <= n // 3 else n


def padded_stem(model) -> dict[int, tuple[int, int]]:
    """id(conv) -> (output, input) channels as the kernels compute them, for each of the stem's
    dense convolutions: outputs padded (``padded_channels``) but the last's (the stages' input,
    kept as it is), inputs as the conv before left them; {} for an unfolded model (a BatchNorm
    after each conv would see the padding)."""
    from ..layers import Conv2d

    convs = model.patch_embed[::2]
    if not all(type(c) is Conv2d and c.groups == 1 and not is_product(c) for c in convs):
        return {}
    out, cin = {}, convs[0].weight.shape[1]
    for conv in convs:
        cout = conv.weight.shape[0] if conv is convs[-1] else padded_channels(conv.weight.shape[0])
        out[id(conv)] = (cout, cin)
        cin = cout
    return out
