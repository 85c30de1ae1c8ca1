"""What the CPU fast path compiles for: the target CPU's vector width, and the compile settings.

The register tiles (kernels.product_tile) and the vector widening (wide_vectors.py) follow the CPU
clang compiles for: this machine, or the CPU you name with ``DEV=CPU:CLANG:x86_64,<cpu>``.
``compile_context`` is the context the fast path's captures are compiled in: tinygrad's own
``Context`` (scoped settings), with the vector widening pass active only inside it.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess

from . import hooks


@functools.cache
def has_avx512() -> bool:
    """Whether this is an x86-64 CPU with AVX-512 (Linux: /proc/cpuinfo's flags)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


@functools.cache
def march_has_avx512(cpu: str) -> bool:
    """Whether clang's ``-march=cpu`` turns on AVX-512 (asked of clang itself: its predefined macros)."""
    try:
        out = subprocess.run([os.environ.get("CC", "clang"), f"-march={cpu}", "-dM", "-E", "-x", "c", os.devnull],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "__AVX512F__" in out


def target_has_avx512() -> bool:
    """Whether tinygrad's CPU device compiles for a CPU with AVX-512: the CPU named in your
    ``DEV=CPU:CLANG:x86_64,<cpu>[,<features>]`` if you set one (``x86-64-v3`` or ``znver3``: AVX2),
    else this machine. The register tiles follow it (layers.product_tile)."""
    from tinygrad.helpers import DEV

    arch = (DEV.target("CPU").arch or "").split(",")
    if arch == [""]:
        return has_avx512()
    if arch[0] != "x86_64" or len(arch) < 2:
        return False
    if "avx512f" in arch[2:] or "-avx512f" in arch[2:]:
        return "avx512f" in arch[2:]
    return has_avx512() if arch[1] == "native" else march_has_avx512(arch[1])


def wide_vectors_asked() -> bool:
    """Whether the CPU device is compiling for 512-bit vectors now (inside ``compile_context`` on
    an AVX-512 CPU, or your ``DEV=...,prefer-vector-width=512``)."""
    from tinygrad.helpers import DEV

    return "prefer-vector-width=512" in (DEV.target("CPU").arch or "")


def num_cpu_threads() -> int:
    """tinygrad's ``NUM_CPU_THREADS`` now. Outside ``compile_context``: the cores a model runs on
    by default (the environment variable, else the cores this process may use); inside it, the
    slices each kernel is cut into (``slices`` of the model's cores, which the kernels read)."""
    from tinygrad.helpers import NUM_CPU_THREADS

    return max(1, int(NUM_CPU_THREADS.value))


def slices(cores: int) -> int:
    """How many slices a kernel is cut into for ``cores`` cores: 4 a core on several (pool.c's
    threads take them as they come, so a thread slowed by another program's takes fewer), 1 on one."""
    return cores * 4 if cores > 1 else 1


def compile_workers() -> int | None:
    """tinygrad lowers kernels in a pool of PARALLEL worker processes (by default its thread count,
    divided among pytest-xdist workers). With one core to run on (taskset, a 1-CPU container, or
    two xdist workers on two cores) a pool of one is pure cost, ~30% of a first call (spawning,
    shipping every kernel there and back): then 0, lowering in this process. None: leave it
    (PARALLEL set by you, or cores to spare)."""
    from tinygrad.helpers import PARALLEL

    if "PARALLEL" in os.environ:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if min(PARALLEL.value, cores) <= 1 else None


@contextlib.contextmanager
def compile_context(device: str, cores: int | None = None):
    """The context the fast path's captures are compiled in: no one-worker compile pool (see
    ``compile_workers``); kernels cut into ``slices(cores)`` slices for ``cores`` cores
    (tinygrad's ``NUM_CPU_THREADS``; None: as it is); and on the CPU device, 512-bit vectors where the CPU has them. tinygrad's
    CPU device runs clang with ``-march=native``, yet on AVX-512 CPUs clang still prefers 256-bit
    vectors; there this asks it for 512-bit ones (tinygrad's own
    ``DEV=CPU:CLANG:x86_64,native,prefer-vector-width=512``), and wide_vectors.py, active only
    inside this block and only for the CPU device (hooks.py, with generic_split.py's cut of
    tinygrad's own kernels across the cores), gives the kernels 16-float vectors: the products
    ~1.4x faster. The 512-bit request is made only for the CPU device and only when ``DEV`` names
    no renderer or arch for it (a choice of yours is left as it is). Everything is restored on
    leaving the block. tinygrad's SPEC is 0 inside it unless you set SPEC: its default, 1,
    re-checks each graph it lowers against its UOp grammar (``type_verify``), ~1 s of S1's ~30 s
    first compile on one core; the check changes no program (SPEC is not among the settings
    tinygrad keys its programs by), it only finds bugs in a graph, so ``SPEC=1`` turns it back on
    while working on the kernels."""
    from tinygrad import Context
    from tinygrad.helpers import DEV, Target

    settings = {} if cores is None else {"NUM_CPU_THREADS": slices(cores)}
    if (workers := compile_workers()) is not None:
        settings["PARALLEL"] = workers
    if "SPEC" not in os.environ:
        settings["SPEC"] = 0  # tinygrad's grammar checks of every graph it lowers: see the docstring
    cpu = [t for t in DEV.value if t.device in ("", "CPU")]
    if device == "CPU" and not any(t.renderer or t.arch for t in cpu) and has_avx512():
        wide = Target("CPU", "CLANG", "x86_64,native,prefer-vector-width=512")
        settings["DEV"] = [wide] + [t for t in DEV.value if t not in cpu]  # other devices' targets kept
    with Context(**settings), (hooks.active(num_cpu_threads()) if device == "CPU" else contextlib.nullcontext()):
        yield
