"""A captured TinyJit replayed on tinygrad's CPU device as a flat list of C calls.

Why: TinyJit replays its capture by walking it in Python for every kernel (resolving each
argument buffer, its launch size and variables, updating statistics): ~25 us per kernel here,
and S1 is 170 kernels, so 4 ms of a 14 ms call at batch 1 went to bookkeeping; copying the numpy
batch in (``Tensor(x).realize()``, a scheduled copy) cost 2 ms more. On the CPU device a kernel
is a C function whose arguments are buffer addresses and constants, and once a capture is
memory-planned its buffers never move. So ``CpuReplay`` resolves the capture once into
(function, arguments) pairs, copies the input straight into the capture's input buffer
(``memmove``), calls the pairs in order (~2 us each) and copies the logits out: S1 at batch 1
went from 14.4 to 6.8 ms on one core, at batch 16 from 74 to 57 ms. The kernels, their order
and their buffers are tinygrad's own, so the answers are bit for bit the JIT's.

No copy in: the kernels that read the input buffer (the stem's first convolution) are given the
caller's array itself, where it lies, when it is aligned as their C declares its vectors (csource.py's
kernels: any float; tinygrad's: 16 bytes or more) and none of them writes there; else it is
copied in. The copy was ~1.4 ms of each S1 batch of 16 (9.6 MB), 2-4% of a call.

Scope: a capture made only of compiled kernels on the CPU device (clang or LLVM), one input, no
symbolic sizes; anything else (OpenCL, GPUs, a capture holding a copy) gets ``None`` from
``cpu_replay`` and keeps TinyJit's replay. It reads TinyJit internals of the pinned tinygrad
0.14.0; with another version ``cpu_replay`` returns ``None`` too. ``SHVIT_REPLAY=0`` turns it
off (the JIT replays as it would without this module).
"""
from __future__ import annotations

import ctypes
import functools
import os
import re

import numpy as np

from shvit_numpy.checks import check_finite

from . import PINNED, parallel, tinygrad_version


def enabled() -> bool:
    return os.environ.get("SHVIT_REPLAY", "1") != "0"


class CpuReplay:
    """``replay(x)``: numpy batch of the captured shape in, numpy output out, the kernels called
    from C (parallel.py's pool: their core slices on ``threads`` threads) or, without a C
    compiler, from Python one after another."""

    def __init__(self, kernels: list, held: list, in_addr: int, in_shape: tuple, in_dtype: np.dtype,
                 out_addr: int, out_shape: tuple, out_dtype: np.dtype, threads: int = 1,
                 in_slots: tuple = (), in_align: int = 0):
        self.kernels, self.held = kernels, held  # kernels: (address, slices, core argument or -1, arguments)
        self.in_addr, self.in_shape, self.in_dtype = in_addr, in_shape, in_dtype  # held: the Buffers those use
        self.out_addr, self.out_shape, self.out_dtype = out_addr, out_shape, out_dtype
        self.threads = threads
        self.in_slots, self.in_align = in_slots, in_align  # (kernel, argument) holding in_addr; 0: always copy
        self.reading = in_addr  # where those arguments point now
        self.nonfinite = ctypes.c_int32(0)  # set by pool.c's finiteness check (float32 batches)

    # Made on first use, not with the replay: a process that answers once (a capture just
    # compiled; its replay made for a second call that never comes) then never builds pool.c
    # (~0.1 s of clang).
    @functools.cached_property
    def array(self):
        """The calls as pool.c's array, or None without pool.c: first pool.c's check that the
        batch is finite (its slices on every thread), then the kernels."""
        if parallel.library() is None:
            return None
        slices, floats = (self.threads * 4 if self.threads > 1 else 1), int(np.prod(self.in_shape))
        check = parallel.finite_check(slices, self.nonfinite)
        array = parallel.calls_array([check, *self.kernels])
        array[0].args[0], array[0].args[1] = self.reading, floats if self.in_dtype == np.float32 else 0  # else: numpy's
        return array

    def checks_finite(self) -> bool:
        """Whether a call checks its batch is finite itself (pool.c's check, run with the kernels):
        then the caller need not (shvit_numpy.checks.check_array's ``finite``)."""
        return self.array is not None and self.in_dtype == np.float32

    @functools.cached_property
    def calls(self) -> list | None:
        """Without pool.c: the calls as ctypes calls, slice after slice (else None)."""
        return None if self.array is not None else python_calls(self.kernels)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.in_dtype)
        assert x.shape == self.in_shape, (x.shape, self.in_shape)  # the caller picks the replay by shape
        in_place = self.array is not None and self.in_align and x.ctypes.data % self.in_align == 0
        self.read_from(x.ctypes.data if in_place else self.in_addr)
        if not in_place:
            ctypes.memmove(self.in_addr, x.ctypes.data, x.nbytes)
        if self.array is not None:
            self.nonfinite.value = 0
            parallel.pool(self.threads).run(self.array, len(self.array))
            check_finite(not self.nonfinite.value)  # the kernels ran on it, and their answer is dropped
        else:
            for fxn, args in self.calls:
                fxn(*args)
        out = np.empty(self.out_shape, self.out_dtype)
        ctypes.memmove(out.ctypes.data, self.out_addr, out.nbytes)
        return out

    def read_from(self, addr: int) -> None:
        """Point the input's readers (pool.c's calls) at ``addr``: the caller's batch, or the capture's buffer."""
        if addr != self.reading:
            for i, j in self.in_slots:
                self.array[1 + i].args[j] = addr  # after the finiteness check, which reads it too
            self.array[0].args[0] = addr
            self.reading = addr


