"""The CPU fast path's kernels: SHViT's sums stated in tinygrad's UOp language, with register tiles.

tinygrad's own kernel heuristic tiles a matrix product 4 x 4 (4 rows x one float4) and reaches about
30 GFLOPS on one core. The four kernels here state the same sums with a wider register tile (up to
14 or 8 rows x 32 output channels on AVX-512, 4 x 16 on AVX2: many accumulators per loaded value,
``product_tile``); products read their weights packed (pack.py); a dense 3x3 convolution reads its
windows and its zero padding straight from the map (no im2col or padded copy); and bias, ReLU and
residual are applied before the store (``kernel_epilogue``). wide_vectors.py then widens their
loads and stores to 8 (16 on AVX-512) floats, so clang multiplies in 256-bit (512-bit) registers:
the products run at 120-235 GFLOPS (60 with 4-float vectors). lower.py calls them; they are used
on tinygrad's CPU device in float32 only (other devices and float16 keep tinygrad's generic
kernels, which it tiles itself).

Each kernel is a function ``(out, *inputs) -> sink`` for ``Tensor.custom_kernel``: UOp ranges
over the output's axes and the reduction, the sum written as an accumulating store, and tinygrad's
optimisation options (``Opt(UPCAST, axis, amount)``: unroll that axis into registers) in the
kernel's ``KernelInfo``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from tinygrad import UOp
from tinygrad.codegen.opt import Opt, OptOps
from tinygrad.uop.ops import AxisType, KernelInfo

from .target import num_cpu_threads, target_has_avx512, wide_vectors_asked

# ---- register tiles -----------------------------------------------------------------------------

def tile(size: int, choices=(4, 2, 1)) -> int:
    """The largest register-tile length in ``choices`` that divides ``size``."""
    return next(t for t in choices if size % t == 0)


def upcasts(sizes: tuple[int, ...], *range_amount) -> tuple:
    """UPCAST opts for (range number, amount) pairs. tinygrad drops ranges of size 1 before it
    applies opts, so a range's axis is the number of larger ranges before it."""
    return tuple(Opt(OptOps.UPCAST, sum(s > 1 for s in sizes[:r]), amount) for r, amount in range_amount if amount > 1)


def channel_tile(n: int) -> tuple:
    """Output channels a register tile holds: 16 (8, 4, ... where 16 does not divide), and 32 as
    two upcasts (16 then 2) while compiling for 512-bit vectors (compile.compile_context): 32
    registers of 16 floats hold 8 x 32 accumulators (2 x 16-float vectors per row); 256-bit
    AVX2 has 16 registers and would spill them. Measured: products +20%, 3x3 convs +35%. Counts
    32 does not divide but 48 does (S4's 336, S3's stem 48): 48 as 16 then 3, three vectors a row
    (S4's 1024 x 336 x 672 products 126 -> 146 GFLOPS on one core of a Xeon, 16-channel tiles
    needing a load for each multiply-add)."""
    first = tile(n, (16, 8, 4, 2, 1))
    if wide_vectors_asked() and n % 32 == 0:
        return first, 2
    return (first, 3) if wide_vectors_asked() and n % 48 == 0 else (first,)


