"""What the figures were measured on: CPU, cores, memory, OS, and every library's version."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions that matter for these kernels."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile") if f in flags]


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        return round(kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        return None


def usable_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def numpy_blas() -> str | None:
    try:
        import numpy as np

        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy: no dict mode
        return None


def describe() -> dict:
    """A JSON-able description of this machine and the software the bench runs."""
    libs = {d: version(d) for d in ("numpy", "torch", "tinygrad", "onnxruntime", "onnx", "timm", "torchvision")}
    if libs["timm"]:
        try:
            from .standin import import_timm

            if import_timm()[1]:
                libs["timm"] += " (with a stand-in torchvision: PyPI's does not load beside this torch)"
        except Exception:  # installed but broken
            libs["timm"] += " (installed, does not import)"
    hypervisor = None
    try:
        with open("/proc/cpuinfo") as f:
            hypervisor = "hypervisor" in f.read()
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": len(usable_cpus()),
        "logical_cpus": os.cpu_count(),
        "virtual_machine": hypervisor,
        "memory_gib": memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": {k: v for k, v in libs.items() if v},
        "numpy_blas": numpy_blas(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def one_line(m: dict) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if k != "torchvision")
    blas = f" (numpy BLAS: {m['numpy_blas']})" if m.get("numpy_blas") else ""
    vm = ", virtual machine" if m.get("virtual_machine") else ""
    flags = f" [{', '.join(m['cpu_flags'])}]" if m.get("cpu_flags") else ""
    return (f"{m['cpu']}{flags}, {m['cores']} cores{vm}, {m['memory_gib']} GiB; {m['os']}; Python {m['python']}; "
            f"{libs}{blas}")
