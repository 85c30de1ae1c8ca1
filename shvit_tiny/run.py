"""``python -m shvit_tiny.run``: classify images or a saved batch with the tinygrad model.

The shared flags of shvit_numpy/cli.py, plus ``--device`` (tinygrad's CPU, CL, METAL, CUDA,
AMD, ...; any case; default: the best available), ``--half`` (float16 weights and activations;
softmax and GroupNorm stay float32), ``--bench N`` (after warm-up, time N batches),
``--beam N`` (tinygrad's kernel search: slower first run, faster kernels, cached on disk),
``--no-cache`` (compile afresh: the compiled-model cache, shvit_tiny/fast/cache.py, is not used),
``--threads N`` (the CPU cores each kernel is split across; default every core) and
``--no-fast`` (the reference path: layers.py with tinygrad's own kernels and TinyJit).
"""
from __future__ import annotations

import statistics
import sys
import time

from shvit_numpy import cli
from shvit_numpy.errors import ShvitError

PROG = "python -m shvit_tiny.run"


def timed_predict(model, bench: int):
    """The model as the CLI's batch function; reports compile time and, with --bench, speed."""

    def predict(x):
        t0 = time.perf_counter()
        y = model(x)  # the first call builds the graph and compiles its kernels
        first = time.perf_counter() - t0
        if bench:
            model(x)  # second call: TinyJit captures the kernels; later calls replay them
            times = []
            for _ in range(bench):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            print(f"{model.device} {'float16' if model.dtype.itemsize == 2 else 'float32'} batch {len(x)}: "
                  f"{len(x) / med:.1f} images/s, {1000 * med:.1f} ms per batch (median of {bench}, "
                  f"min {1000 * min(times):.1f}, max {1000 * max(times):.1f}); first call {first:.1f} s (compile)",
                  file=sys.stderr)
        return y

    return predict


def load_runtime(path, args) -> cli.Loaded:
    from .model import load

    if args.bench < 0 or (args.beam or 0) < 0:
        raise ShvitError("--bench and --beam take a count >= 0")
    if args.threads is not None and args.threads < 1:
        raise ShvitError(f"--threads takes a count >= 1, got {args.threads}")
    model = load(path, device=args.device, half=args.half, cache=not args.no_cache, fast=not args.no_fast, threads=args.threads)
    return cli.Loaded(timed_predict(model, args.bench), model.config, model.labels, model.resolution)


def main(argv=None) -> int:
    parser = cli.make_parser(PROG, __doc__.splitlines()[0],
                             device_help="tinygrad device: CPU, CL, METAL, CUDA, AMD, ... (default: the best available)")
    parser.add_argument("--half", action="store_true", help="float16 weights and activations (softmax, GroupNorm in float32)")
    parser.add_argument("--bench", type=int, default=0, metavar="N", help="after warm-up, time N batches and report images/s")
    parser.add_argument("--beam", type=int, metavar="N",
                        help="tinygrad's kernel search (BEAM=N): a slow first run, then faster kernels, cached on disk")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile afresh: neither read nor write the compiled-model cache (~/.cache/shvit; also SHVIT_CACHE=0)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU cores the fast path splits each kernel across (default: NUM_CPU_THREADS, else every core "
                             "this process may use)")
    parser.add_argument("--no-fast", action="store_true",
                        help="the reference path: tinygrad's own kernels, no CPU fast path, cache or replay (also SHVIT_FAST=0)")
    args = parser.parse_args(argv)
    try:
        from tinygrad import Context
    except ImportError:
        print(f"{PROG}: error: tinygrad is not installed: pip install tinygrad==0.14.0", file=sys.stderr)
        return 2
    with Context(**({"BEAM": args.beam} if args.beam and args.beam > 0 else {})):
        return cli.main(PROG, load_runtime, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
