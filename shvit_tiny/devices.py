"""Choosing a tinygrad device, with one-line errors instead of tracebacks.

tinygrad 0.14 names: CPU (C compiled with clang), CL (OpenCL), METAL, CUDA, NV, AMD, QCOM,
WEBGPU; any case is accepted, and the old names CLANG (now CPU) and GPU (now CL) too.
With no device given: ``DEV=...`` if set, else the first that works in tinygrad's order
(METAL, AMD, NV, CUDA, QCOM, CL, CPU), except that an OpenCL device which is really the CPU
(PoCL) comes after tinygrad's own CPU device: this model's CPU kernels are faster there.
"""
from __future__ import annotations

import os
import shutil

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
