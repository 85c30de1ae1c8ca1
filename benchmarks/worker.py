"""One benchmark process: ``python -m benchmarks.worker SPEC.json OUT.json``.

``benchmarks.bench`` starts it with the thread limits already in its environment
(OMP/OpenBLAS/MKL/tinygrad/PoCL read them once, when first imported), and the spec names the
CPUs it may run on: the first thing the worker does is pin itself to them, before numpy or
torch is imported, so "one core" means one core for every library and every thread.

Two modes:

* ``speed``: for each variant, build every runtime once; for each batch size, warm each up
  (its first call compiles, where it compiles; the next ``warmup`` calls settle caches and
  capture tinygrad's JIT, and the last of them tells how many calls make one round last at
  least ``min_round_s``), then run ``rounds`` rounds in
  which every runtime takes its turn (the order rotates each round; with several threads, after
  a pause of ``SETTLE_S`` in which the last runtime's spinning threads go to sleep). A sample is one round's
  time per call; the result is the median and the min-max of the samples. Interleaving means
  a noisy moment on a shared machine hits every runtime, not one.
* ``memory``: one runtime, one model, one batch size, in this fresh process: the resident set
  size after importing the runtime's libraries, then the peak RSS while loading the model and
  running the batch three times (a high-water mark that never goes down, hence one process
  per measurement). The peak is what the process needs; the difference is what the model,
  its activations and (for compiled runtimes) its compiler cost on top of the imports. RSS
  sees every allocator alike (numpy's, torch's, ONNX Runtime's arena, tinygrad's buffers),
  which tracemalloc (Python and numpy allocations only) does not.
"""
from __future__ import annotations

import json
import os
import sys
import time


def pin(cpus) -> None:
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(keys, setup):
    """{key: runner} for every runtime that loads; {key: reason} for the others."""
    from shvit_numpy.errors import first_line

    from .runners import RUNTIMES, Unavailable

    runners, skipped = {}, {}
    for key in keys:
        try:
            runners[key] = RUNTIMES[key].load(setup)
        except Unavailable as e:
            skipped[key] = str(e)
        except Exception as e:  # a runtime that breaks must not take the others down
            skipped[key] = f"failed to load: {first_line(e, 160, named=True)}"
    return runners, skipped


def summary(samples):
    import statistics

    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


# Several threads: a pause before each runtime's turn. Libraries keep their worker threads
# busy-waiting for a while after a call (OpenBLAS's for ~0.1 s, OpenMP's and ONNX Runtime's
# briefly) so the next call starts at once; in one process shared by ten runtimes those threads
# took the cores from whichever runtime came next, a thing no user running one of them sees.
# Measured (S1 at 224, batch 16, two cores of the Xeon, all ten runtimes, 2026-12-03): shvit_tiny
# 362 img/s with no pause, 410 with 0.3 s; ONNX Runtime 505 and 525; the others within 5%.
# One core (one thread per library) has no such threads: no pause.
SETTLE_S = 0.15


def time_batch(runners, x, rounds: int, warmup: int, min_round_s: float, settle_s: float = 0.0):
    """Interleaved rounds over every runner for one input batch; failures are reported, not raised.
    ``settle_s``: a pause before each runtime's turn (several threads: see ``SETTLE_S``)."""
    import gc
    import math

    from shvit_numpy.errors import first_line

    calls, first, reps, failed = {}, {}, {}, {}
    for key, runner in runners.items():
        try:
            call = runner.timed_call(x)
            t0 = time.perf_counter()
            call()  # compiles, where the runtime compiles
            first[key] = last = time.perf_counter() - t0
            for _ in range(warmup):  # the last warm-up call's time sizes the rounds
                t0 = time.perf_counter()
                call()
                last = time.perf_counter() - t0
            reps[key] = max(1, math.ceil(min_round_s / max(last, 1e-9)))
            calls[key] = call
        except Exception as e:
            failed[key] = f"failed at batch {len(x)}: {first_line(e, 160, named=True)}"
    samples = {key: [] for key in calls}
    keys = list(calls)
    gc.collect()
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            n = reps[key]
            time.sleep(settle_s)  # the runtime before may still have threads spinning on the cores
            t0 = time.perf_counter()
            for _ in range(n):
                calls[key]()
            samples[key].append((time.perf_counter() - t0) / n)
    return {k: {"seconds": summary(samples[k]), "samples": samples[k], "first_call_s": first[k], "calls_per_round": reps[k]}
            for k in keys}, failed


