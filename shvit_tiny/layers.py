"""SHViT's building blocks in tinygrad, named as in the spec, shvit_torch/layers.py and
shvit_numpy/layers.py (diff this file against that one: the math and the layout are the same).

Layout: channels-last inside, (B, H, W, C), as shvit_numpy. A 1x1 convolution is then ONE
matrix product over contiguous channels, (B*H*W, C_in) @ (C_in, C_out), the form tinygrad's
code generator turns into its best kernels (NCHW 1x1 convolutions on the 7x7 and 4x4 maps of
stages 2 and 3 ran 3-5x slower on the CPU device: a pixel axis of 49 or 16 does not vectorise).
A layer called on its own, from outside the model, takes and returns NCHW like its torch twin:
``Module.__call__`` converts at that edge only (see ``channels_last``).

Everything is lazy: a call builds a graph that tinygrad fuses into kernels and compiles for the
tensor's device (CPU, CL, METAL, CUDA, ...) when the result is realised. Weights keep PyTorch's
layout and names ((C_out, C_in/groups, k, k)); ``prepare()`` caches each in the layout its
product reads, and ``fuse()`` folds BatchNorm into the convolution before it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import numpy as np
from tinygrad import Tensor, UOp, dtypes
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.uop.ops import AxisType, KernelInfo

_CHANNELS_LAST = contextvars.ContextVar("shvit_tiny_channels_last", default=False)
_DEVICE = contextvars.ContextVar("shvit_tiny_device", default=None)


@contextlib.contextmanager
def building_on(device: str | None):
    """Layers made inside this block hold their initial weights on ``device`` (None: tinygrad's
    default, which tinygrad finds by opening every backend it knows: ~0.5 s)."""
    token = _DEVICE.set(device)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def param(*shape: int) -> Tensor:
    """A weight's placeholder on the building device: shaped, never filled (no memory until
    realised); ``load_state`` or ``load`` sets every one. Cheap on purpose: S1 has ~550, made on
    every load (a constant each cost ~4x more: 0.4 s of a 1.7 s warm start)."""
    return Tensor.empty(*shape, device=_DEVICE.get())


@contextlib.contextmanager
def channels_last():
    """Inside this block, layers take and return (B, H, W, C): the model's own forward pass."""
    token = _CHANNELS_LAST.set(True)
    try:
        yield
    finally:
        _CHANNELS_LAST.reset(token)


class Module:
    """A plain container: its sub-layers are attributes (or lists), named like the weights."""

    def children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module) or (isinstance(value, list) and value and isinstance(value[0], Module)):
                yield name, value

    def __call__(self, x: Tensor, **fused) -> Tensor:
        """``forward`` on channels-last maps inside the model; NCHW in and out when called alone.
        ``fused``: an activation or residual the layer's last product applies (``epilogue``)."""
        if x.ndim != 4 or _CHANNELS_LAST.get():
            return self.forward(x, **fused)
        with channels_last():
            return self.forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def fuse(module):
    """Replace, depth first, every layer that has ``fuse()`` by its folded form."""
    if hasattr(module, "fuse"):
        return module.fuse()
    for name, child in list(module.children()):
        setattr(module, name, [fuse(c) for c in child] if isinstance(child, list) else fuse(child))
    return module


def prepare(module) -> None:
    """Cache, once, every weight in the layout its product reads (lazily: ``tensors`` collects
    them all for ONE realisation, so the fold, cast and layout kernels are scheduled together)."""
    if hasattr(module, "prepare"):
        module.prepare()
    for _, child in module.children():
        for c in child if isinstance(child, list) else [child]:
            prepare(c)


def tensors(module) -> list[Tensor]:
    """Every tensor held by the layer tree: weights, biases, BatchNorm statistics, cached layouts."""
    out = [v for v in vars(module).values() if isinstance(v, Tensor)]
    for _, child in module.children():
        for c in child if isinstance(child, list) else [child]:
            out += tensors(c)
    return out


# ---- elementary operations ---------------------------------------------------------------------