def product_tile(m: int, n: int) -> tuple[int, tuple]:
    """A product's register tile, (rows, channel upcasts), for the CPU clang compiles for.

    AVX-512 (32 registers): 14 rows x 32 channels where 14 divides m (28 accumulators, 2 vectors
    of weights: 30 registers, no spill; 8 rows for 48-channel tiles, 24 + 3; S1's 784- and 3136-row products 140-149 -> 150-157
    GFLOPS on one core of a Xeon, the whole model 2-3% faster at batch 1 and 16; ``row_parts``
    makes products of other row counts a part 14 divides and the rest), else up to 8
    rows, the largest row count up to 8 that divides m, so the 7x7 maps of stage 2 (m = 49 at
    batch 1) get 7 rows, not 1; the 16 rows of stage 3 at batch 1 get 16 rows x 16 channels. AVX2 (16 registers of 8
    floats): 4 rows x 16 channels (8 accumulators) where 4 divides m; else up to 7 rows x 8
    channels (7 accumulators: 7 x 16 would spill). Measured on one core (AMD EPYC, 224x448 by 49
    rows): AVX-512 1 row 55 GFLOPS, 7 rows 228; AVX2 1 x 16 34, 7 x 16 65, 7 x 8 90.
    """
    if target_has_avx512():
        if m == 16 and n % 16 == 0:  # one pass over the weights (from memory at batch 1): S1 batch 1 +5%
            return 16, (16,)
        channels = channel_tile(n)
        return tile(m, (14, 8, 7, 6, 5, 4, 3, 2, 1) if math.prod(channels) <= 32 else (8, 7, 6, 5, 4, 3, 2, 1)), channels
    if m % 4 == 0:
        return 4, channel_tile(n)
    rows = tile(m, (7, 6, 5, 3, 2, 1))
    return rows, channel_tile(n) if rows <= 2 else (tile(n, (8, 4, 2, 1)),)


def row_parts(M: int, N: int) -> tuple[tuple[int, int], ...]:
    """A product's rows as (first row, rows) parts, each its own kernel. On AVX-512, where 14 does
    not divide M (S4's 4096, 1024 and 256 rows at batch 16, S1's 256; from 28 rows up): the
    first 14 * (M // 14) rows in 14-row tiles (``product_tile``), the M % 14 left over in a
    kernel of their own, whose tile is those rows (2 to 13). Measured on one core of a Xeon,
    8-row tiles against 14 on the same products: 4096 x 224 x 448 139 -> 147 GFLOPS, 1024 x 352 x
    672 145 -> 155, 256 x 896 x 448 150 -> 159. Elsewhere (and for N's tiles of up to 8 rows) one
    part, the whole product."""
    if target_has_avx512() and M % 14 and M >= 28 and product_tile(M - M % 14, N)[0] == 14:
        return ((0, M - M % 14), (M - M % 14, M % 14))
    return ((0, M),)


