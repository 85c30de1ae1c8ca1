"""Choosing a tinygrad device, with one-line errors instead of tracebacks.

tinygrad 0.14 names: CPU (compiled with clang), CL (OpenCL), METAL, CUDA, NV, AMD, QCOM, WEBGPU.
With no device given, tinygrad's default is used: ``DEV=...`` if set, else the first that works
in the order METAL, AMD, NV, CUDA, QCOM, CL, CPU.
"""
from __future__ import annotations

import os
import shutil

from shvit_numpy.errors import ShvitError

KNOWN = ("CPU", "CL", "METAL", "CUDA", "NV", "AMD", "QCOM", "WEBGPU")
ALIASES = {"CLANG": "CPU", "GPU": "CL", "OPENCL": "CL", "LLVM": "CPU"}


def available_devices() -> list[str]:
    from tinygrad import Device

    return list(dict.fromkeys(d.split(":")[0] for d in Device.get_available_devices()))


def resolve_device(name: str | None) -> str:
    """A device string tinygrad accepts, opened and ready; ``ShvitError`` naming what works otherwise."""
    from tinygrad import Device

    if name is None:
        try:
            name = Device.DEFAULT
        except RuntimeError:
            raise ShvitError("tinygrad found no usable device on this machine") from None
    base = name.upper().split(":")[0]
    base = ALIASES.get(base, base)
    full = base + name[len(name.split(":")[0]):]
    if base not in KNOWN:
        works = ", ".join(available_devices())
        raise ShvitError(f"unknown device {name!r}; tinygrad's devices are {', '.join(KNOWN)} (working here: {works})")
    if base == "CPU" and not shutil.which("clang") and not os.environ.get("CPU_LLVM"):
        raise ShvitError("tinygrad's CPU device needs clang: install it with `sudo apt-get install clang` (or `brew install llvm`)")
    try:
        Device[full]
    except Exception:
        works = ", ".join(d for d in available_devices() if d != base) or "none"
        raise ShvitError(f"device {base} is not available on this machine; available: {works}") from None
    return full
