"""Several cores for the CPU replay: pool.c's threads walk a capture's kernel calls together.

tinygrad's CPU device splits a kernel across cores with its THREAD opt (kernels.py asks for it on
the fast path's own kernels, tinygrad's heuristic on the rest): the kernel takes a core id and
computes that slice of its output. tinygrad 0.14 calls the slices one after another. ``Pool``
runs them at once, one thread per core, each taking the next slice not yet taken, a kernel
starting when the one before is done, all in C (pool.c), so there is no Python in the loop and no
GIL to share. It also serves one core: one C loop over the calls.

How many threads: the model's ``threads`` (``load(..., threads=N)``, ``--threads N``), by default
tinygrad's ``NUM_CPU_THREADS`` (the environment variable, else the cores this process may use);
the kernels are compiled split into that many slices (target.compile_context).

pool.c is compiled once per machine with the C compiler tinygrad's CPU device uses (clang, or
``CC``) and kept beside the compiled-model cache (cache.py's folder and its safety rules), its
name covering the source, the flags and the compiler; with that cache off it is built in a
temporary folder per process. Without a C compiler, or on Windows, ``library()`` is None and
replay.py calls the kernels from Python, slice after slice, as before.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import cache, notice

SOURCE = Path(__file__).with_name("pool.c")
FLAGS = ("-O2", "-shared", "-fPIC", "-pthread")
MAX_ARGS = 16  # as pool.c


class Call(ctypes.Structure):
    """pool.c's call_t: one kernel call (or, with ``core_arg`` >= 0, its ``slices`` core slices)."""
    _fields_ = [("fxn", ctypes.c_void_p), ("slices", ctypes.c_int32), ("core_arg", ctypes.c_int32),
                ("args", ctypes.c_uint64 * MAX_ARGS), ("next", ctypes.c_int32), ("done", ctypes.c_int32)]  # pool.c's atomic counters


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "clang"))


def library_name(cc: str) -> str:
    """The built library's file name: a digest of everything that shapes it."""
    st = os.stat(cc)
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(repr((FLAGS, cc, st.st_size, st.st_mtime_ns, sys.platform, os.uname().machine)).encode())
    return f"pool-{h.hexdigest()[:16]}.so"


def build(cc: str, out: Path) -> None:
    """Compile pool.c to ``out`` atomically (a temporary file renamed: a reader never sees half of it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
    finally:
        with cache._quiet():
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """pool.c as a loaded library, or None (no compiler, Windows, or the build failed: one line says so)."""
    cc = compiler()
    if cc is None or sys.platform == "win32":
        return None
    try:
        d = cache.safe_directory(create=True) if cache.enabled() else None
        if d is None:
            with tempfile.TemporaryDirectory() as tmp:
                lib = _load(cc, Path(tmp) / "pool.so")  # unlinked after loading: the process keeps it mapped
        else:
            lib = _load(cc, d / library_name(cc))
    except (OSError, subprocess.SubprocessError) as e:
        notice(f"the replay runs on one core: building fast/pool.c failed ({e})")
        return None
    lib.pool_new.restype, lib.pool_new.argtypes = ctypes.c_void_p, [ctypes.c_int]
    lib.pool_threads.restype, lib.pool_threads.argtypes = ctypes.c_int, [ctypes.c_void_p]
    lib.pool_run.restype, lib.pool_run.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.pool_free.restype, lib.pool_free.argtypes = None, [ctypes.c_void_p]
    return lib


def finite_check(slices: int, flag) -> tuple:
    """pool.c's finiteness kernel as a call (kernel address, slices, core argument, arguments):
    arguments batch address (0 here: set per call), float count (idem), ``flag``'s address, slices."""
    fxn = ctypes.cast(library().shvit_nonfinite, ctypes.c_void_p).value
    return fxn, slices, 4, (0, 0, ctypes.addressof(flag), slices, 0)


def _load(cc: str, path: Path) -> ctypes.CDLL:
    if not path.exists():
        build(cc, path)
    st = os.stat(path)
    if (why := cache.unsafe_reason(path, st, "file")) is not None:
        raise OSError(why)
    return ctypes.CDLL(str(path))


class Pool:
    """``pool.run(calls)``: a ctypes array of ``Call`` run in order on ``threads`` threads (this
    one and threads - 1 started here, asleep between runs). One pool per thread count and process."""

    def __init__(self, lib: ctypes.CDLL, threads: int):
        self.lib, self.pid = lib, os.getpid()
        self.handle = lib.pool_new(threads)
        if not self.handle:
            raise MemoryError("pool_new")
        self.threads = lib.pool_threads(self.handle)

    def run(self, calls, n: int) -> None:
        self.lib.pool_run(self.handle, ctypes.addressof(calls), n)  # ctypes lets go of the GIL meanwhile

    def __del__(self):
        if getattr(self, "handle", None) and os.getpid() == self.pid:
            self.lib.pool_free(self.handle)


_POOLS: dict[tuple[int, int], Pool] = {}


def pool(n: int) -> Pool | None:
    """This process's pool of ``n`` threads (a forked child gets its own: threads do not survive a
    fork), or None where pool.c cannot be built."""
    lib = library()
    if lib is None:
        return None
    key = (os.getpid(), n)
    if key not in _POOLS:
        _POOLS[key] = Pool(lib, n)
    return _POOLS[key]


def calls_array(calls: list[tuple[int, int, int, tuple[int, ...]]]):
    """(kernel address, slices, core argument or -1, arguments) per kernel -> a ``Call`` array."""
    arr = (Call * len(calls))()
    for i, (addr, slices, core_arg, args) in enumerate(calls):
        if len(args) > MAX_ARGS:
            raise ValueError(f"a kernel with {len(args)} arguments (pool.c takes {MAX_ARGS})")
        c = arr[i]
        c.fxn, c.slices, c.core_arg = addr, slices, core_arg
        c.args[:len(args)] = args
    return arr
