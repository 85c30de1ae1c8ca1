"""NumPy SHViT against the folded PyTorch eval model: throughput and peak memory on one core.

``python -m benchmarks.numpy_speed [--variant s1] [--batch 16] [--resolution 224] [--rounds 5] [--save]``

Each measurement runs in a fresh subprocess pinned to one thread (``OMP_NUM_THREADS=1``,
``OPENBLAS_NUM_THREADS=1``, ``torch.set_num_threads(1)``), and the rounds alternate numpy,
torch, numpy, torch... so that a busy neighbour on a shared CPU slows both alike; the report
gives medians. Both models hold the same random weights (BatchNorm folded, float32) and see
the same input. Each call is the public ``model(x)``, input checks included.

Memory: the Linux peak resident set (VmHWM) is reset after the model is built, so "working
memory" is the peak RSS during the forward passes minus the RSS just before them: what the
forward itself needs (activations, im2col buffers, allocator slack). The process's whole
peak RSS is reported too (torch's includes its ~300 MB of libraries).

``--save`` writes the figures to benchmarks/results/numpy_speed.json for ``make bench``.
``--breakdown`` instead times the NumPy model's operations by kind (CPU time, one thread), with
the MAC rate of each: what limits it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "numpy_speed.json"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def random_state(cfg, seed: int = 0) -> dict:
    """Random float32 weights and BatchNorm statistics for every canonical tensor (speed does not
    depend on the values; they only have to stay finite)."""
    import numpy as np

    from shvit_numpy.names import state_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in state_shapes(cfg).items():
        if name.endswith("running_var"):
            a = rng.uniform(0.5, 2.0, shape)
        elif name.endswith(("running_mean", "bias")):
            a = rng.normal(0, 0.1, shape)
        elif name.endswith("weight") and len(shape) == 1:
            a = rng.uniform(0.2, 0.5, shape)
        else:
            a = rng.normal(0, 1 / np.sqrt(max(1, int(np.prod(shape[1:])))), shape)
        out[name] = a.astype(np.float32)
    return out


def worker(runtime: str, variant: str, batch: int, res: int, iters: int) -> dict:
    """Build one folded model, run ``iters`` timed batches after one warm-up; report times and memory."""
    import numpy as np

    from shvit_numpy.config import get_config

    cfg = get_config(variant)
    state = random_state(cfg)
    x = np.random.default_rng(1).standard_normal((batch, 3, res, res)).astype(np.float32)
    if runtime == "numpy":
        from shvit_numpy.model import SHViT

        model = SHViT(cfg).load_state(state).fuse()

        def run():
            return model(x)
    else:
        import torch

        import shvit_torch

        torch.set_num_threads(1)
        tm = shvit_torch.create(cfg)
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
        model = tm.eval().fuse()
        xt = torch.from_numpy(x)

        def run():
            with torch.inference_mode():
                return model(xt).numpy()
    del state
    import gc

    gc.collect()
    exact = reset_peak_rss()
    base = rss_kib("VmRSS")
    run()  # warm-up (first-call allocations count towards the peak)
    times, cpu = [], []
    for _ in range(iters):
        t, c = time.perf_counter(), time.process_time()
        y = run()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = rss_kib("VmHWM")
    return {"runtime": runtime, "batch_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "img_per_s": batch / statistics.median(times), "working_mib": (peak - base) / 1024,
            "peak_rss_mib": peak / 1024, "peak_reset": exact, "logits": y.shape[1]}


def breakdown(variant: str, batch: int, res: int, iters: int) -> list[dict]:
    """CPU time of the folded NumPy model by kind of operation, and each kind's MAC rate."""
    import collections

    import numpy as np

    from shvit_numpy import layers as nl
    from shvit_numpy.config import get_config
    from shvit_numpy.model import SHViT

    cfg = get_config(variant)
    model = SHViT(cfg).load_state(random_state(cfg)).fuse()
    x = np.random.default_rng(1).standard_normal((batch, 3, res, res)).astype(np.float32)
    acc = collections.defaultdict(lambda: [0.0, 0, 0])  # kind -> [exclusive seconds, MACs, calls]
    nested = [0.0]  # time spent in timed calls inside the current one (a stack)
    originals = {}

    def timed(cls, attr, kind, macs):
        orig = originals[(cls, attr)] = getattr(cls, attr)

        def wrapper(self, inp):
            nested.append(0.0)
            t = time.process_time()
            out = orig(self, inp)
            dt = time.process_time() - t
            inner = nested.pop()
            nested[-1] += dt
            a = acc[kind(self, inp)]
            a[0] += dt - inner  # exclusive: the qkv conv inside attention counts as a 1x1 conv
            a[1] += macs(self, inp, out)
            a[2] += 1
            return out
        setattr(cls, attr, wrapper)

    def conv_kind(conv, inp):
        k = conv.weight.shape[2]
        return "depthwise 3x3 (9 shifted multiply-adds)" if conv.groups > 1 else \
            "1x1 conv (one GEMM)" if k == 1 else "stem 3x3 conv (pad + im2col + GEMM)"

    timed(nl.Conv2d, "__call__", conv_kind, lambda c, i, o: o.size * c.weight[0].size)
    timed(nl.SingleHeadAttention, "attention", lambda m, i: "attention core (GroupNorm, q k^T, softmax, attn v)",
          lambda m, i, o: o[2].size * (m.qk_dim + m.pdim))
    try:
        model(x)
        acc.clear()
        t = time.process_time()
        for _ in range(iters):
            model(x)
        total = (time.process_time() - t) / iters
    finally:
        for (cls, attr), f in originals.items():
            setattr(cls, attr, f)
    rows = [{"kind": k, "calls": c // iters, "ms": 1000 * s / iters, "gmac_s": m / s / 1e9 if s else 0.0}
            for k, (s, m, c) in sorted(acc.items(), key=lambda kv: -kv[1][0])]
    rows.append({"kind": "everything else (residual adds, ReLU, SE, concat, pooling, head)", "calls": 0,
                 "ms": 1000 * total - sum(r["ms"] for r in rows), "gmac_s": 0.0})
    rows.append({"kind": "total", "calls": 0, "ms": 1000 * total, "gmac_s": 0.0})
    return rows


def spawn(runtime: str, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.numpy_speed", "--worker", runtime, "--variant", args.variant,
           "--batch", str(args.batch), "--resolution", str(args.resolution), "--iters", str(args.iters)]
    env = {**os.environ, **ONE_THREAD}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    if out.returncode:
        raise SystemExit(f"{runtime} worker failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- shared by this comparison and benchmarks.tiny_speed's ------------------------------------------

def comparison_args(p: argparse.ArgumentParser, pair: tuple[str, str], iters: int) -> None:
    """The model, input and round arguments of a one-core comparison of ``pair``."""
    p.add_argument("--variant", default="s1")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help=f"{pair[0]}/{pair[1]} pairs, alternating (default 5)")
    p.add_argument("--iters", type=int, default=iters, help=f"timed batches per process after the warm-up (default {iters})")


def alternate(pair: tuple[str, str], rounds: int, spawn_one, line, keys: tuple[str, ...]) -> dict:
    """``rounds`` rounds of one fresh process per runtime, the order alternating (a b, b a, ...)
    so that a busy neighbour on a shared CPU slows both alike; each run printed with ``line(m)``;
    the medians of ``keys`` per runtime."""
    runs = {runtime: [] for runtime in pair}
    for r in range(rounds):
        for runtime in pair if r % 2 == 0 else pair[::-1]:
            runs[runtime].append(m := spawn_one(runtime))
            print(f"round {r + 1} {runtime:5s} {line(m)}", flush=True)
    return {rt: {k: statistics.median(m[k] for m in ms) for k in keys} for rt, ms in runs.items()}


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {path}")


def compare(args) -> dict:
    """Alternating rounds; medians; ratios oriented as throughput (numpy / torch, > 1: numpy faster)
    except memory (numpy / torch, < 1: numpy smaller). The load average says how busy the CPU was."""
    load_before = os.getloadavg()[0]
    med = alternate(("numpy", "torch"), args.rounds, lambda runtime: spawn(runtime, args),
                    lambda m: f"{m['img_per_s']:7.1f} img/s  (cpu {m['cpu_s'] * 1000:6.1f} ms/batch)  "
                              f"working {m['working_mib']:6.1f} MiB  peak RSS {m['peak_rss_mib']:6.1f} MiB",
                    ("img_per_s", "batch_s", "cpu_s", "working_mib", "peak_rss_mib"))
    return {
        "variant": args.variant, "batch": args.batch, "resolution": args.resolution, "threads": 1,
        "rounds": args.rounds, "iters": args.iters, "machine": machine(),
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)], "median": med,
        "throughput_ratio": med["numpy"]["img_per_s"] / med["torch"]["img_per_s"],
        "cpu_time_ratio": med["torch"]["cpu_s"] / med["numpy"]["cpu_s"],  # CPU-time throughput: robust to a busy CPU
        "working_memory_ratio": med["numpy"]["working_mib"] / med["torch"]["working_mib"],
        "peak_rss_ratio": med["numpy"]["peak_rss_mib"] / med["torch"]["peak_rss_mib"],
    }


