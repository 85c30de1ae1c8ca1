"""``python -m benchmarks.bench`` (``make bench``): SHViT's runtimes and peers, side by side.

Throughput (images/s at batch 16 and 64), latency (batch 1) and peak memory of shvit_torch
(unfolded eager, folded, channels_last, traced, torch.compile), shvit_numpy, shvit_tiny (CPU
and CL, after the JIT) and the peers (ONNX Runtime on shvit_torch's folded ONNX export; timm's
SHViT when timm imports), for s1-s4 at their resolutions, on one core and on all cores.
Then it checks the issue's speed floors (S1, batch 16, one core).

Runs:  default  s1-s4, batches 1/16/64, 1 core and all cores; the compiled runtimes (tinygrad,
                torch.compile: 15-50 s of compiling per input shape) at s1, batch 16 only
                (the first variant and batch 16; --runtimes naming them lifts that)  [~10 min]
       --full   the compiled runtimes everywhere too (36 compiles per thread setting), 7 rounds  [slow]
       --quick  s1, batch 16, one core, 3 rounds, no memory: the floors only      [~2 min]
       --device cuda   torch and tinygrad (and timm) at batch 256, float16, s1-s4
Outputs: default and --full: benchmarks/results/latest.{json,md} and docs/bench.png; --device
cuda: benchmarks/results/gpu.{json,md} and docs/bench-gpu.png; --quick and runs narrowed by
--variants/--batches/--threads/--runtimes/--skip/--rounds: runs/bench/{quick,custom}.{json,md,png}.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shvit_numpy.cli import Parser, fail
from shvit_numpy.config import RESOLUTION, VARIANTS
from shvit_numpy.errors import ShvitError
from shvit_numpy.weights import atomic_path

from . import machine, report
from .runners import RUNTIMES

PROG = "python -m benchmarks.bench"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"  # kept in the repository: the latest full run
SCRATCH = ROOT / "runs" / "bench"  # quick and narrowed runs (runs/ is ignored by git)
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
              "NUM_CPU_THREADS",  # tinygrad's CPU device
              "POCL_CPU_MAX_CU_COUNT", "POCL_MAX_PTHREAD_COUNT")  # PoCL (tinygrad's CL device on a CPU)


# -- the plan ---------------------------------------------------------------------------------------------------

def csv(kind, choices=None, conv=str):
    def parse(text):
        items = [conv(t) for t in text.split(",") if t.strip()]
        bad = [t for t in items if choices is not None and t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind} {bad[0] if bad else text!r} is not one of {', '.join(map(str, choices or []))}")
        return items
    return parse


def positive_ints(text):
    try:
        items = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return items


def thread_list(text):
    out = []
    for t in text.split(","):
        t = t.strip()
        if t == "all":
            out.append(len(machine.usable_cpus()))
        elif t.isdigit() and int(t) >= 1:
            out.append(int(t))
        else:
            raise argparse.ArgumentTypeError(f"--threads takes positive counts or 'all', got {t!r}")
    return sorted(set(out))


def make_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[8:]),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="s1, batch 16, one core, 3 rounds, no memory: just the speed floors")
    mode.add_argument("--full", action="store_true", help="compiled runtimes at every variant, memory everywhere, 7 rounds")
    p.add_argument("--variants", type=csv("variant", sorted(VARIANTS)), help="comma-separated, e.g. s1,s4 (default: s1-s4)")
    p.add_argument("--batches", type=positive_ints, help="comma-separated batch sizes (default 1,16,64; 1 = latency)")
    p.add_argument("--threads", type=thread_list, help="comma-separated thread counts or 'all' (default 1,all)")
    p.add_argument("--runtimes", type=csv("runtime", list(RUNTIMES)), help=f"comma-separated subset of: {', '.join(RUNTIMES)}")
    p.add_argument("--skip", type=csv("runtime", list(RUNTIMES)), default=[], help="runtimes to leave out")
    p.add_argument("--rounds", type=int, help="timed rounds per cell (default 5; --quick 3; --full 7)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls after the first (compiling) call; tinygrad's JIT needs 2 (default 2)")
    p.add_argument("--min-round", type=float, metavar="S", help="a round repeats a call until it lasts S seconds (default 0.25)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak memory (default: on, off with --quick)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the GPU comparison at batch 256, float16")
    p.add_argument("--float32", action="store_true", help="with --device cuda: float32 instead of float16")
    p.add_argument("--out", type=Path, metavar="DIR", help="where the JSON and Markdown go (default: see Outputs below)")
    p.add_argument("--chart", type=Path, metavar="PNG", help="chart path (default: see Outputs below)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a speed floor fails")
    p.add_argument("--list", action="store_true", help="list the runtimes and what each times, then exit")
    return p


def plan(args) -> dict:
    """Everything the workers need to know, decided once: cells per thread setting, rounds, files."""
    cpus = machine.usable_cpus()
    gpu = args.device == "cuda"
    keys = [k for k in (args.runtimes or RUNTIMES) if k not in args.skip and args.device in RUNTIMES[k].devices]
    if not keys:
        raise ShvitError(f"no runtime left to run on {args.device} (chosen: {', '.join(args.runtimes or RUNTIMES)})")
    if args.quick:
        variants, batches, threads, rounds, min_round = ["s1"], [16], [1], 3, 0.1
    else:
        variants, batches = sorted(VARIANTS), ([256] if gpu else [1, 16, 64])
        threads = [len(cpus)] if gpu else sorted({1, len(cpus)})
        rounds, min_round = (7 if args.full else 5), 0.25
    variants = args.variants or variants
    batches = args.batches or batches
    threads = args.threads or threads
    rounds = args.rounds if args.rounds is not None else rounds
    min_round = args.min_round if args.min_round is not None else min_round
    if rounds < 1 or args.warmup < 0 or min_round < 0:
        raise ShvitError("--rounds must be >= 1, --warmup and --min-round >= 0")
    if max(threads) > len(cpus):
        raise ShvitError(f"--threads {max(threads)} is more than the {len(cpus)} CPUs this process may use")
    custom = bool(args.skip) or any(a is not None for a in (args.variants, args.batches, args.threads, args.runtimes, args.rounds))
    # compiled runtimes pay 15-50 s per input shape: only at the first variant and the floor batch,
    # unless --full (or --quick, or the GPU run) or --runtimes names them
    everywhere = args.full or args.quick or gpu
    restricted = [k for k in keys if RUNTIMES[k].compiled and k not in (args.runtimes or [])] if not everywhere else []
    memory = args.memory if args.memory is not None else not args.quick
    mem_batch = 16 if 16 in batches else max(batches)
    return dict(keys=keys, variants=variants, batches=batches, threads=threads, rounds=rounds, warmup=args.warmup,
                min_round_s=min_round, device=args.device, half=gpu and not args.float32, cpus=cpus,
                restricted=restricted, memory=memory, mem_batch=mem_batch, floor_batch=mem_batch,
                mode="gpu" if gpu else "custom" if custom else "quick" if args.quick else "full" if args.full else "default")


def runtimes_for(p: dict, variant: str) -> list[str]:
    return [k for k in p["keys"] if k not in p["restricted"] or variant == p["variants"][0]]


def cell(p: dict, files: dict, variant: str) -> dict:
    """One variant's share of a speed worker's spec: files, batches, runtimes (restricted ones at one batch)."""
    only = {k: [p["floor_batch"]] for k in p["restricted"]}
    return {"variant": variant, "resolution": RESOLUTION[variant], **files[variant], "batches": p["batches"],
            "runtimes": runtimes_for(p, variant), "only_batches": only}


# -- the models ---------------------------------------------------------------------------------------------------

def prepare_models(p: dict, workdir: Path) -> dict:
    """Per variant: a canonical weight file with random weights and BatchNorm statistics (as the
    tests use) and, for ONNX Runtime, its folded ONNX export. {variant: {weights, onnx}}."""
    import torch

    import shvit_torch
    from shvit_torch.export import export_onnx

    try:
        from tests.helpers import randomize
    except ImportError:  # outside the repository: the default initialisation times the same
        randomize = None
    files = {}
    for i, v in enumerate(p["variants"]):
        torch.manual_seed(i)
        model = shvit_torch.create(v).eval()
        if randomize is not None:
            randomize(model, seed=i)
        weights = workdir / f"{v}.safetensors"
        shvit_torch.save(model, weights)
        onnx = None
        if "ort" in p["keys"]:
            onnx = workdir / f"{v}.onnx"
            try:
                export_onnx(model, onnx, resolution=RESOLUTION[v])
            except Exception as e:  # noted by the ORT runner as "no ONNX export"
                print(f"{PROG}: ONNX export of {v} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
                onnx = None
        files[v] = {"weights": str(weights), "onnx": str(onnx) if onnx else None}
    return files


# -- the workers ---------------------------------------------------------------------------------------------------

def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({k: str(threads) for k in THREAD_ENV})
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"  # torch.compile compiles in the worker itself: no pool of helper processes
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


class Stopped(Exception):
    """The run was interrupted (Ctrl-C, or a worker killed); ``partial`` holds what the worker saved."""

    def __init__(self, partial: dict | None):
        super().__init__("interrupted")
        self.partial = partial


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_worker(spec: dict, workdir: Path, name: str, threads: int) -> dict | None:
    spec_path, out_path = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec_path), str(out_path)],
                              env=worker_env(threads), cwd=ROOT)
    except KeyboardInterrupt:
        raise Stopped(read_json(out_path)) from None
    if proc.returncode == 130 or -proc.returncode in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):  # stopped by someone
        raise Stopped(read_json(out_path))
    if proc.returncode != 0:
        return None
    return read_json(out_path)


def speed_runs(p: dict, files: dict, workdir: Path) -> tuple[list, list]:
    rows, skipped = [], []
    for threads in p["threads"]:
        label = f"{threads} thread{'s' if threads > 1 else ''}"
        print(f"{label}: {', '.join(p['variants'])} x batches {p['batches']} x {len(p['keys'])} runtimes, {p['rounds']} rounds",
              file=sys.stderr)
        cells = [cell(p, files, v) for v in p["variants"]]
        spec = {"mode": "speed", "threads": threads, "label": label, "cpus": p["cpus"][:threads], "device": p["device"],
                "half": p["half"], "cells": cells, "rounds": p["rounds"], "warmup": p["warmup"], "min_round_s": p["min_round_s"]}
        try:
            out = run_worker(spec, workdir, f"speed{threads}", threads)
        except Stopped as stop:  # keep what the stopped worker measured, then stop
            part = stop.partial or {"speed": [], "skipped": []}
            raise Stopped({"speed": rows + part["speed"], "skipped": skipped + part["skipped"]}) from None
        if out is None:
            skipped.append({"runtime": p["keys"][0], "where": label, "reason": "the worker process failed (see the log above)"})
            continue
        rows += out["speed"]
        skipped += out["skipped"]
    return rows, skipped


def memory_runs(p: dict, files: dict, workdir: Path) -> list:
    """One fresh process per (runtime, variant), one thread each, as many at once as there are CPUs."""
    jobs = [(k, v) for v in p["variants"] for k in runtimes_for(p, v)]
    print(f"memory: {len(jobs)} fresh processes at batch {p['mem_batch']}", file=sys.stderr)
    width = 1 if p["device"] == "cuda" else len(p["cpus"])

    def one(i_job):
        i, (key, v) = i_job
        spec = {"mode": "memory", "runtime": key, "variant": v, "resolution": RESOLUTION[v], **files[v], "batch": p["mem_batch"],
                "threads": 1, "device": p["device"], "half": p["half"], "cpus": [p["cpus"][i % width]]}
        out = run_worker(spec, workdir, f"mem-{key}-{v}", 1)
        return out or {"runtime": key, "variant": v, "resolution": RESOLUTION[v], "batch": p["mem_batch"], "threads": 1,
                       "device": p["device"], "skipped": "the memory process failed"}

    with concurrent.futures.ThreadPoolExecutor(max_workers=width) as pool:
        return list(pool.map(one, enumerate(jobs)))


# -- main -------------------------------------------------------------------------------------------------------

def outputs(args, p: dict) -> tuple[Path, Path]:
    """(JSON/Markdown path without suffix, chart path). The default and --full runs are the ones
    the repository keeps (benchmarks/results/latest.*, docs/bench.png), the GPU run too (gpu.*,
    docs/bench-gpu.png); --quick and narrowed runs go to runs/bench/ (ignored by git), so a
    partial run never replaces a full one. --out and --chart override the places."""
    mode = p["mode"]
    stem = "latest" if mode in ("default", "full") else mode
    keep = mode in ("default", "full", "gpu")
    folder = args.out or (RESULTS if keep else SCRATCH)
    chart = args.chart or (ROOT / "docs" / ("bench-gpu.png" if mode == "gpu" else "bench.png") if keep else folder / f"{stem}.png")
    return folder / stem, chart


def list_runtimes() -> None:
    for r in RUNTIMES.values():
        print(f"{r.key:14} {r.label:36} {'/'.join(r.devices):9} {r.what}")


def run(p: dict) -> dict:
    if p["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ShvitError("--device cuda: torch sees no CUDA device on this machine")
    t0 = time.perf_counter()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load_before is not None and load_before > 0.5 * len(p["cpus"]):
        print(f"warning: load average {load_before:.1f} on {len(p['cpus'])} cores: other work is running; figures will be noisy "
              "and multi-thread ones low (a thread waits at each barrier for a descheduled peer)", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="shvit-bench-"))
    try:
        print(f"preparing {', '.join(p['variants'])} (random weights{', ONNX export' if 'ort' in p['keys'] else ''})", file=sys.stderr)
        files = prepare_models(p, workdir)
        memory, interrupted = [], False
        try:
            speed, skipped = speed_runs(p, files, workdir)
        except Stopped as stop:
            speed, skipped, interrupted = stop.partial["speed"], stop.partial["skipped"], True
        if p["memory"] and not interrupted:
            try:
                memory = memory_runs(p, files, workdir)
            except (Stopped, KeyboardInterrupt):
                interrupted = True
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {
        "schema": 1, "mode": p["mode"], "device": p["device"], "started": started, "command": " ".join([PROG] + sys.argv[1:]),
        "duration_s": round(time.perf_counter() - t0, 1), "machine": machine.describe(),
        "load_average": {"before": load_before, "after": os.getloadavg()[0]} if load_before is not None else {},
        "settings": {k: p[k] for k in ("variants", "batches", "threads", "rounds", "warmup", "min_round_s", "half", "mem_batch")},
        "runtimes": {k: {"label": RUNTIMES[k].label, "what": RUNTIMES[k].what, "family": RUNTIMES[k].family} for k in p["keys"]},
        "speed": speed, "memory": memory, "skipped": skipped, "interrupted": interrupted,
    }
    if p["restricted"]:
        names = ", ".join(RUNTIMES[k].label for k in p["restricted"])
        result["restricted"] = (f"Compiled runtimes ({names}) were timed at {p['variants'][0]}, batch {p['floor_batch']} only: "
                                "each input shape costs them 15-50 s of compiling; `--full` times them everywhere.")
    result["floors"] = report.check_floors(result) if p["device"] == "cpu" else []
    return result


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.list:
        list_runtimes()
        return 0
    try:
        p = plan(args)
        base, chart_path = outputs(args, p)
        result = run(p)
        if result["interrupted"]:  # what was measured goes to partial.*, never over a complete run's files
            base = (args.out or SCRATCH) / "partial"
            chart_path = base.with_suffix(".png")
        text = report.markdown(result)
        with atomic_path(base.with_suffix(".json")) as tmp, open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        with atomic_path(base.with_suffix(".md")) as tmp, open(tmp, "w") as f:
            f.write(text)
        drew = bool(result["speed"]) and report.chart(result, chart_path)
    except (ShvitError, OSError) as e:
        return fail(PROG, e)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    print(text)
    print(f"wrote {base}.json, {base}.md" + (f", {chart_path}" if drew else "") +
          f" in {result['duration_s'] / 60:.1f} min")
    if result["interrupted"]:
        print(f"{PROG}: interrupted; the figures above are what was measured before", file=sys.stderr)
        return 130
    failed = [f for f in result["floors"] if f["status"] == "FAIL"]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
