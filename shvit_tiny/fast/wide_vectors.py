"""Wider float vectors for this package's CPU kernels (tinygrad 0.14's C code stops at four floats).

Why: tinygrad's code generator groups adjacent float32 loads and stores into vectors of at most
4 (``float4``, 128 bits) on every C-rendering device; clang then multiplies in 128-bit registers.
On a CPU with 256-bit (AVX2) or 512-bit (AVX-512) units that is half or a quarter of its width:
the matrix products of ``layers.gemm_kernel`` sat at ~60 GFLOPS on one core here, the 128-bit
FMA peak. This pass, run right after tinygrad's own grouping, merges each pair of neighbouring
4-float accesses, ``[o, o+4)`` and ``[o+4, o+8)`` of one buffer, into one 8-float access when
``o`` is provably a multiple of 8, and then, where clang was asked for 512-bit vectors
(``target.compile_context`` does that on AVX-512 CPUs), pairs of those into 16-float ones. The
products then run at ~120 GFLOPS with 8 floats and ~150 with 16. Nothing else changes: the same
values are read and written, in the same order per element, so results are bit for bit the same.

Scope: only kernels this package writes (their names start with ``gemm``, ``conv``, ``dw`` or ``attend``)
on tinygrad's CPU device; every other kernel, and every other device, is left to tinygrad
(OpenCL, Metal and CUDA pick their own widths). Alignment: a vector of n floats is declared
4n-byte aligned, as tinygrad declares ``float4`` 16-byte aligned; tinygrad's CPU buffers are
page-aligned mmaps and its memory planner places buffers at multiples of 256 bytes, and the
offset is checked to be a multiple of n floats, so every merged access is aligned.

The hook is tinygrad's ``memory_coalescing`` as ``tinygrad.codegen`` calls it, wrapped (``wrapped``)
only while the fast path compiles (hooks.py: a tinygrad program of yours in the same process is
never compiled with it). With any tinygrad other than 0.14.0 nothing is wrapped and the kernels
keep tinygrad's own 4-float vectors (the same answers, slower).
"""
from __future__ import annotations

from collections import defaultdict

KERNEL_PREFIXES = ("gemm", "conv", "dw", "attend")


def split_offset(offset):
    """A vector access's offset -> (valid, root, constant): root + constant elements, or
    (valid, None, constant) for a constant offset."""
    from tinygrad.uop.ops import Ops

    idx, valid = offset.get_idx(), offset.get_valid()
    if idx.op is Ops.ADD and idx.src[1].op is Ops.CONST:
        return valid, idx.src[0], idx.src[1].arg
    if idx.op is Ops.ADD and idx.src[0].op is Ops.CONST:
        return valid, idx.src[1], idx.src[0].arg
    if idx.op is Ops.CONST:
        return valid, None, idx.arg
    return valid, idx, 0


def vector_accesses(sink, length: int):
    """Every ``length``-float load and store of a float32 buffer, grouped by (op, buffer, valid,
    root) and then by constant offset."""
    from tinygrad.dtype import dtypes
    from tinygrad.uop.ops import Ops

    groups: dict[tuple, dict[int, list]] = defaultdict(dict)
    for u in sink.toposort():
        if u.op not in (Ops.LOAD, Ops.STORE):
            continue
        shrink = u.src[0]  # tinygrad's vector access: SHRINK(buffer, offset, length)
        if shrink.op is not Ops.SHRINK or shrink.src[2].op is not Ops.CONST or shrink.src[2].arg != length:
            continue
        buf = shrink.src[0]
        if buf.dtype != dtypes.float32:
            continue
        valid, root, const = split_offset(shrink.src[1])
        groups[(u.op, buf, valid, root)].setdefault(const, []).append(u)
    return groups


def widen(sink, width: int = 8):
    """Merge runs of 4-float accesses into accesses of ``width`` floats (else 8 where only that
    fits): [o, o+4), [o+4, o+8), ... of one buffer, with o a provable multiple of the new width.
    One substitution for the whole kernel (tinygrad's graph work is what a compile spends)."""
    from tinygrad.uop.ops import Ops, UOp

    replace = {}
    for (op, buf, _, _), by_const in vector_accesses(sink, 4).items():
        done = set()
        for const in sorted(by_const):
            if const in done:
                continue
            offset = by_const[const][0].src[0].src[1]
            for w in (16, 8):
                run = [by_const.get(const + 4 * i) for i in range(w // 4)]
                if w > width or const % w or None in run or offset.get_idx().divides(w) is None:
                    continue  # too wide, a gap, or not provably aligned
                if op is Ops.STORE and any(len(accesses) != 1 for accesses in run):
                    continue
                wide = UOp(Ops.SHRINK, src=(buf, offset, UOp.const(w)))
                if op is Ops.LOAD:
                    load = wide.load()
                    for part, accesses in enumerate(run):
                        for access in accesses:  # its users read lanes access.index(i)
                            replace.update({access.index(i): load.index(4 * part + i) for i in range(4)})
                else:
                    lanes = tuple(st[0].src[1].index(i) for st in run for i in range(4))
                    store = wide.store(UOp(Ops.STACK, src=lanes))  # not UOp.stack: its shape checks cost ~4 s of S1's first compile
                    replace.update({st[0]: store for st in run})
                done.update(const + 4 * i for i in range(w // 4))
                break
    return sink.substitute(replace, name=f"shvit_tiny: {width}-float vectors") if replace else sink


def vector_width(ren) -> int:
    """16 floats where clang was asked for 512-bit vectors (target.compile_context), else 8."""
    return 16 if "prefer-vector-width=512" in (ren.target.arch or "") else 8


def wrapped(coalesce):
    """tinygrad's grouping pass (``tinygrad.codegen.memory_coalescing``), then this one for this
    package's kernels on the CPU device (hooks.py installs it while the fast path compiles)."""

    def memory_coalescing(sink, ren):
        out = coalesce(sink, ren)
        name = getattr(sink.arg, "name", "") or ""
        if ren is not None and ren.target.device == "CPU" and name.startswith(KERNEL_PREFIXES):
            out = widen(out, vector_width(ren))
        return out

    memory_coalescing.shvit_wide = True
    return memory_coalescing
