"""``python -m shvit_tiny.render``: does the model lower to each GPU backend's kernel source?

tinygrad's NULL device runs nothing, but schedules, lowers and renders every kernel for the
renderer its target names (``DEV=NULL:METAL``): the code a Mac, an NVIDIA card, an OpenCL GPU
or a browser (WebGPU) would be handed. Here their compilers are stand-ins that keep the source
(this machine has neither Metal's nor NVIDIA's), so what this proves is that every operation
and dtype of the model has a rendering on that backend, not that its compiler accepts it.

    python -m shvit_tiny.render --variant s1 --resolution 224    # METAL, CUDA, CL and WEBGPU
"""
from __future__ import annotations

import argparse
import sys
import types
from dataclasses import dataclass

# backend -> tinygrad's name for its renderer on the NULL device
RENDERERS = {"METAL": "METAL", "CUDA": "CUDA:sm_80", "CL": "OPENCL", "WEBGPU": "WGSL"}  # sm_80: an A100's


@dataclass
class Rendered:
    backend: str
    dtype: str
    kernels: int
    source_bytes: int
    sources: list[str]


def stub_compilers() -> None:
    """Replace Metal's and NVRTC's compilers (native libraries, absent here) by tinygrad's base
    ``Compiler``, which returns the source as the binary. Process-wide; call before rendering."""
    from tinygrad.device import Compiler
    from tinygrad.runtime.support import compiler_cuda

    if "tinygrad.runtime.ops_metal" not in sys.modules:
        try:
            import tinygrad.runtime.ops_metal  # noqa: F401  (a Mac: the real module imports)
        except OSError:  # elsewhere: libSystem.dylib is missing
            stand_in = types.ModuleType("tinygrad.runtime.ops_metal")
            stand_in.MetalCompiler = lambda: Compiler(None)
            sys.modules["tinygrad.runtime.ops_metal"] = stand_in
    compiler_cuda.NVRTCCompiler = lambda arch, ptx=True, cache_key="cuda": Compiler(None)


def render(model, shape: tuple[int, ...], backend: str) -> Rendered:
    """Lower ``model`` (loaded on the NULL device) for ``backend``'s renderer at input ``shape``."""
    from tinygrad import Context, Tensor
    from tinygrad.codegen import to_program_cache
    from tinygrad.uop.ops import Ops

    before = set(to_program_cache)
    with Context(DEV=f"NULL:{RENDERERS[backend]}", PARALLEL=0):  # in this process: its workers lack the stand-ins
        x = Tensor.empty(*shape, device="NULL")
        model.forward(x).realize()
    progs = [p for k, p in to_program_cache.items() if k not in before]
    sources = [s.arg for p in progs for s in p.src if s.op is Ops.SOURCE]
    return Rendered(backend, model.dtype.name, len(progs), sum(len(s) for s in sources), sources)


def main(argv=None) -> int:
    from shvit_numpy.cli import fail
    from shvit_numpy.config import VARIANTS, default_resolution
    from shvit_numpy.errors import ShvitError, first_line

    p = argparse.ArgumentParser(prog="python -m shvit_tiny.render", description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="s1", choices=sorted(VARIANTS))
    p.add_argument("--resolution", type=int, help="input height and width (default: the variant's)")
    p.add_argument("--backends", default=",".join(RENDERERS), help=f"comma-separated, of {', '.join(RENDERERS)}")
    p.add_argument("--half", action="store_true", help="float16 weights and activations")
    args = p.parse_args(argv)
    try:
        backends = [b.strip().upper() for b in args.backends.split(",") if b.strip()]
        if bad := [b for b in backends if b not in RENDERERS]:
            raise ShvitError(f"unknown backend {bad[0]!r}; expected some of {', '.join(RENDERERS)}")
        cfg = VARIANTS[args.variant]
        res = args.resolution or default_resolution(cfg)
        if res < 1:
            raise ShvitError(f"--resolution must be >= 1, got {res}")
        model = null_model(cfg, args.half)
        stub_compilers()
        ok = True
        for b in backends:
            try:
                r = render(model, (1, cfg.in_chans, res, res), b)
                print(f"{b:7s} {r.dtype:8s} {r.kernels:4d} kernels, {r.source_bytes / 1e3:8.1f} kB of source  OK")
            except Exception as e:  # a renderer that lacks an op or dtype raises; say which
                ok = False
                print(f"{b:7s} NOT OK: {first_line(e, named=True)}")
        return 0 if ok else 1
    except ShvitError as e:
        return fail("python -m shvit_tiny.render", e)


def null_model(cfg, half: bool = False):
    """An SHViT of ``cfg`` with its (placeholder) weights on the NULL device, folded as load() does."""
    from tinygrad import Context, Tensor

    from shvit_numpy.tree import leaves

    from .layers import building_on
    from .model import SHViT

    with building_on("NULL"):
        model = SHViT(cfg).fuse(ready=False)
    model.device = "NULL"
    if half:
        model.half(ready=False)
    with Context(PARALLEL=0):
        Tensor.realize(*(t for _, t in leaves(model, Tensor)))  # the weights' own kernels, NULL's C renderer: not counted
    return model


if __name__ == "__main__":
    sys.exit(main())
