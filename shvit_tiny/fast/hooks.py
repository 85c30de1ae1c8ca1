"""This package's two passes in tinygrad's compiler, installed only while the fast path compiles.

* wide_vectors.py: 8- and 16-float loads and stores for this package's kernels, after tinygrad's
  ``memory_coalescing`` (as ``tinygrad.codegen`` calls it);
* generic_split.py: tinygrad's own small kernels cut across cores, after its
  ``hand_coded_optimizations`` (``tinygrad.codegen.opt.heuristic``, which tinygrad imports each
  time it optimises a kernel), when compiling for several cores.

``active(slices)`` (target.compile_context enters it) installs both and puts tinygrad's own back
on leaving: a tinygrad program of yours in the same process is never compiled with them.
tinygrad's compile workers (spawned processes that lower kernels in parallel when there are cores
to spare) start with the passes inside the block, and a pool started there is closed on leaving
it. With any tinygrad other than 0.14.0 nothing is installed: the kernels keep tinygrad's own
4-float vectors and its own splits (the same answers, slower).
"""
from __future__ import annotations

import contextlib
import functools

from . import generic_split, wide_vectors

_saved: tuple | None = None  # tinygrad's own (memory_coalescing, hand_coded_optimizations, worker start-up) while active
_depth = 0


def pinned() -> bool:
    from . import PINNED, tinygrad_version

    return tinygrad_version() == PINNED


def install(slices: int) -> None:
    """The passes, over whatever tinygrad has now (in this process, or a fresh worker's)."""
    import tinygrad.codegen as codegen
    import tinygrad.codegen.opt.heuristic as heuristic

    codegen.memory_coalescing = wide_vectors.wrapped(codegen.memory_coalescing)
    heuristic.hand_coded_optimizations = generic_split.wrapped(heuristic.hand_coded_optimizations, slices)


@contextlib.contextmanager
def active(slices: int = 1):
    """Inside this block (nestable: the outermost block's ``slices`` hold) tinygrad compiles with
    the passes, cutting its kernels into up to ``slices`` slices; outside, as shipped. Yields
    whether the passes are on (False on another tinygrad)."""
    global _depth, _saved
    import tinygrad.codegen as codegen
    import tinygrad.codegen.opt.heuristic as heuristic
    from tinygrad.engine import worker

    if _depth == 0:
        if not pinned() or getattr(codegen, "memory_coalescing", None) is None:
            yield False
            return
        _saved = (codegen.memory_coalescing, heuristic.hand_coded_optimizations, worker._init_worker)
        install(slices)
        worker._init_worker = functools.partial(init_worker, slices)
        if worker.worker_pool is not None:  # started without the passes: the next one starts with them
            worker.terminate_worker_pool()
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            codegen.memory_coalescing, heuristic.hand_coded_optimizations, worker._init_worker = _saved
            _saved = None
            if worker.worker_pool is not None:  # its workers have the passes: none of them serves you
                worker.terminate_worker_pool()


def init_worker(slices: int) -> None:
    """A compile worker's start (in the spawned process, which unpickles this function and so
    imports this module): tinygrad's own set-up, then the passes, for the worker's whole life (the
    pool is closed when the block that started it ends)."""
    from tinygrad.engine import worker

    worker._init_worker()  # a fresh process: this is tinygrad's own
    install(slices)
