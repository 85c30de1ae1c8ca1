"""The CPU fast path: the same model, run through hand-written kernels, replayed as flat C calls,
its compiled captures kept on disk. The one seam between it and the reference path (layers.py,
model.py, tinygrad's own kernels and TinyJit) is ``SHViT.__call__``:

    if fast.applies(self):
        return fast.run(self, x, jit)

What is here (tests/test_tiny.py checks its answers against the reference path and torch,
tests/test_fast.py its kernels' values and C source; test_tiny.py also that kernels split across
cores answer bit for bit as one core):
  kernels.py       matrix products, 3x3 and depthwise convolutions, attention's weighted sum, in
                   tinygrad's UOp language with register tiles for the target CPU (target.py)
  pack.py          their weights, laid out on the host in the order the kernels read them
  lower.py         the model's layer tree run through those kernels, ReLU and residuals fused
  wide_vectors.py  8- and 16-float loads and stores for those kernels
  generic_split.py tinygrad's own small kernels cut across cores too
  hooks.py         those two passes in tinygrad's compiler, only while the fast path compiles
  replay.py        a TinyJit capture replayed as a flat list of C calls (CPU device)
  parallel.py      those calls on every core: pool.c's threads run each kernel's core slices at once
  cache.py         captures saved on disk, so a new process answers without compiling
  runner.py        the above per model: capture, cache, replay

The kernels apply on tinygrad's CPU device in float32; other devices and float16 run the reference
graph, still with the cache (and replay on the CPU). ``SHVIT_FAST=0``, ``load(..., fast=False)``
or ``--no-fast`` run the reference path; on a tinygrad other than the pinned one the reference path
runs, and one line says so. Importing this package changes nothing in tinygrad.
"""
from __future__ import annotations

import functools
import os
import sys

PINNED = "0.14.0"  # the tinygrad whose internals (UOp kernels, TinyJit's capture) this reads
_SAID: set[str] = set()


@functools.cache
def tinygrad_version() -> str:
    """Asked once per process (reading package metadata costs ~1 ms: not on every call)."""
    from importlib.metadata import version

    return version("tinygrad")


def notice(msg: str) -> None:
    """One line on stderr, once per process and message."""
    if msg not in _SAID:
        _SAID.add(msg)
        print(f"shvit: {msg}", file=sys.stderr)


def switched_off(name: str) -> bool:
    """Whether the environment variable ``name`` (SHVIT_FAST, SHVIT_CACHE) says off: 0, false, no,
    off or empty; unset means on."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off", "")


def enabled() -> bool:
    """Whether the fast path may run in this process: not turned off, and the pinned tinygrad."""
    if switched_off("SHVIT_FAST"):
        return False
    if tinygrad_version() != PINNED:
        notice(f"tinygrad {tinygrad_version()} is not the pinned {PINNED}: the fast path is off, "
               "the model runs tinygrad's own kernels (same answers, slower)")
        return False
    return True


def applies(model) -> bool:
    """Whether ``model`` runs on the fast path (see the module docstring)."""
    return model.use_fast and enabled()


def checks_finite(model, x, jit: bool = True) -> bool:
    """Whether ``model(x, jit)`` checks the numpy batch ``x`` is finite itself, on the way (a
    replay of x's shape on pool.c; ``jit=False`` runs the lazy graph, no replay), so the caller
    need not."""
    runner = model.runner if jit and applies(model) else None
    replay = runner.replays.get(x.shape) if runner is not None else None
    return replay is not None and replay.checks_finite()


def run(model, x, jit: bool = True):
    """``model(x)`` on the fast path: numpy in, numpy out; a Tensor in, a Tensor out."""
    from .runner import Runner

    if model.runner is None:
        model.runner = Runner(model)
    return model.runner(x, jit)
