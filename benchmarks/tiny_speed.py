"""shvit_tiny on tinygrad's CPU device against the folded PyTorch eval model, on one core.

``python -m benchmarks.tiny_speed [--variant s1] [--batch 16] [--resolution 224] [--rounds 5] [--beam N] [--save]``

Each measurement runs in a fresh subprocess pinned to one core (``taskset`` where present) and
one thread (tinygrad: ``NUM_CPU_THREADS=1``; torch: ``torch.set_num_threads(1)``), and the
rounds alternate tiny, torch, tiny, torch... so that a busy neighbour on a shared CPU slows both
alike; the report gives medians. Both models hold the same random weights (BatchNorm folded,
float32) and see the same input; each timed call is the public ``model(x)``: numpy in (input
checks and the copy to the device included), numpy logits out.

Compile time: the first call of a shape schedules, generates and compiles every kernel (then
TinyJit captures them at the second call). It is timed twice: with an empty tinygrad cache
(``CACHEDB`` pointed at a fresh file: nothing compiled before) and with a warm one (a second
process on the same cache file, as any later run of the CLI: clang's output comes from the
cache, the Python-side code generation is redone). tinygrad compiles in ``PARALLEL`` worker
processes, one per core by default; the one-core figure uses one, the all-cores figure all.

``--beam N`` also times the model with ``BEAM=N`` (tinygrad's kernel search; the search runs
once, at the first call, and its choices are cached on disk for every later run).
``--save`` writes the figures to benchmarks/results/tiny_speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
RESULTS = Path(__file__).parent / "results" / "tiny_speed.json"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUM_CPU_THREADS": "1"}


def make_weights(variant: str, path: Path) -> None:
    """Random float32 weights and BatchNorm statistics for every canonical tensor."""
    from benchmarks.numpy_speed import random_state
    from shvit_numpy.config import get_config
    from shvit_numpy.weights import save_weights

    cfg = get_config(variant)
    save_weights(path, cfg, random_state(cfg))


def worker(runtime: str, weights: str, batch: int, res: int, iters: int) -> dict:
    """Load, run a warm-up (tiny: the compiling first call and the JIT-capturing second), then
    ``iters`` timed batches."""
    import numpy as np

    x = np.random.default_rng(1).standard_normal((batch, 3, res, res)).astype(np.float32)
    t0 = time.perf_counter()
    if runtime == "tiny":
        import shvit_tiny

        model = shvit_tiny.load(weights, device="CPU")
        run = model
    else:
        import torch

        import shvit_torch

        torch.set_num_threads(1)
        model = shvit_torch.load(weights).fuse().eval()
        xt = torch.from_numpy(x)

        def run(_):
            with torch.inference_mode():
                return model(xt).numpy()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = run(x)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(x)
    second_s = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(iters):
        t, c = time.perf_counter(), time.process_time()
        y = run(x)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"runtime": runtime, "load_s": load_s, "first_call_s": first_s, "second_call_s": second_s,
            "batch_s": statistics.median(times), "batch_min_s": min(times), "cpu_s": statistics.median(cpu),
            "img_per_s": batch / statistics.median(times), "logits": list(y.shape)}


def spawn(runtime: str, args, weights: Path, env_extra: dict | None = None, one_core: bool = True) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.tiny_speed", "--worker", runtime, "--weights", str(weights),
           "--batch", str(args.batch), "--resolution", str(args.resolution), "--iters", str(args.iters)]
    env = {**os.environ, **(ONE_THREAD if one_core else {}), **(env_extra or {})}
    if one_core and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(args.core)] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{runtime} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compile_times(args, weights: Path) -> dict:
    """First-call times with an empty and with a warm tinygrad cache, on one core and on all."""
    out = {}
    for cores in ("one_core", "all_cores"):
        with tempfile.TemporaryDirectory() as d:
            env = {"CACHEDB": str(Path(d) / "cache.db")}
            cold = spawn("tiny", args, weights, env, one_core=cores == "one_core")
            warm = spawn("tiny", args, weights, env, one_core=cores == "one_core")
        out[cores] = {"cold_first_call_s": cold["first_call_s"], "warm_first_call_s": warm["first_call_s"],
                      "cold_load_s": cold["load_s"], "warm_load_s": warm["load_s"]}
        print(f"compile ({cores.replace('_', ' ')}): first call {cold['first_call_s']:.1f} s with an empty cache, "
              f"{warm['first_call_s']:.1f} s with a warm one (load {cold['load_s']:.1f} / {warm['load_s']:.1f} s)", flush=True)
    return out


def compare(args, weights: Path) -> dict:
    from benchmarks.numpy_speed import alternate

    return alternate(("tiny", "torch"), args.rounds, lambda runtime: spawn(runtime, args, weights),
                     lambda m: f"{m['img_per_s']:7.1f} img/s  ({1000 * m['batch_s']:6.1f} ms/batch, "
                               f"min {1000 * m['batch_min_s']:6.1f}, cpu {1000 * m['cpu_s']:6.1f})",
                     ("img_per_s", "batch_s", "batch_min_s", "cpu_s", "first_call_s", "load_s"))


def beam(args, weights: Path) -> dict:
    """BEAM=N: the search at the first call (timed), then the same throughput measurement. On a
    cache of its own: tinygrad keys a search's result without the thread count, and a result
    found with several CPU threads fails to replay with one (KernelOptError: too many threads)."""
    with tempfile.TemporaryDirectory() as d:
        env = {"BEAM": str(args.beam), "CACHEDB": str(Path(d) / "cache.db")}
        first = spawn("tiny", args, weights, env)  # searches and compiles
        print(f"BEAM={args.beam}: first call {first['first_call_s']:.1f} s (search + compile), "
              f"{first['img_per_s']:.1f} img/s", flush=True)
        again = [spawn("tiny", args, weights, env) for _ in range(max(1, args.rounds // 2))]
    med = statistics.median(m["img_per_s"] for m in again)
    print(f"BEAM={args.beam}: later runs (cache warm): first call {again[0]['first_call_s']:.1f} s, {med:.1f} img/s", flush=True)
    return {"beam": args.beam, "search_first_call_s": first["first_call_s"], "warm_first_call_s": again[0]["first_call_s"],
            "img_per_s": med}


def machine() -> str:
    from importlib.metadata import version

    from benchmarks.numpy_speed import machine as base

    return f"{base()}, tinygrad {version('tinygrad')}"


def main(argv=None) -> int:
    from benchmarks.numpy_speed import comparison_args, save

    p = argparse.ArgumentParser(prog="python -m benchmarks.tiny_speed", description=__doc__.splitlines()[0])
    comparison_args(p, ("tiny", "torch"), iters=5)
    p.add_argument("--core", type=int, default=0, help="the core the one-core runs are pinned to (default 0)")
    p.add_argument("--beam", type=int, default=0, metavar="N", help="also time tinygrad's BEAM=N kernel search")
    p.add_argument("--no-compile", action="store_true", help="skip the cold/warm compile-time runs")
    p.add_argument("--save", action="store_true", help=f"write the figures to {RESULTS.relative_to(ROOT)}")
    p.add_argument("--worker", choices=["tiny", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.batch, args.resolution, args.iters)))
        return 0
    with tempfile.TemporaryDirectory() as d:
        weights = Path(d) / f"{args.variant}.safetensors"
        make_weights(args.variant, weights)
        res = {"variant": args.variant, "batch": args.batch, "resolution": args.resolution, "threads": 1,
               "rounds": args.rounds, "iters": args.iters, "machine": machine()}
        res["median"] = compare(args, weights)
        t, r = res["median"]["tiny"], res["median"]["torch"]
        res["throughput_ratio"] = t["img_per_s"] / r["img_per_s"]
        res["cpu_time_ratio"] = r["cpu_s"] / t["cpu_s"]
        if not args.no_compile:
            res["compile"] = compile_times(args, weights)
        if args.beam:
            res["beam"] = beam(args, weights)
    print(f"\n{res['variant']} at {res['resolution']}, batch {res['batch']}, one core; medians of {res['rounds']} rounds")
    print(f"  tiny (CPU, JIT) {t['img_per_s']:7.1f} img/s   torch (folded, eval) {r['img_per_s']:7.1f} img/s   "
          f"ratio {res['throughput_ratio']:.2f}x (CPU time {res['cpu_time_ratio']:.2f}x)")
    if args.save:
        save(res, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