def split_range(sizes: tuple[int, ...], *range_tile) -> tuple[int, int] | None:
    """Where a kernel is cut into the slices it is compiled for (``num_cpu_threads`` while
    compiling: 4 a core on several cores, target.slices; pool.c's threads take them as they come):
    (range number, slices) for the first of the (range number, register tile) pairs whose range
    holds a multiple of that many tiles (else of half, a quarter of it). None where no range
    divides evenly. Each slice is one contiguous block of that range (slice s: the s-th block)."""
    for n in (num_cpu_threads(), num_cpu_threads() // 2, num_cpu_threads() // 4):
        if n <= 1:
            return None
        for r, t in range_tile:  # each slice keeps > 1 of the range: tinygrad would drop a range of 1 and renumber
            if sizes[r] > n and (sizes[r] // t) % n == 0:
                return r, n
    return None


def split(plan: Plan) -> tuple:
    """A plan's cut across cores as tinygrad's THREAD opt, which comes first among the opts, so the
    ranges keep their numbers; () where the kernel is not cut."""
    if plan.where is None:
        return ()
    r, n = plan.where
    return (Opt(OptOps.THREAD, sum(s > 1 for s in plan.sizes[:r]), n),)


def worth_splitting(macs: int) -> bool:
    """~32K multiply-adds a core at least (4 slices a core): a kernel starts only when the one before is done."""
    return macs >= num_cpu_threads() * (8 << 10)


def cut(sizes: tuple[int, ...], macs: int, *range_tile) -> tuple[int, int] | None:
    """``split_range`` where the kernel is ``worth_splitting`` (``macs`` multiply-adds), else None."""
    return split_range(sizes, *range_tile) if worth_splitting(macs) else None


class Plan(NamedTuple):
    """How a kernel runs: its output ranges in loop order, its register tile and its cut across
    cores. kernels.py's UOp kernels and csource.py's C both follow the same plan (``*_plan``), so
    the two paths cannot drift apart in tiles or slices, which their answers would not show."""

    sizes: tuple[int, ...]  # the output's ranges, outermost first
    channels: tuple  # the channel upcasts: their product is the channels a tile holds
    rows: int = 1  # a product's (or attention's) tile rows; a convolution's pixel rows
    cols: int = 1  # a convolution's pixel columns
    where: tuple[int, int] | None = None  # (range, slices) it is cut into (split_range); None: whole
    prefetch: int = 0  # a product's weights asked for this many steps of its sum ahead (csource.py's C only), 0: not


def gemm_plan(M: int, N: int, K: int, P: int) -> Plan:
    """(M, K) @ (K, N), weights in blocks of P columns: rows then column blocks (``columns_outer``:
    the reverse), tiled by ``product_tile``, cut by rows, else by column blocks."""
    outer = columns_outer(M, N, K)
    ri, rjo = (1, 0) if outer else (0, 1)
    rows, channels = product_tile(M, N)
    sizes = (N // P, M, P) if outer else (M, N // P, P)
    return Plan(sizes, channels, rows, where=cut(sizes, M * N * K, (ri, rows), (rjo, 1)), prefetch=weight_prefetch(M))


def weight_prefetch(M: int) -> int:
    """How many steps of its sum ahead a product's C (csource.py) asks the CPU for its weights, 0:
    not at all. 32 where the rows are few (up to 64: batch 1's 16, 42 and 49): there each weight
    serves one to five row tiles and comes from memory, and the hardware's prefetcher, which stops
    at each 4 KiB page, leaves the sum waiting. Measured on one core of a Xeon, weights cold (eight
    products in turn after a 64 MB sweep): 16 x 320 x 640 123 -> 83 us, 42 x 448 x 224 104 -> 80
    us. With warm weights (batch 16's products) it cost 0-2%: none there. A hint only: tinygrad's
    UOp kernels have no word for it, and no value changes."""
    return 32 if M <= 64 else 0


def attend_plan(Bt: int, N: int, P: int) -> Plan:
    """Bt images of (N, N) @ (N, P): tiled as a product, cut by images, else by queries."""
    rows, channels = product_tile(N, P)
    sizes = (Bt, N, P)
    return Plan(sizes, channels, rows, where=cut(sizes, Bt * N * N * P, (0, 1), (1, rows)))


def conv_plan(B: int, Ho: int, Wo: int, N: int, k: int, C: int) -> Plan:
    """A dense k x k convolution to (B, Ho, Wo, N) from C channels: pixel tiles x channel tiles,
    cut by images, else by rows."""
    ty, tx = pixel_tile(Ho, Wo, N)
    sizes = (B, Ho, Wo, N)
    return Plan(sizes, channel_tile(N), ty, tx, cut(sizes, B * Ho * Wo * N * k * k * C, (0, 1), (1, ty)))


def depthwise_plan(B: int, Ho: int, Wo: int, C: int, k: int) -> Plan:
    """A depthwise k x k convolution to (B, Ho, Wo, C): 16 channels a tile (or what divides C), cut
    by images, else by rows."""
    sizes = (B, Ho, Wo, C)
    return Plan(sizes, (tile(C, (16, 8, 4, 2, 1)),), where=cut(sizes, B * Ho * Wo * C * k * k, (0, 1), (1, 1)))


def channel_upcasts(sizes: tuple[int, ...], r: int, amounts: tuple) -> tuple:
    """The UPCAST opts of ``channel_tile`` for range ``r`` (the second splits what the first left)."""
    return tuple(o for amount in amounts for o in upcasts(sizes, (r, amount)))


# ---- the kernels ----------------------------------------------------------------------------------

def kernel_epilogue(y: UOp, relu: bool, residual: UOp | None) -> UOp:
    """What the layer after a product would do, done on its result while in registers."""
    y = y.maximum(0.0) if relu else y
    return y if residual is None else y + residual


def columns_outer(M: int, N: int, K: int) -> bool:
    """Whether a product loops over column blocks outside its rows: where its weights (K x N) pass
    1 MiB, more than the level-2 cache keeps beside the rows, and the rows (M x K) are the smaller:
    then each block of weights is read from memory once and the rows from the cache, not the
    whole weight once per row tile. S2's stage-3 products at batch 16 (256 x 448 x 896): 122 GFLOPS
    against 108 (one core of a Xeon); products with smaller weights were 5-10% slower that way."""
    return K * N * 4 > 2**20 and M < N


def gemm_kernel(C: UOp, A: UOp, B: UOp, bias: UOp, *res: UOp, relu: bool = False, rows: tuple[int, int] | None = None) -> UOp:
    """C = A @ W + bias, (M, K) @ (K, N) + (N,), then ReLU and + res[0] (M, n) if asked; W packed
    (pack.py): B[jo, k, ji] = W[k, jo*P + ji]; C and the bias have the padded width N (zero
    columns, zero bias), the residual the real one, n (read as 0 past it: no read past its rows).
    ``rows``: (first, count), the part of C's rows this kernel computes (``row_parts``); None: all.
    Tiled up to 14 rows x 32 columns (product_tile).
    At batch 1 every weight comes from memory once per call (S1's are 25 MB, more than the
    caches): read as one stream per tile, the products of stage 3 (16 rows) took 48 us, not 90."""
    first, M = rows or (0, C.shape[0])
    N = C.shape[1]
    P, K = B.shape[2], A.shape[1]
    outer = columns_outer(M, N, K)
    ri, rjo = (1, 0) if outer else (0, 1)  # the loops' order: rows then column blocks, or the reverse
    ir, jo, ji = UOp.range(M, ri), UOp.range(N // P, rjo), UOp.range(P, 2)
    i = ir + first if first else ir  # the row
    k = UOp.range(K, 3, axis_type=AxisType.REDUCE)
    j = jo * P + ji
    n = res[0].shape[1] if res else N  # the residual's width; C's columns past it are padding

    def upto_n(t: UOp) -> UOp:
        return t if n == N else (j < n).where(t, 0.0)  # a gated load: no read past n

    C = C[i, j].set(0.0)
    C = C[i, j].set(C.after(k)[i, j] + A[i, k] * B[jo, k, ji], end=k)  # the sum over K, in registers
    C = C[i, j].set(kernel_epilogue(C[i, j] + bias[j], relu, upto_n(res[0][i, j]) if res else None))
    plan = gemm_plan(M, N, K, P)
    opts = split(plan) + channel_upcasts(plan.sizes, 2, plan.channels) + upcasts(plan.sizes, (ri, plan.rows))  # channel tiles divide P
    return C.end(*((jo, ir) if outer else (ir, jo)), ji).sink(arg=KernelInfo(name=gemm_name(first, M, N, K), opts_to_apply=opts))


def gemm_name(first: int, M: int, N: int, K: int) -> str:
    """A product kernel's name: gemm_M_N_K, and _at<first row> for a part that starts further on."""
    return f"gemm_{M}_{N}_{K}" + (f"_at{first}" if first else "")


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
    plan = attend_plan(Bt, N, P)
    opts = split(plan) + channel_upcasts(plan.sizes, 2, plan.channels) + upcasts(plan.sizes, (1, plan.rows))
    return O.end(b, i, c).sink(arg=KernelInfo(name=f"attend_{N}_{P}", opts_to_apply=opts))


def padded_load(X: UOp, b: UOp, iy: UOp, ix: UOp, c: UOp, channels_first: bool = False) -> UOp:
    """X[b, iy, ix, c] (channels_first: X[b, c, iy, ix]) of a map zero-padded on the fly: outside
    it the load is skipped and 0 is read (a gated load), so no padded copy of the map is ever written."""
    H, W = X.shape[2:] if channels_first else X.shape[1:3]
    inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    return inside.where(X[b, c, iy, ix] if channels_first else X[b, iy, ix, c], 0.0)


def pixel_tile(Ho: int, Wo: int, N: int) -> tuple[int, int]:
    """A dense convolution's register tile in output pixels, (rows, columns): 4 x 2 where they
    divide the map, else 1 x 4 or 2 x 2. Measured on the stem (one core of a Xeon, batch 16):
    4 x 2 took 4.9, 6.9 and 5.3 ms for the first three convolutions, 1 x 4 5.4, 7.3 and 6.1."""
    if Ho % 4 == 0 and Wo % 2 == 0:
        return 4, 2
    tx = tile(Wo)
    return tile(Ho, (4 // tx, 1)), tx


def conv_kernel(O: UOp, X: UOp, Wm: UOp, bias: UOp, k: int, stride: int, padding: int, relu: bool = False,
                channels_first: bool = False, framed_in: bool = False, framed_out: bool = False) -> UOp:
    """A dense k x k convolution read straight from the map (no im2col copy):
    O[b, y, x, n] = bias[n] + sum over (ky, kx, c) of X[b, s*y + ky - p, s*x + kx - p, c] * Wm[(ky*k + kx)*C + c, n],
    with O (B, H', W', N), X (B, H, W, C), Wm (k*k*C, N); tiled 8 or 4 output pixels (pixel_tile) x 16 (or 32) channels.
    ``channels_first``: X is (B, C, H, W), as the model's input comes (no transposed copy: S1 at
    batch 16, 2 ms). ``framed_in``: X is (B, H+2, W+2, C), the map inside a one-pixel frame of
    zeros (padding 1), so the taps read it with no test for the edge (the stem's 3x3 convolutions
    ran 20-38% faster so); ``framed_out``: O is framed the same way, its frame zeros already."""
    B, Ho, Wo, N = O.shape
    Ho, Wo = (Ho - 2, Wo - 2) if framed_out else (Ho, Wo)
    C = X.shape[1] if channels_first else X.shape[3]
    b, y, x, n = (UOp.range(size, axis) for axis, size in enumerate((B, Ho, Wo, N)))
    ky, kx, c = (UOp.range(size, axis, axis_type=AxisType.REDUCE) for axis, size in ((4, k), (5, k), (6, C)))
    if framed_in:  # padding 1: the frame is the padding
        tap = X[b, stride * y + ky, stride * x + kx, c]
    else:
        tap = padded_load(X, b, stride * y + ky - padding, stride * x + kx - padding, c, channels_first)
    f = int(framed_out)
    O = O[b, y + f, x + f, n].set(0.0)
    O = O[b, y + f, x + f, n].set(O.after(ky, kx, c)[b, y + f, x + f, n] + tap * Wm[(ky * k + kx) * C + c, n], end=(ky, kx, c))
    O = O[b, y + f, x + f, n].set(kernel_epilogue(O[b, y + f, x + f, n] + bias[n], relu, None))
    plan = conv_plan(B, Ho, Wo, N, k, C)
    opts = split(plan) + channel_upcasts(plan.sizes, 3, plan.channels) + upcasts(plan.sizes, (2, plan.cols), (1, plan.rows))
    return O.end(b, y, x, n).sink(arg=KernelInfo(name=f"conv{k}s{stride}_{Ho}_{Wo}_{N}_{C}", opts_to_apply=opts))


def frame_kernel(O: UOp) -> UOp:
    """Zeros into the one-pixel frame of O (B, H+2, W+2, N), and nowhere else: the top and bottom
    rows, then the left and right columns (conv_kernel fills the inside)."""
    B, Hp, Wp, N = O.shape
    b, r, x, n = (UOp.range(size, axis) for axis, size in enumerate((B, 2, Wp, N)))
    rows = O[b, r * (Hp - 1), x, n].store(0.0).end(b, r, x, n)
    b, y, c, n = (UOp.range(size, axis) for axis, size in enumerate((B, Hp, 2, N), start=4))
    cols = O[b, y, c * (Wp - 1), n].store(0.0).end(b, y, c, n)
    return UOp.sink(rows, cols, arg=KernelInfo(name=f"frame_{Hp}_{Wp}_{N}", opts_to_apply=()))


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
    plan = depthwise_plan(B, Ho, Wo, C, k)
    opts = split(plan) + upcasts(plan.sizes, (3, plan.channels[0]))
    out = O[b, y, x, c].store(kernel_epilogue(acc, relu, None))
    return out.end(b, y, x, c).sink(arg=KernelInfo(name=f"dw{k}s{stride}_{Ho}_{Wo}_{C}", opts_to_apply=opts))
