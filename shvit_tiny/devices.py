"""Choosing a tinygrad device, with one-line errors instead of tracebacks.

tinygrad 0.14 names: CPU (C compiled with clang), CL (OpenCL), METAL, CUDA, NV, AMD, QCOM,
WEBGPU; any case is accepted, and the old names CLANG (now CPU) and GPU (now CL) too.
With no device given: ``DEV=...`` if set, else the first that works in tinygrad's order
(METAL, AMD, NV, CUDA, QCOM, CL, CPU), except that an OpenCL device which is really the CPU
(PoCL) comes after tinygrad's own CPU device: this model's CPU kernels are faster there.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import subprocess

from shvit_numpy.errors import ShvitError

KNOWN = ("CPU", "CL", "METAL", "CUDA", "NV", "AMD", "QCOM", "WEBGPU", "PYTHON", "NULL")
ALIASES = {"CLANG": "CPU", "GPU": "CL", "OPENCL": "CL"}
ORDER = ("METAL", "AMD", "NV", "CUDA", "QCOM", "CL", "CPU")  # tinygrad's own preference


def clang_missing() -> bool:
    """tinygrad's CPU device compiles C with ``$CC`` (default clang) unless told to use LLVM."""
    from tinygrad.helpers import DEV

    return shutil.which(os.environ.get("CC", "clang")) is None and DEV.target("CPU").renderer not in ("LLVM", "X86")


def opens(name: str) -> bool:
    from tinygrad import Device

    if name == "CPU" and clang_missing():
        return False
    try:
        Device[name]
        return True
    except Exception:  # a missing driver or library raises anything from OSError to RuntimeError
        return False


def cl_is_cpu() -> bool:
    """Whether tinygrad's CL device is an OpenCL implementation running on the CPU (PoCL)."""
    try:
        import ctypes

        from tinygrad import Device
        from tinygrad.runtime.autogen import opencl as cl

        kind = ctypes.c_uint64()
        cl.clGetDeviceInfo(Device["CL"].cl_dev, cl.CL_DEVICE_TYPE, 8, ctypes.byref(kind), None)
        return kind.value == cl.CL_DEVICE_TYPE_CPU
    except Exception:
        return False


def available_devices() -> list[str]:
    """The devices that open on this machine, best first (see the module docstring)."""
    works = [d for d in ORDER if opens(d)]
    if "CL" in works and "CPU" in works and cl_is_cpu():
        works.remove("CL")
        works.append("CL")
    return works


def default_device() -> str:
    from tinygrad.helpers import DEV

    if DEV.device:  # DEV=... as tinygrad read it at import (it later sets os.environ["DEV"] itself)
        return DEV.device  # a renderer choice such as DEV=CPU:LLVM stays with tinygrad
    works = available_devices()
    if not works:
        hint = "; its CPU device needs clang: sudo apt-get install clang" if clang_missing() else ""
        raise ShvitError(f"tinygrad found no usable device on this machine{hint}")
    return works[0]


def use_target(base: str, spec: str) -> None:
    """Make ``spec`` (``DEV``'s syntax: ``PYTHON::METAL``, ``CPU:LLVM``, ``CUDA:PTX``) the target
    tinygrad compiles for on device ``base``, as ``DEV=spec`` would: process-wide, since tinygrad
    opens each device once. Refused once ``base`` is open with another renderer or arch."""
    from tinygrad import Device
    from tinygrad.helpers import DEV, Target

    try:
        want = Target.parse(base + spec[len(spec.split(":")[0]):])
    except RuntimeError as e:
        raise ShvitError(f"bad device {spec!r}: {e} (expected DEVICE[:RENDERER[:ARCH]], e.g. PYTHON::METAL)") from None
    if want == DEV.target(base):
        return
    if base in Device._opened_devices:
        raise ShvitError(f"device {base} is already open for {DEV.target(base)!r} in this process; "
                         f"{spec!r} needs a new process (or DEV={spec} before it starts)")
    DEV.value = [want] + [t for t in DEV.value if t.device != base and t != Target()]  # other devices' targets kept


def resolve_device(name: str | None) -> str:
    """A device tinygrad accepts, opened and ready; ``ShvitError`` naming what works otherwise.
    A renderer/arch suffix (``PYTHON::METAL``: tinygrad's emulator running Metal's kernels;
    ``CPU:LLVM``) becomes that device's target (``use_target``); the device is returned bare."""
    if name is None:
        name = default_device()
    base = name.upper().split(":")[0]
    base = ALIASES.get(base, base)
    if base not in KNOWN:
        works = ", ".join(available_devices()) or "none"
        raise ShvitError(f"unknown device {name!r}; tinygrad's devices are {', '.join(KNOWN)} (working here: {works})")
    index = name.split(":")[1] if name.count(":") == 1 and name.split(":")[1].isdigit() else None  # CUDA:1, the second GPU
    if ":" in name and index is None:
        use_target(base, name)
    if base == "CPU" and clang_missing():
        raise ShvitError("tinygrad's CPU device needs clang: install it with `sudo apt-get install clang` "
                         "(macOS: `xcode-select --install`), or choose another --device")
    full = base if index is None else f"{base}:{index}"
    if not opens(full):
        works = ", ".join(d for d in available_devices() if d != base) or "none"
        raise ShvitError(f"device {full} is not available on this machine; available: {works}")
    return full


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


def compile_context(device: str):
    """The context this model's kernels are compiled in: no one-worker compile pool (see
    ``compile_workers``); and on the CPU device, 512-bit vectors where the CPU has them. tinygrad's
    CPU device runs clang with ``-march=native``, yet on AVX-512 CPUs clang still prefers 256-bit
    vectors; there this asks it for 512-bit ones (tinygrad's own
    ``DEV=CPU:CLANG:x86_64,native,prefer-vector-width=512``), and shvit_tiny.wide_vectors then gives
    the kernels 16-float vectors: the products ~1.4x faster. Only while compiling, only for the
    CPU device and only when ``DEV`` names no renderer or arch for it (a choice of yours is left
    as it is)."""
    from tinygrad import Context
    from tinygrad.helpers import DEV, Target

    settings = {}
    if (workers := compile_workers()) is not None:
        settings["PARALLEL"] = workers
    cpu = [t for t in DEV.value if t.device in ("", "CPU")]
    if device == "CPU" and not any(t.renderer or t.arch for t in cpu) and has_avx512():
        wide = Target("CPU", "CLANG", "x86_64,native,prefer-vector-width=512")
        settings["DEV"] = [wide] + [t for t in DEV.value if t not in cpu]  # other devices' targets kept
    return Context(**settings) if settings else contextlib.nullcontext()