def measure(variant: str = "s1", batch: int = 16, resolution: int = 224, rounds: int = 5, iters: int = 3) -> dict:
    """The comparison as a dict (what --save writes), for benchmarks.bench and the like."""
    return compare(argparse.Namespace(variant=variant, batch=batch, resolution=resolution, rounds=rounds, iters=iters))


def machine() -> str:
    import platform

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import numpy
    import torch

    return f"{cpu}, {os.cpu_count()} cores; numpy {numpy.__version__}, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.numpy_speed", description=__doc__.splitlines()[0])
    comparison_args(p, ("numpy", "torch"), iters=3)
    p.add_argument("--save", action="store_true", help=f"write the figures to {RESULTS.relative_to(RESULTS.parent.parent.parent)}")
    p.add_argument("--breakdown", action="store_true", help="time the NumPy model's operations by kind instead")
    p.add_argument("--worker", choices=["numpy", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.breakdown:
        for k, v in ONE_THREAD.items():
            if os.environ.get(k) != v:  # BLAS reads these at import: re-run pinned to one thread
                return subprocess.run([sys.executable, "-m", "benchmarks.numpy_speed", *(argv or sys.argv[1:])],
                                      env={**os.environ, **ONE_THREAD}).returncode
        for r in breakdown(args.variant, args.batch, args.resolution, args.iters):
            rate = f"{r['gmac_s']:6.1f} GMAC/s" if r["gmac_s"] else ""
            calls = f"{r['calls']:3d} calls" if r["calls"] else ""
            print(f"{r['ms']:8.1f} ms  {r['kind']:64s} {calls:9s} {rate}")
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker, args.variant, args.batch, args.resolution, args.iters)))
        return 0
    res = compare(args)
    n, t = res["median"]["numpy"], res["median"]["torch"]
    print(f"\n{res['variant']} at {res['resolution']}, batch {res['batch']}, one thread; medians of {res['rounds']} rounds")
    print(f"  numpy {n['img_per_s']:7.1f} img/s   torch (folded, eval) {t['img_per_s']:7.1f} img/s   "
          f"ratio {res['throughput_ratio']:.2f}x (CPU time {res['cpu_time_ratio']:.2f}x)")
    print(f"  working memory: numpy {n['working_mib']:.1f} MiB, torch {t['working_mib']:.1f} MiB, ratio {res['working_memory_ratio']:.2f}")
    print(f"  peak RSS:       numpy {n['peak_rss_mib']:.1f} MiB, torch {t['peak_rss_mib']:.1f} MiB, ratio {res['peak_rss_ratio']:.2f}")
    print(f"  load average {res['load_average'][0]} -> {res['load_average'][1]} on {os.cpu_count()} cores ({res['machine']})")
    if args.save:
        save(res, RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