def input_readers(kernels: list, sources: list, writes: list, in_addr: int, nbytes: int) -> tuple[tuple, int]:
    """The (kernel, argument) pairs holding the input buffer's address, and the alignment the
    caller's batch needs to be read in its place: the widest vector alignment (``aligned(n)``)
    those kernels' C declares, at least a float's; 0 where it cannot be (a kernel writes the
    input buffer, or reads part of it through another address)."""
    slots, align = [], 4
    for i, (_, _, _, args) in enumerate(kernels):
        for j, a in enumerate(args):
            if in_addr < a < in_addr + nbytes:
                return (), 0  # a view into the input
            if a == in_addr:
                if j in writes[i]:
                    return (), 0
                slots.append((i, j))
                align = max([align, *map(int, re.findall(r"aligned\((\d+)\)", sources[i]))])
    return tuple(slots), align


def python_calls(kernels: list) -> list:
    """The kernels as ctypes calls, each core slice after the other (as CPUProgram.__call__ runs them)."""
    calls = []
    for addr, slices, core_arg, args in kernels:
        fxn = ctypes.CFUNCTYPE(None)(addr)
        for core in range(slices):
            a = list(args)
            if core_arg >= 0:
                a[core_arg] = core
            calls.append((fxn, tuple(ctypes.c_uint64(v) for v in a)))
    return calls


def cpu_replay(jit, device: str, shape: tuple, dtype, threads: int = 1) -> CpuReplay | None:
    """The flat replay of ``jit`` (a TinyJit that has captured its call on a ``shape`` batch of
    tinygrad ``dtype`` on ``device``) on ``threads`` threads, or None where its capture is not
    one this module handles."""
    if not enabled() or tinygrad_version() != PINNED or getattr(jit, "captured", None) is None:
        return None
    try:
        return _build(jit.captured, device, shape, dtype, threads)
    except _Unsupported:
        return None


class _Unsupported(Exception):
    pass


def _build(captured, device: str, shape: tuple, dtype, threads: int) -> CpuReplay:
    from tinygrad import Device, Tensor
    from tinygrad.engine.realize import get_runtime, resolve_params, unwrap_multi
    from tinygrad.helpers import to_tuple
    from tinygrad.runtime.ops_cpu import CPUDevice, CPUProgram
    from tinygrad.uop.ops import Ops

    if not isinstance(Device[device], CPUDevice) or len(captured.expected_input_info) != 1:
        raise _Unsupported
    inp = Tensor.empty(*shape, dtype=dtype, device=device).realize()  # this replay's own input buffer
    in_buf = inp.uop.base.buffer.ensure_allocated()
    kernels, held, sources, writes = [], [in_buf], [], []
    for call in captured.linear.src:
        ast = call.src[0]
        if call.op is not Ops.CALL or ast.op is not Ops.PROGRAM:
            raise _Unsupported  # a copy, a graph, a custom function: TinyJit knows how to run those
        resolved = resolve_params(call, (inp.uop.base,))
        per_device = list(zip(to_tuple(call.src[1].device), unwrap_multi(call, [resolved[i] for i in ast.arg.globals])))
        if len(per_device) != 1 or per_device[0][1][1]:
            raise _Unsupported  # a multi-device buffer
        dev, (bufs, _) = per_device[0]
        bufs = [b.ensure_allocated() for b in bufs]
        prg = get_runtime(dev, ast)
        if not isinstance(prg, CPUProgram) or prg.lvp:
            raise _Unsupported
        global_size, _ = ast.arg.launch_dims({})
        core_arg = prg.runtimevars.get("core_id", -1)  # split across cores: one call per core id
        args = [b.get_buf(dev).va_addr for b in bufs] + [v or 0 for v in ast.arg.vals({})]  # core_id's: set per call
        kernels.append((prg.addr, global_size[0] if core_arg >= 0 else 1, core_arg, tuple(args)))
        sources.append(next((u.arg for u in ast.src if u.op is Ops.SOURCE), "aligned(4096)"))  # none: never in place
        writes.append(set(ast.arg.outs))
        held += bufs + [prg]  # the buffers and the program's code, kept alive
    out = captured.ret
    out_buf = out.uop.base.buffer
    if out_buf.nbytes != out.numel() * out.dtype.itemsize:
        raise _Unsupported  # a view into a larger buffer
    np_dtype = np.dtype(dtype.fmt)
    in_addr = in_buf._buf.va_addr
    slots, align = input_readers(kernels, sources, writes, in_addr, in_buf.nbytes)
    return CpuReplay(kernels, held + [out_buf], in_addr, tuple(shape), np_dtype,
                     out_buf.ensure_allocated()._buf.va_addr, tuple(out.shape), np.dtype(out.dtype.fmt), threads,
                     slots, align)
