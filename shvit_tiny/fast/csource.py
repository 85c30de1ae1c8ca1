"""The fast path's kernels written straight as C, for tinygrad's CPU device when clang compiles it.

Why: kernels.py states each kernel in tinygrad's UOp language and tinygrad lowers it, in Python,
through its graph rewrites: with a register tile of 8 x 32 unrolled that is ~1 s a kernel, and
S1 has 30 of them (19 of the 23 s of its first call on one core, a Xeon). The C tinygrad renders
from them is plain: loops over output tiles, a vector accumulator per tile row and 16 columns, the
sum over the reduction in order, the epilogue, the store. This module writes that C itself, the
same loops, register tiles and slices across cores (kernels.py's ``*_plan``, which its UOp
kernels follow too) and order of every sum, and hands it to tinygrad as a program ready
to compile (a PROGRAM holding its SOURCE): clang alone takes ~0.1 s a kernel.

Two things are added to what tinygrad renders, neither changing a value: a cut kernel's bounds
are 64-bit (``slice_bounds``), and the products of few rows ask for their weights ahead of the sum
(``register_tile``'s prefetch, kernels.weight_prefetch).

Same answers, bit for bit: each output element is the same sum in the same order (0, then
+ a*b for k = 0, 1, ...; clang fuses each multiply-add into one FMA in both), then bias, ReLU and
residual as kernels.kernel_epilogue orders them. tests/test_fast.py checks every kernel kind
both ways; kernels.py lowered by tinygrad stays the reference (``SHVIT_C_KERNELS=0`` runs it, and
it runs wherever this does not apply: another CPU renderer such as LLVM, other devices).

``fxn(kernel, **params)`` is the one dispatch point lower.py calls: the function
``Tensor.custom_kernel`` takes, this module's twin of ``kernel`` where it applies, else ``kernel``.
"""
from __future__ import annotations

import functools
import math

from tinygrad import Device, dtypes
from tinygrad.renderer import Estimates
from tinygrad.uop.ops import AddrSpace, KernelInfo, Ops, ProgramInfo, UOp

from . import switched_off
from .kernels import (
    attend_kernel,
    attend_plan,
    columns_outer,
    conv_kernel,
    conv_plan,
    depthwise_kernel,
    depthwise_plan,
    frame_kernel,
    gemm_kernel,
    gemm_name,
    gemm_plan,
)
from .target import wide_vectors_asked


def applies() -> bool:
    """Whether the CPU device compiles C with clang now (its renderer for the current ``DEV``), and
    ``SHVIT_C_KERNELS`` is not 0."""
    from tinygrad.renderer.cstyle import ClangRenderer

    return not switched_off("SHVIT_C_KERNELS") and isinstance(Device["CPU"].renderer, ClangRenderer)


def fxn(kernel, **params):
    """What lower.py gives ``Tensor.custom_kernel`` for ``kernel`` (a function of kernels.py):
    its C twin here where it applies, else the UOp kernel, for tinygrad to lower."""
    return functools.partial(TWINS[kernel] if applies() else kernel, **params)


# ---- C pieces -------------------------------------------------------------------------------------

def lanes(t: int) -> tuple[int, int]:
    """A tile of ``t`` channels as (floats per vector, vectors): 16-float vectors while compiling
    for 512-bit ones (wide_vectors.py's width), else 8, never wider than the tile; scalars for 2 or 1."""
    w = 16 if wide_vectors_asked() else 8
    vw = min(w, t) if t % 4 == 0 else 1
    return vw, t // vw


def vtype(vw: int) -> str:
    return f"f{vw}" if vw > 1 else "float"


def prelude(vw: int) -> str:
    """The vector type of ``vw`` floats (loads and stores need only float alignment) and the
    helpers: a load reading 0 past ``n`` (padded columns), ReLU as tinygrad renders it, x < 0 ? 0 : x."""
    if vw == 1:
        return ("static inline float upto(const float *p, int j, int n) { return j < n ? *p : 0.0f; }\n"
                "static inline float relu(float y) { return y < 0.0f ? 0.0f : y; }\n")
    return (f"typedef float f{vw} __attribute__((ext_vector_type({vw}), aligned(4)));\n"
            f"typedef int i{vw} __attribute__((ext_vector_type({vw}), aligned(4)));\n"
            f"static inline f{vw} upto(const float *p, int j, int n) {{\n"
            f"  if (j + {vw} <= n) return *(const f{vw}*)p;\n"
            f"  f{vw} v = (f{vw})(0.0f);\n"
            f"  for (int l = 0; l < {vw}; l++) if (j + l < n) v[l] = p[l];\n"
            f"  return v;\n}}\n"
            f"static inline f{vw} relu(f{vw} y) {{ return (f{vw})((i{vw})y & ~(y < 0.0f)); }}\n")