def taps(x: Tensor, k: int, stride: int, padding: int):
    """The k*k shifted (and strided) views of a zero-padded map, (B, H, W, C) -> each
    (B, H', W', C), in (ky, kx) order: a k x k convolution is a weighted sum of them."""
    B, H, W, C = x.shape
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    xp = x.pad(((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else x
    return [xp[:, i:i + stride * (Ho - 1) + 1:stride, j:j + stride * (Wo - 1) + 1:stride, :] for i in range(k) for j in range(k)]


# ---- the CPU device's convolutions ------------------------------------------------------------
# tinygrad's own kernel heuristic tiles a matrix product 4 x 4 (4 rows x one float4) and reaches
# about 30 GFLOPS on one core here. The four custom kernels below state the same sums in
# tinygrad's UOp language with a wider register tile (up to 8 rows x 32 output channels on
# AVX-512, 4 x 16 on AVX2: many accumulators per loaded value, product_tile); products read their
# weights packed (pack_columns); a dense 3x3 convolution reads its windows and its zero padding
# straight from the map (no im2col or padded copy), and bias, ReLU and residual are applied before
# the store. tinygrad's C code then moves 4 floats at a time; wide_vectors.py widens these
# kernels' loads and stores to 8 (16 on AVX-512), so clang multiplies in 256-bit (512-bit)
# registers: the products run at 120-235 GFLOPS (60 with 4-float vectors). S1 on one core: ~35
# img/s with the generic ops, ~357 with these (make bench, 2026-12-02). Other devices (GPUs,
# OpenCL) and float16 keep tinygrad's generic ops, which it tiles itself.

def cpu_kernels_on(device: str, dtype) -> bool:
    """Whether layers on ``device`` in ``dtype`` run this package's CPU kernels."""
    return device == "CPU" and dtype == dtypes.float32


def use_cpu_kernels(*ts: Tensor) -> bool:
    return all(cpu_kernels_on(t.device, t.dtype) for t in ts)


def padded_columns(n: int) -> int:
    """A product's output columns, rounded up to a multiple of 16 where 8 does not divide them:
    the register tiles are 8 to 32 channels wide, and a count such as S2's 308 = 4 x 77 (or S3's
    qkv, 107, a prime) would otherwise get 4- or 1-channel tiles (S2 at batch 16: 115 ms, padded
    66). The extra columns are computed from zero weights and dropped. Up to 16 columns are left
    as they are: cheap either way, and there the gate ``j < n`` would divide the tile evenly, which
    tinygrad turns into a split range the tile no longer fits."""
    return n if n % 8 == 0 or n <= 16 else -(-n // 16) * 16


def column_block(n: int) -> int:
    """Columns per block of a packed product weight (n padded): 32 where they divide n, else 16."""
    return tile(n, (32, 16, 8, 4, 2, 1))


def pack_columns(w: Tensor) -> Tensor:
    """A product's weight (K, N) -> (Np/P, K, P), Np = padded_columns(N) (zero columns added),
    P = column_block(Np): a register tile's weights, P columns for every k, then lie one after
    another in memory, so the product reads them as one sequential stream instead of P floats
    every N (see gemm_kernel). Not realised."""
    K, N = w.shape
    Np = padded_columns(N)
    w = w.pad(((0, 0), (0, Np - N))) if Np > N else w
    P = column_block(Np)
    return w.reshape(K, Np // P, P).permute(1, 0, 2)


def kernel_epilogue(y: UOp, relu: bool, residual: UOp | None) -> UOp:
    """What the layer after a product would do, done on its result while in registers."""
    y = y.maximum(0.0) if relu else y
    return y if residual is None else y + residual


def epilogue(y: Tensor, relu: bool = False, residual: Tensor | None = None) -> Tensor:
    """The same on a lazy tensor (tinygrad fuses it into the kernel that makes y)."""
    y = y.relu() if relu else y
    return y if residual is None else y + residual


def tile(size: int, choices=(4, 2, 1)) -> int:
    """The largest register-tile length in ``choices`` that divides ``size``."""
    return next(t for t in choices if size % t == 0)


def upcasts(sizes: tuple[int, ...], *range_amount) -> tuple:
    """UPCAST opts for (range number, amount) pairs. tinygrad drops ranges of size 1 before it
    applies opts, so a range's axis is the number of larger ranges before it."""
    return tuple(Opt(OptOps.UPCAST, sum(s > 1 for s in sizes[:r]), amount) for r, amount in range_amount if amount > 1)


def channel_tile(n: int) -> tuple:
    """Output channels a register tile holds: 16 (8, 4, ... where 16 does not divide), and 32 as
    two upcasts (16 then 2) while compiling for 512-bit vectors (devices.compile_context): 32
    registers of 16 floats hold 8 x 32 accumulators (2 x 16-float vectors per row); 256-bit
    AVX2 has 16 registers and would spill them. Measured: products +20%, 3x3 convs +35%."""
    from tinygrad.helpers import DEV

    first = tile(n, (16, 8, 4, 2, 1))
    wide = "prefer-vector-width=512" in (DEV.target("CPU").arch or "")
    return (first, 2) if wide and n % 32 == 0 else (first,)


def product_tile(m: int, n: int) -> tuple[int, tuple]:
    """A product's register tile, (rows, channel upcasts), for the CPU clang compiles for.

    AVX-512 (32 registers): up to 8 rows x 32 channels, the largest row count up to 8 that divides
    m, so the 7x7 maps of stage 2 (m = 49 at batch 1) get 7 rows, not 1. AVX2 (16 registers of 8
    floats): 4 rows x 16 channels (8 accumulators) where 4 divides m; else up to 7 rows x 8
    channels (7 accumulators: 7 x 16 would spill). Measured on one core (AMD EPYC, 224x448 by 49
    rows): AVX-512 1 row 55 GFLOPS, 7 rows 228; AVX2 1 x 16 34, 7 x 16 65, 7 x 8 90.
    """
    from .devices import target_has_avx512

    if target_has_avx512():
        return tile(m, (8, 7, 6, 5, 4, 3, 2, 1)), channel_tile(n)
    if m % 4 == 0:
        return 4, channel_tile(n)
    rows = tile(m, (7, 6, 5, 3, 2, 1))
    return rows, channel_tile(n) if rows <= 2 else (tile(n, (8, 4, 2, 1)),)


def channel_upcasts(sizes: tuple[int, ...], r: int, amounts: tuple) -> tuple:
    """The UPCAST opts of ``channel_tile`` for range ``r`` (the second splits what the first left)."""
    return tuple(o for amount in amounts for o in upcasts(sizes, (r, amount)))


def gemm_kernel(C: UOp, A: UOp, B: UOp, bias: UOp, *res: UOp, relu: bool = False) -> UOp:
    """C = A @ W + bias, (M, K) @ (K, N) + (N,), then ReLU and + res[0] (M, N) if asked; W packed
    (pack_columns): B[jo, k, ji] = W[k, jo*P + ji]; C has the padded width Np (bias and residual
    read as 0 past N). Tiled up to 8 rows x 32 columns (product_tile).
    At batch 1 every weight comes from memory once per call (S1's are 25 MB, more than the
    caches): read as one stream per tile, the products of stage 3 (16 rows) took 48 us, not 90."""
    M, N = C.shape
    P, K = B.shape[2], A.shape[1]
    i, jo, ji = UOp.range(M, 0), UOp.range(N // P, 1), UOp.range(P, 2)
    k = UOp.range(K, 3, axis_type=AxisType.REDUCE)
    j = jo * P + ji
    n = bias.shape[0]  # the real width; C's columns past it are padding

    def upto_n(t: UOp) -> UOp:
        return t if n == N else (j < n).where(t, 0.0)  # a gated load: no read past N

    C = C[i, j].set(0.0)
    C = C[i, j].set(C.after(k)[i, j] + A[i, k] * B[jo, k, ji], end=k)  # the sum over K, in registers
    C = C[i, j].set(kernel_epilogue(C[i, j] + upto_n(bias[j]), relu, upto_n(res[0][i, j]) if res else None))
    rows, channels = product_tile(M, N)
    sizes = (M, N // P, P)
    opts = channel_upcasts(sizes, 2, channels) + upcasts(sizes, (0, rows))  # channel tiles divide P (both from N's factors of 2)
    return C.end(i, jo, ji).sink(arg=KernelInfo(name=f"gemm_{M}_{N}_{K}", opts_to_apply=opts))


def attend_kernel(O: UOp, A: UOp, QKV: UOp, offset: int) -> UOp:
    """Each query's weighted sum of the values, per image: O[b, i, c] = sum over j of
    A[b, i, j] * QKV[b, j, offset + c], with A the attention (B, N, N) and the values read in
    place from the qkv map (B, N, 2*qk + pdim) (no transposed copy). Tiled as a product
    (product_tile): tinygrad's generic reduce ran this at 9 GFLOPS, 0.4 ms per block at batch 16."""
    Bt, N, P = O.shape
    b, i, c = UOp.range(Bt, 0), UOp.range(N, 1), UOp.range(P, 2)
    j = UOp.range(N, 3, axis_type=AxisType.REDUCE)
    O = O[b, i, c].set(0.0)
    O = O[b, i, c].set(O.after(j)[b, i, c] + A[b, i, j] * QKV[b, j, offset + c], end=j)
    rows, channels = product_tile(N, P)
    sizes = (Bt, N, P)
    opts = channel_upcasts(sizes, 2, channels) + upcasts(sizes, (1, rows))
    return O.end(b, i, c).sink(arg=KernelInfo(name=f"attend_{N}_{P}", opts_to_apply=opts))


def padded_load(X: UOp, b: UOp, iy: UOp, ix: UOp, c: UOp) -> UOp:
    """X[b, iy, ix, c] of a map zero-padded on the fly: outside it the load is skipped and 0 is
    read (a gated load), so no padded copy of the map is ever written."""
    H, W = X.shape[1], X.shape[2]
    return ((iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)).where(X[b, iy, ix, c], 0.0)


def conv_kernel(O: UOp, X: UOp, Wm: UOp, bias: UOp, k: int, stride: int, padding: int, relu: bool = False) -> UOp:
    """A dense k x k convolution read straight from the map (no im2col copy):
    O[b, y, x, n] = bias[n] + sum over (ky, kx, c) of X[b, s*y + ky - p, s*x + kx - p, c] * Wm[(ky*k + kx)*C + c, n],
    with O (B, H', W', N), X (B, H, W, C), Wm (k*k*C, N); tiled 4 output pixels x 16 (or 32) channels."""
    B, Ho, Wo, N = O.shape
    C = X.shape[3]
    b, y, x, n = (UOp.range(size, axis) for axis, size in enumerate((B, Ho, Wo, N)))
    ky, kx, c = (UOp.range(size, axis, axis_type=AxisType.REDUCE) for axis, size in ((4, k), (5, k), (6, C)))
    tap = padded_load(X, b, stride * y + ky - padding, stride * x + kx - padding, c)
    O = O[b, y, x, n].set(0.0)
    O = O[b, y, x, n].set(O.after(ky, kx, c)[b, y, x, n] + tap * Wm[(ky * k + kx) * C + c, n], end=(ky, kx, c))
    O = O[b, y, x, n].set(kernel_epilogue(O[b, y, x, n] + bias[n], relu, None))
    tx = tile(Wo)
    sizes = (B, Ho, Wo, N)
    opts = channel_upcasts(sizes, 3, channel_tile(N)) + upcasts(sizes, (2, tx), (1, tile(Ho, (4 // tx, 1))))  # 4 pixels: 4 x 1 or 2 x 2
    return O.end(b, y, x, n).sink(arg=KernelInfo(name=f"conv{k}s{stride}_{Ho}_{Wo}_{N}_{C}", opts_to_apply=opts))


def depthwise_kernel(O: UOp, X: UOp, Wt: UOp, bias: UOp, k: int, stride: int, padding: int, relu: bool = False) -> UOp:
    """A depthwise k x k convolution, its k*k taps written out (no loop):
    O[b, y, x, c] = bias[c] + sum over (ky, kx) of X[b, s*y + ky - p, s*x + kx - p, c] * Wt[ky*k + kx, c];
    tiled over 16 channels (the generic form unrolled whole 7x7 maps, channel by channel)."""
    B, Ho, Wo, C = O.shape
    b, y, x, c = (UOp.range(size, axis) for axis, size in enumerate((B, Ho, Wo, C)))
    acc = bias[c]
    for ky in range(k):
        for kx in range(k):
            acc = acc + padded_load(X, b, stride * y + (ky - padding), stride * x + (kx - padding), c) * Wt[ky * k + kx, c]
    opts = upcasts((B, Ho, Wo, C), (3, tile(C, (16, 8, 4, 2, 1))))
    out = O[b, y, x, c].store(kernel_epilogue(acc, relu, None))
    return out.end(b, y, x, c).sink(arg=KernelInfo(name=f"dw{k}s{stride}_{Ho}_{Wo}_{C}", opts_to_apply=opts))


def bias_or_zeros(bias: Tensor | None, n: int, like: Tensor) -> Tensor:
    return bias if bias is not None else Tensor.zeros(n, device=like.device, dtype=like.dtype).contiguous()


def matmul_bias(x: Tensor, w: Tensor, bias: Tensor | None, relu: bool = False, residual: Tensor | None = None,
                n: int | None = None) -> Tensor:
    """(M, K) @ W (+ bias), then ReLU and + residual (M, n) if asked. W is (K, n), or on the CPU
    device already packed (pack_columns; prepared layers hold it so: then pass n)."""
    if not use_cpu_kernels(x, w):
        return epilogue(x @ w if bias is None else x @ w + bias, relu, residual)
    if w.ndim == 2:
        n, w = w.shape[1], pack_columns(w).contiguous()
    padded = w.shape[0] * w.shape[2]
    out = Tensor.empty(x.shape[0], padded, device=x.device, dtype=x.dtype)
    res = () if residual is None else (residual,)
    fxn = functools.partial(gemm_kernel, relu=relu)
    y = out.custom_kernel(x, w, bias_or_zeros(bias, n, x), *res, fxn=fxn)[0]
    return y if padded == n else y[:, :n]


def conv_dense(x: Tensor, w_mat: Tensor, bias: Tensor | None, k: int, stride: int, padding: int,
               relu: bool = False, residual: Tensor | None = None, n: int | None = None) -> Tensor:
    """Dense convolution, (B, H, W, C_in) -> (B, H', W', C_out), as a matrix product with
    ``w_mat`` (k*k*C_in, C_out): a 1x1 convolution is one product over all pixels, (B*H*W, C_in)
    @ (C_in, C_out). A k x k one is the CPU kernel above, or elsewhere an im2col matrix (made
    contiguous: a product that gathered its windows in its inner loop ran 3x slower) times w_mat.
    """
    B, H, W, C = x.shape
    if k == 1 and stride == 1 and padding == 0:  # pixels as ONE row axis
        res = None if residual is None else residual.reshape(B * H * W, -1)
        return matmul_bias(x.reshape(B * H * W, C), w_mat, bias, relu, res, n).reshape(B, H, W, -1)
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    if use_cpu_kernels(x, w_mat):
        out = Tensor.empty(B, Ho, Wo, w_mat.shape[1], device=x.device, dtype=x.dtype)
        fxn = functools.partial(conv_kernel, k=k, stride=stride, padding=padding, relu=relu)
        return epilogue(out.custom_kernel(x, w_mat, bias_or_zeros(bias, w_mat.shape[1], x), fxn=fxn)[0], False, residual)
    cols = Tensor.cat(*taps(x.contiguous(), k, stride, padding), dim=-1).contiguous()  # (B, H', W', k*k*C_in), (ky, kx, c) order
    return epilogue(matmul_bias(cols.reshape(B * Ho * Wo, k * k * C), w_mat, bias).reshape(B, Ho, Wo, -1), relu, residual)


def conv_depthwise(x: Tensor, w_taps: Tensor, bias: Tensor | None, k: int, stride: int, padding: int,
                   relu: bool = False, residual: Tensor | None = None) -> Tensor:
    """Depthwise convolution: each channel its own k x k filter, a sum of k*k shifted maps
    scaled per channel (one element-wise kernel); ``w_taps`` is (k*k, C). Realised."""
    B, H, W, C = x.shape
    if use_cpu_kernels(x, w_taps):
        Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
        out = Tensor.empty(B, Ho, Wo, C, device=x.device, dtype=x.dtype)
        fxn = functools.partial(depthwise_kernel, k=k, stride=stride, padding=padding, relu=relu)
        return epilogue(out.custom_kernel(x, w_taps, bias_or_zeros(bias, C, x), fxn=fxn)[0], False, residual)
    out = None
    x = x.contiguous()  # realised unpadded: else tinygrad writes the producer straight into a padded buffer
    for t, tap in enumerate(taps(x, k, stride, padding)):  # (B, H', W', C) each
        out = tap * w_taps[t] if out is None else out + tap * w_taps[t]
    # realised here: tinygrad would otherwise fuse these nine taps into the next matrix
    # product and recompute them for every output channel (10x slower)
    return epilogue(out if bias is None else out + bias, relu, residual).contiguous()


# ---- layers with weights -----------------------------------------------------------------------

class Conv2d(Module):
    """A convolution (dense or depthwise) with optional bias; weight is (C_out, C_in/groups, k, k)."""

    def __init__(self, cin, cout, k=1, stride=1, padding=0, groups=1, bias=False):
        self.stride, self.padding, self.groups = stride, padding, groups
        self.weight = param(cout, cin // groups, k, k)
        self.bias = param(cout) if bias else None
        self.w_mat = None  # the weight as forward() multiplies by it, cached by prepare()

    def matrix(self) -> Tensor:
        """Dense: (k*k*C_in, C_out), rows in (ky, kx, c) order; depthwise: (k*k, C)."""
        cout, cin_g, k, _ = self.weight.shape
        if self.groups == 1:
            return self.weight.permute(2, 3, 1, 0).reshape(k * k * cin_g, cout)
        if cin_g != 1 or self.groups != cout:
            raise NotImplementedError("grouped convolutions other than depthwise (SHViT has none)")
        return self.weight.reshape(cout, k * k).T

    def is_product(self) -> bool:
        """A 1x1, stride-1, unpadded dense convolution: one matrix product over all pixels."""
        return self.groups == 1 and self.weight.shape[-1] == 1 and self.stride == 1 and self.padding == 0

    def packs(self, device: str, dtype) -> bool:
        """Whether prepare() lays the matrix out packed (pack_columns) for the CPU product kernel."""
        return self.is_product() and cpu_kernels_on(device, dtype)

    def prepare(self):
        w = self.matrix()
        self.w_mat = (pack_columns(w) if self.packs(self.weight.device, self.weight.dtype) else w).contiguous()

    def forward(self, x, relu=False, residual=None):  # (B, H, W, C_in) -> (B, H', W', C_out)
        w = self.w_mat if self.w_mat is not None else self.matrix()
        k = self.weight.shape[-1]
        if self.groups == 1:
            return conv_dense(x, w, self.bias, k, self.stride, self.padding, relu, residual, n=self.weight.shape[0])
        return conv_depthwise(x, w, self.bias, k, self.stride, self.padding, relu, residual)


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

    def forward(self, x):  # (..., C): channels are the last axis of (B, H, W, C) and of (B, C)
        scale, shift = self.scale_shift()
        return x * scale + shift


BatchNorm1d = BatchNorm2d  # the same per-channel map on (B, C)


class ConvBN(Module):
    """Conv2d without bias (``c``), then BatchNorm2d (``bn``)."""

    def __init__(self, cin, cout, k=1, stride=1, padding=0, groups=1):
        self.c = Conv2d(cin, cout, k, stride, padding, groups)
        self.bn = BatchNorm2d(cout)

    def forward(self, x, relu=False, residual=None):
        return epilogue(self.bn(self.c(x)), relu, residual)

    def fuse(self) -> Conv2d:
        """BN(conv(x)) = scale * (w * x) + shift = (scale * w) * x + shift, per output channel:
        w' = w * g / sqrt(var + eps),  b' = beta - mean * g / sqrt(var + eps)."""
        scale, shift = self.bn.scale_shift()
        conv = Conv2d(1, 1, stride=self.c.stride, padding=self.c.padding, groups=self.c.groups, bias=True)
        conv.weight = self.c.weight * scale.reshape(-1, 1, 1, 1)
        conv.bias = shift
        return conv


class ReLU(Module):
    def forward(self, x):
        return x.relu()


class Residual(Module):
    """x + m(x). The addition is handed to m: its last product adds x to its result while that is
    still in registers (on the CPU device), rather than in another pass over memory."""

    def __init__(self, m):
        self.m = m

    def forward(self, x):
        return self.m(x, residual=x)

    def fuse(self):
        """x + dwconv(x) is one depthwise conv: the identity is a kernel with 1 at its centre tap."""
        if isinstance(self.m, ConvBN) and self.m.c.groups > 1:
            conv = self.m.fuse()
            C, _, k, _ = conv.weight.shape
            centre = np.zeros((C, 1, k, k), np.float32)
            centre[:, 0, k // 2, k // 2] = 1.0
            conv.weight = conv.weight + Tensor(centre, device=conv.weight.device, dtype=conv.weight.dtype)
            return conv
        self.m = fuse(self.m)
        return self


class FFN(Module):
    """1x1 C -> 2C, ReLU, 1x1 2C -> C."""

    def __init__(self, c, hidden):
        self.pw1, self.pw2 = ConvBN(c, hidden), ConvBN(hidden, c)

    def forward(self, x, residual=None):
        return self.pw2(self.pw1(x, relu=True), residual=residual)


class GroupNorm(Module):
    """GroupNorm with ONE group: normalise each sample over all of (H, W, C), then a per-channel
    affine. Computed in float32 even when the model runs in float16."""

    def __init__(self, c, eps=1e-5):
        self.weight, self.bias, self.eps = param(c), param(c), eps

    def forward(self, x):  # (B, H, W, C)
        h = x.float()
        mean = h.mean(axis=(1, 2, 3), keepdim=True)
        var = ((h - mean) ** 2).mean(axis=(1, 2, 3), keepdim=True)  # biased, as torch
        h = (h - mean) * (var + self.eps).rsqrt()
        return (h * self.weight.float() + self.bias.float()).cast(x.dtype)


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
        """(B, H, W, C) -> attended x1 (B, H, W, pdim), untouched x2 (B, H, W, C - pdim), attn (B, N, N)."""
        B, H, W, C = x.shape
        x1, x2 = x[..., :self.pdim], x[..., self.pdim:]
        tokens = self.qkv(self.pre_norm(x1)).reshape(B, H * W, -1)  # (B, N, 2qk + pdim): tokens are pixels
        qkv = tokens.transpose(1, 2)  # (B, 2qk + pdim, N)
        q, k, v = qkv[:, :self.qk_dim], qkv[:, self.qk_dim:2 * self.qk_dim], qkv[:, 2 * self.qk_dim:]
        scores = (q.transpose(1, 2) @ k).float() * self.scale  # (B, N, N), float32 even in half mode
        attn = scores.softmax(-1).cast(x.dtype).contiguous()  # rows are queries, sum to 1; realised once (else
        # tinygrad recomputes the exponentials inside the next product, once per value channel)
        if use_cpu_kernels(attn):  # the values read in place from the qkv map, (B, N, 2qk + pdim)
            out = Tensor.empty(B, H * W, self.pdim, device=x.device, dtype=x.dtype)
            fxn = functools.partial(attend_kernel, offset=2 * self.qk_dim)
            x1 = out.custom_kernel(attn, tokens, fxn=fxn)[0].reshape(B, H, W, self.pdim)
        else:  # each query's weighted mean of the values; realised, else the concatenation below runs
            # this product for all C channels
            x1 = (attn @ v.transpose(1, 2)).reshape(B, H, W, self.pdim).contiguous()
        return x1, x2, attn

    def forward(self, x, residual=None):
        x1, x2, _ = self.attention(x)
        y = x1.cat(x2, dim=-1) if x2.shape[-1] else x1  # (B, H, W, C)
        relu, conv = self.proj  # ReLU, then 1x1 ConvBN C -> C
        return conv(relu(y), residual=residual)


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
        x = self.conv1(x, relu=True)
        x = self.conv2(x, relu=True)
        return self.conv3(self.se(x))


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
        self.w_mat = None  # weight.T (packed for the CPU kernel), cached by prepare()

    def packs(self, device: str, dtype) -> bool:
        return cpu_kernels_on(device, dtype)

    def prepare(self):
        w = self.weight.T
        self.w_mat = (pack_columns(w) if self.packs(self.weight.device, self.weight.dtype) else w).contiguous()

    def forward(self, x):  # (B, C_in) -> (B, C_out): the CPU's product kernel (tinygrad's own reduce: 0.3 ms at batch 1)
        return matmul_bias(x, self.w_mat if self.w_mat is not None else self.weight.T, self.bias, n=self.weight.shape[0])


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
