"""tinygrad's own kernels in a fast-path capture, cut across cores below its heuristic's threshold.

Why: on several cores a kernel of the replay starts when every slice of the one before is done
(pool.c), so a kernel left whole runs on one core while the others wait for it. tinygrad 0.14's
heuristic (``hand_coded_optimizations``) asks for its THREAD split only where each slice gets
128K elements: the ~90 small generic kernels of S1's capture at batch 16 (softmax, norms,
pooling, concatenation: 2.6 ms on one core) stayed whole. This pass runs after the heuristic and
cuts a kernel it left whole the way the heuristic would (the first output axis the slices divide,
as many slices as fit), down to ``SLICE_ELEMENTS`` a slice: 25 of S1's 28 distinct generic
kernels cut, S1 at batch 16 on two cores 3% faster (A/B/A in one process, a 2-core Xeon; 1K
elements a slice 2.5%, 16K 0.6%). Each slice computes its elements as the whole kernel does, so
the answers are bit for bit the same.

hooks.py installs it only while the fast path compiles; it cuts into the slices the fast path
compiles for (target.slices), and never on one core.
"""
from __future__ import annotations

SLICE_ELEMENTS = 4096  # the fewest output elements a slice gets


def cut(k, slices: int) -> None:
    """Apply THREAD to scheduler ``k``: the most slices up to ``slices`` that get SLICE_ELEMENTS
    each, on the first weak (output) axis they divide, as tinygrad's heuristic picks one."""
    from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
    from tinygrad.helpers import prod
    from tinygrad.uop.ops import AxisType, resolve

    for n in (32, 16, 12, 8, 6, 5, 4, 3, 2):
        if n > slices or resolve(prod(k.full_shape) < n * SLICE_ELEMENTS):
            continue
        for axis in k.axes_of(AxisType.WEAK):
            if k.full_shape[axis] % n == 0:
                try:
                    k.apply_opt(Opt(OptOps.THREAD, axis, n))
                    return
                except KernelOptError:
                    break
        # no axis takes n slices: try fewer


def wrapped(heuristic, slices: int):
    """tinygrad's ``hand_coded_optimizations``, then ``cut`` for a CPU kernel it left whole."""
    from tinygrad.codegen.opt import OptOps

    def hand_coded_optimizations(k):
        k = heuristic(k)
        if slices > 1 and k.ren.has_threads and not any(o.op is OptOps.THREAD for o in k.applied_opts):
            cut(k, slices)
        return k

    hand_coded_optimizations.shvit_split = True
    return hand_coded_optimizations