def load(vw: int, ptr: str) -> str:
    return f"*(const f{vw}*)({ptr})" if vw > 1 else f"*({ptr})"


def store(vw: int, ptr: str, value: str) -> str:
    return f"*(f{vw}*)({ptr}) = {value};" if vw > 1 else f"*({ptr}) = {value};"


def zero(vw: int) -> str:
    return f"(f{vw})(0.0f)" if vw > 1 else "0.0f"


def slice_bounds(name: str, size: int, where: tuple[int, int] | None, r: int) -> str:
    """``name_lo``/``name_hi``: the whole range, or this core's block of it when the split is on range ``r``.
    64-bit (``long``, and the loops over them): with 32-bit bounds that depend on ``core`` clang
    could not rule out overflow in the index arithmetic and computed the stem's tap addresses in
    vector registers, extracting each (vpextr): its split convolutions ran 1.4-1.8x slower than
    whole ones, slice for slice (S1 at batch 16 on two cores: 34.7-36.3 -> 32.9-33.3 ms)."""
    if where is not None and where[0] == r:
        per = size // where[1]
        return f"  const long {name}_lo = core * {per}, {name}_hi = {name}_lo + {per};\n"
    return f"  const long {name}_lo = 0, {name}_hi = {size};\n"


def signature(name: str, n_buffers: int, split: bool) -> str:
    args = [f"float* restrict d{i}" for i in range(n_buffers)] + (["const int core"] if split else [])
    return f"void {name}({', '.join(args)})"


def program(name: str, body: str, params: tuple[UOp, ...], where, estimates: Estimates) -> UOp:
    """A PROGRAM tinygrad compiles as it is: (SINK with the KernelInfo, LINEAR with the parameters
    in order, SOURCE); launched as ``where[1]`` core slices when split (a ``core_id`` parameter last).
    ``body``: the kernel's C, ``KERNEL(`` where the function's signature goes (buffers d0, d1, ...,
    then ``core``), as tinygrad's CPU runtime calls it."""
    bufs = [p.src[0] if p.op is Ops.RESHAPE else p for p in params]  # the flat PARAMs custom_kernel made
    slices = 1 if where is None else where[1]
    core = () if slices == 1 else (UOp.param(len(bufs), dtypes.int, (), vmin_vmax=(0, slices - 1), multiple_of=1,
                                             name="core_id", addrspace=AddrSpace.ALU),)
    fname = KernelInfo(name=name).function_name
    src = body.replace("KERNEL(", signature(fname, len(bufs), bool(core)) + " ", 1)
    target = Device["CPU"].renderer.target
    info = ProgramInfo(name, (slices, 1, 1), (1, 1, 1), core, tuple(range(len(bufs))), (0,), tuple(range(len(bufs))), target)
    sink = UOp(Ops.SINK, dtypes.void, (), KernelInfo(name=name, estimates=estimates))
    return UOp(Ops.PROGRAM, src=(sink, UOp(Ops.LINEAR, src=(*bufs, *core)), UOp(Ops.SOURCE, arg=src)), arg=info)