def save(result: dict, path) -> None:
    """Replace ``path`` with ``result`` in one step (a reader never sees half a file)."""
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def speed(spec, out_path) -> dict:
    """Every cell of the spec; the results so far are saved after each cell, so a run stopped
    midway still has what it measured."""
    import numpy as np

    from .runners import Setup

    rows, skipped = [], []
    threads, where = spec["threads"], spec["label"]
    if spec["device"] == "cpu":
        try:
            import torch
        except ImportError:  # no torch runtime to limit
            pass
        else:
            torch.set_num_threads(threads)
            torch.set_num_interop_threads(1)
    rng = np.random.default_rng(spec.get("seed", 0))
    for cell in spec["cells"]:
        v, res = cell["variant"], cell["resolution"]
        setup = Setup(v, cell["weights"], cell.get("onnx"), threads, spec["device"], spec.get("half", False))
        runners, why = build(cell["runtimes"], setup)
        skipped += [{"runtime": k, "where": f"{where}, {v}", "reason": r} for k, r in why.items()]
        for batch in cell["batches"]:
            keep = {k: r for k, r in runners.items() if k not in cell.get("only_batches", {}) or batch in cell["only_batches"][k]}
            if not keep:
                continue
            x = rng.standard_normal((batch, 3, res, res)).astype(np.float32)
            t0 = time.perf_counter()
            results, failed = time_batch(keep, x, spec["rounds"], spec["warmup"], spec["min_round_s"],
                                         SETTLE_S if threads > 1 and len(keep) > 1 else 0.0)
            skipped += [{"runtime": k, "where": f"{where}, {v}", "reason": r} for k, r in failed.items()]
            for k, r in results.items():
                rows.append({"runtime": k, "variant": v, "resolution": res, "batch": batch, "threads": threads,
                             "device": spec["device"], "half": spec.get("half", False), **r})
            save({"speed": rows, "skipped": skipped, "partial": True}, out_path)
            best = ", ".join(f"{k} {batch / r['seconds']['median']:.1f}" for k, r in results.items())
            log(f"  [{where}] {v} {res}px batch {batch} ({time.perf_counter() - t0:.0f} s): images/s {best}")
        del runners
    return {"speed": rows, "skipped": skipped}


def status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` size (VmRSS, VmHWM) in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Start a new peak-RSS window at the current RSS (Linux: ``5`` to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory(spec) -> dict:
    """Peak RSS while loading and running one runtime, and how much of it came after the imports.

    Linux: VmHWM, the peak RSS of this process image, with the peak reset to the current RSS once
    the libraries are imported. (``ru_maxrss`` would not do: it survives fork and exec, so a worker
    would report its parent's peak.) Elsewhere ``ru_maxrss`` at both points, the second a peak
    since start; the difference is then a lower bound.
    """
    import importlib
    import resource

    from shvit_numpy.errors import first_line

    from .runners import RUNTIMES, Setup, Unavailable

    runtime = RUNTIMES[spec["runtime"]]

    def maxrss_mb() -> float:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024  # bytes on macOS, KiB on Linux

    out = {k: spec[k] for k in ("runtime", "variant", "resolution", "batch", "threads", "device")}
    try:
        for name in runtime.imports:
            importlib.import_module(name)
        import numpy as np

        base = status_mb("VmRSS")
        exact = base is not None and reset_peak()
        base = base if exact else maxrss_mb()
        setup = Setup(spec["variant"], spec["weights"], spec.get("onnx"), spec["threads"], spec["device"], spec.get("half", False))
        runner = runtime.load(setup)
        x = np.random.default_rng(0).standard_normal((spec["batch"], 3, spec["resolution"], spec["resolution"])).astype(np.float32)
        call = runner.timed_call(x)
        for _ in range(3):
            call()
        peak = status_mb("VmHWM") if exact else maxrss_mb()
    except Unavailable as e:
        return {**out, "skipped": str(e)}
    except Exception as e:
        return {**out, "skipped": f"failed: {first_line(e, 160, named=True)}"}
    out.update(peak_rss_mb=peak, baseline_rss_mb=base, delta_mb=peak - base, method="VmHWM" if exact else "ru_maxrss")
    if spec["device"] == "cuda" and "torch" in sys.modules:
        import torch

        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    pin(spec.get("cpus"))
    try:
        result = speed(spec, argv[1]) if spec["mode"] == "speed" else memory(spec)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent reports it
        return 130
    save(result, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