def register_tile(acc: str, vw: int, rows: int, nv: int, k: str, K: int, column, row, prefetch: int = 0) -> str:
    """A product's sum over ``k`` < K into a register tile of ``rows`` x ``nv`` vectors, named
    ``acc{r}_{v}``: from 0, + row(r) * column(v) for k = 0, 1, ... in order. ``column(v)``: the
    address of vector v's floats at this k (one load a step, shared by the rows); ``row(r)``: row
    r's one float at this k (broadcast over the vector). ``prefetch``: the columns' cache lines
    ``prefetch`` steps ahead asked for each step (kernels.weight_prefetch; no value changes)."""
    f = vtype(vw)
    s = "".join(f"    {f} {acc}{r}_{v} = {zero(vw)};\n" for r in range(rows) for v in range(nv))
    s += f"    for (int {k} = 0; {k} < {K}; {k}++) {{\n"
    ahead = column(0).replace(f"{k} ", f"({k} + {prefetch}) ", 1)  # the first vector's address, that many steps on
    s += "".join(f"      __builtin_prefetch({ahead} + {16 * line});\n" for line in range(max(1, vw * nv // 16)) if prefetch)
    s += "".join(f"      const {f} w{v} = {load(vw, column(v))};\n" for v in range(nv))
    s += "".join(f"      const float x{r} = {row(r)};\n" for r in range(rows))
    s += "".join(f"      {acc}{r}_{v} = {acc}{r}_{v} + x{r} * w{v};\n" for r in range(rows) for v in range(nv))
    return s + "    }\n"


def epilogue(acc: str, bias: str, relu: bool, residual: str | None) -> str:
    """kernels.kernel_epilogue in C: (acc + bias), ReLU, + residual."""
    y = f"{acc} + {bias}"
    y = f"relu({y})" if relu else y
    return y if residual is None else f"{y} + {residual}"


# ---- the kernels (each the C twin of kernels.py's function of the same name) -----------------------

def gemm_kernel_c(C: UOp, A: UOp, B: UOp, bias: UOp, *res: UOp, relu: bool = False, rows: tuple[int, int] | None = None) -> UOp:
    """kernels.gemm_kernel: C = A @ W + bias (then ReLU, + res[0]), W packed (N/P, K, P), the
    residual (M, n) read as 0 past its n columns; ``rows``: (first, count) of C's rows, None: all."""
    first, M = rows or (0, C.shape[0])
    N = C.shape[1]
    P, K = B.shape[2], A.shape[1]
    n = res[0].shape[1] if res else N  # the residual's width (C and the bias are padded to N)
    outer = columns_outer(M, N, K)
    plan = gemm_plan(M, N, K, P)
    tile_rows, where, T = plan.rows, plan.where, math.prod(plan.channels)
    vw, nv = lanes(T)
    ri, rjo = (1, 0) if outer else (0, 1)
    f = vtype(vw)
    row0 = f" + {first}" if first else ""  # a part's rows start at its first
    loops = {"i": f"  for (long i = i_lo{row0}; i < i_hi{row0}; i += {tile_rows})\n", "jo": "  for (long jo = jo_lo; jo < jo_hi; jo++)\n"}
    s = prelude(vw) + "KERNEL( {\n" + slice_bounds("i", M, where, ri) + slice_bounds("jo", N // P, where, rjo)
    s += "".join(loops[x] for x in (("jo", "i") if outer else ("i", "jo")))
    s += f"  for (int jt = 0; jt < {P}; jt += {T}) {{\n"
    s += f"    const float *a = d1 + i * {K}, *b = d2 + jo * {K * P} + jt;\n    const int j = jo * {P} + jt;\n"
    s += register_tile("c", vw, tile_rows, nv, "k", K, lambda v: f"b + k * {P} + {v * vw}", lambda r: f"a[{r * K} + k]",
                       plan.prefetch)
    s += "".join(f"    const {f} bias{v} = {load(vw, f'd3 + j + {v * vw}')};\n" for v in range(nv))
    for r in range(tile_rows):
        for v in range(nv):
            at, rat = (f"(i + {r}) * {width} + j + {v * vw}" for width in (N, n))
            resid = None if not res else f"upto(d4 + {rat}, j + {v * vw}, {n})" if n != N else load(vw, f"d4 + {rat}")
            s += "    " + store(vw, f"d0 + {at}", epilogue(f"c{r}_{v}", f"bias{v}", relu, resid)) + "\n"
    s += "  }\n}\n"
    params = (C, A, B, bias, *res)
    return program(gemm_name(first, M, N, K), s, params, where, Estimates(ops=2 * M * N * K, lds=4 * (M * K + K * N + M * N),
                                                                    mem=4 * (M * K + K * N + M * N)))


def attend_kernel_c(O: UOp, A: UOp, QKV: UOp, offset: int) -> UOp:
    """kernels.attend_kernel: O[b, i, c] = sum over j of A[b, i, j] * QKV[b, j, offset + c]."""
    Bt, N, P = O.shape
    D = QKV.shape[2]
    plan = attend_plan(Bt, N, P)
    rows, where, T = plan.rows, plan.where, math.prod(plan.channels)
    vw, nv = lanes(T)
    s = prelude(vw) + "KERNEL( {\n" + slice_bounds("b", Bt, where, 0) + slice_bounds("i", N, where, 1)
    s += f"  for (long b = b_lo; b < b_hi; b++)\n  for (long i = i_lo; i < i_hi; i += {rows})\n"
    s += f"  for (int c = 0; c < {P}; c += {T}) {{\n"
    s += f"    const float *a = d1 + (b * {N} + i) * {N}, *val = d2 + b * {N * D} + {offset} + c;\n"
    s += register_tile("o", vw, rows, nv, "j", N, lambda v: f"val + j * {D} + {v * vw}", lambda r: f"a[{r * N} + j]")
    s += "".join("    " + store(vw, f"d0 + (b * {N} + i + {r}) * {P} + c + {v * vw}", f"o{r}_{v}") + "\n"
                 for r in range(rows) for v in range(nv))
    s += "  }\n}\n"
    return program(f"attend_{N}_{P}", s, (O, A, QKV), where,
                   Estimates(ops=2 * Bt * N * N * P, lds=4 * Bt * (N * N + N * D + N * P), mem=4 * Bt * (N * N + N * D + N * P)))


def conv_kernel_c(O: UOp, X: UOp, Wm: UOp, bias: UOp, k: int, stride: int, padding: int, relu: bool = False,
                  channels_first: bool = False, framed_in: bool = False, framed_out: bool = False) -> UOp:
    """kernels.conv_kernel: a dense k x k convolution straight from the map, sum over (ky, kx, c) in order."""
    B, Hout, Wout, N = O.shape
    fo = int(framed_out)
    Ho, Wo = Hout - 2 * fo, Wout - 2 * fo
    C, H, W = (X.shape[1], *X.shape[2:]) if channels_first else (X.shape[3], *X.shape[1:3])
    plan = conv_plan(B, Ho, Wo, N, k, C)
    ty, tx, where, T = plan.rows, plan.cols, plan.where, math.prod(plan.channels)
    vw, nv = lanes(T)
    f = vtype(vw)
    s = prelude(vw) + "KERNEL( {\n" + slice_bounds("b", B, where, 0) + slice_bounds("y", Ho, where, 1)
    s += (f"  for (long b = b_lo; b < b_hi; b++)\n  for (long y = y_lo; y < y_hi; y += {ty})\n"
          f"  for (int x = 0; x < {Wo}; x += {tx})\n  for (int nn = 0; nn < {N}; nn += {T}) {{\n")
    pix = [(py, px) for py in range(ty) for px in range(tx)]
    s += "".join(f"    {f} o{py}_{px}_{v} = {zero(vw)};\n" for py, px in pix for v in range(nv))
    s += f"    for (int ky = 0; ky < {k}; ky++)\n    for (int kx = 0; kx < {k}; kx++) {{\n"
    for py in range(ty):
        s += f"      const int iy{py} = {stride} * (y + {py}) + ky{'' if framed_in else f' - {padding}'};\n"
    for px in range(tx):
        s += f"      const int ix{px} = {stride} * (x + {px}) + kx{'' if framed_in else f' - {padding}'};\n"
    if not framed_in:
        s += "".join(f"      const int in{py}_{px} = iy{py} >= 0 && iy{py} < {H} && ix{px} >= 0 && ix{px} < {W};\n"
                     for py, px in pix)
    s += f"      const float *w = d2 + (ky * {k} + kx) * {C * N} + nn;\n"
    s += f"      for (int c = 0; c < {C}; c++) {{\n"
    s += "".join(f"        const {f} w{v} = {load(vw, f'w + c * {N} + {v * vw}')};\n" for v in range(nv))
    for py, px in pix:
        if channels_first:
            at = f"((b * {C} + c) * {H} + iy{py}) * {W} + ix{px}"
        else:
            at = f"((b * {H} + iy{py}) * {W} + ix{px}) * {C} + c"
        tap = f"d1[{at}]" if framed_in else f"(in{py}_{px} ? d1[{at}] : 0.0f)"
        s += f"        const float t{py}_{px} = {tap};\n"
        s += "".join(f"        o{py}_{px}_{v} = o{py}_{px}_{v} + t{py}_{px} * w{v};\n" for v in range(nv))
    s += "      }\n    }\n"
    s += "".join(f"    const {f} bias{v} = {load(vw, f'd3 + nn + {v * vw}')};\n" for v in range(nv))
    for py, px in pix:
        for v in range(nv):
            at = f"((b * {Hout} + y + {py + fo}) * {Wout} + x + {px + fo}) * {N} + nn + {v * vw}"
            s += "    " + store(vw, f"d0 + {at}", epilogue(f"o{py}_{px}_{v}", f"bias{v}", relu, None)) + "\n"
    s += "  }\n}\n"
    name = f"conv{k}s{stride}_{Ho}_{Wo}_{N}_{C}"
    macs = B * Ho * Wo * N * k * k * C
    return program(name, s, (O, X, Wm, bias), where, Estimates(ops=2 * macs, lds=4 * 2 * macs, mem=4 * (B * H * W * C + B * Ho * Wo * N)))


def frame_kernel_c(O: UOp) -> UOp:
    """kernels.frame_kernel: zeros into the one-pixel frame of O (B, H+2, W+2, N), nowhere else.
    (no_builtin: clang would turn the loops into memset calls, and the kernel is linked with no libc.)"""
    B, Hp, Wp, N = O.shape
    s = ("__attribute__((no_builtin(\"memset\"))) KERNEL( {\n"
         f"  for (int b = 0; b < {B}; b++) {{\n"
         f"    for (int x = 0; x < {Wp * N}; x++) {{\n"
         f"      d0[b * {Hp * Wp * N} + x] = 0.0f; d0[(b * {Hp} + {Hp - 1}) * {Wp * N} + x] = 0.0f;\n    }}\n"
         f"    for (int y = 0; y < {Hp}; y++)\n"
         f"      for (int c = 0; c < {N}; c++) {{ d0[(b * {Hp} + y) * {Wp * N} + c] = 0.0f; "
         f"d0[((b * {Hp} + y) * {Wp} + {Wp - 1}) * {N} + c] = 0.0f; }}\n"
         "  }\n}\n")
    return program(f"frame_{Hp}_{Wp}_{N}", s, (O,), None, Estimates(mem=4 * B * 2 * (Hp + Wp) * N))


def depthwise_kernel_c(O: UOp, X: UOp, Wt: UOp, bias: UOp, k: int, stride: int, padding: int, relu: bool = False) -> UOp:
    """kernels.depthwise_kernel: bias, then + tap * weight for each of the k*k taps in order."""
    B, Ho, Wo, C = O.shape
    H, W = X.shape[1:3]
    plan = depthwise_plan(B, Ho, Wo, C, k)
    where, T = plan.where, plan.channels[0]
    vw, nv = lanes(T)
    f = vtype(vw)
    s = prelude(vw) + "KERNEL( {\n" + slice_bounds("b", B, where, 0) + slice_bounds("y", Ho, where, 1)
    s += (f"  for (long b = b_lo; b < b_hi; b++)\n  for (long y = y_lo; y < y_hi; y++)\n"
          f"  for (int x = 0; x < {Wo}; x++)\n  for (int c = 0; c < {C}; c += {T}) {{\n")
    s += "".join(f"    {f} o{v} = {load(vw, f'd3 + c + {v * vw}')};\n" for v in range(nv))
    for ky in range(k):
        for kx in range(k):
            s += (f"    {{ const int iy = {stride} * y + {ky - padding}, ix = {stride} * x + {kx - padding};\n"
                  f"      const int inside = iy >= 0 && iy < {H} && ix >= 0 && ix < {W};\n"
                  f"      const float *t = d1 + ((b * {H} + iy) * {W} + ix) * {C} + c;\n")
            for v in range(nv):
                tap = f"(inside ? {load(vw, f't + {v * vw}')} : {zero(vw)})"
                s += f"      o{v} = o{v} + {tap} * {load(vw, f'd2 + {(ky * k + kx) * C} + c + {v * vw}')};\n"
            s += "    }\n"
    s += "".join("    " + store(vw, f"d0 + ((b * {Ho} + y) * {Wo} + x) * {C} + c + {v * vw}",
                                  f"relu(o{v})" if relu else f"o{v}") + "\n" for v in range(nv))
    s += "  }\n}\n"
    macs = B * Ho * Wo * C * k * k
    return program(f"dw{k}s{stride}_{Ho}_{Wo}_{C}", s, (O, X, Wt, bias), where,
                   Estimates(ops=2 * macs, lds=8 * macs, mem=4 * (B * H * W * C + B * Ho * Wo * C)))


TWINS = {gemm_kernel: gemm_kernel_c, attend_kernel: attend_kernel_c, conv_kernel: conv_kernel_c,
         frame_kernel: frame_kernel_c, depthwise_kernel: depthwise_kernel_c}
