"""``python -m benchmarks.bench`` (``make bench``): SHViT's runtimes and peers, side by side.

Throughput (images/s at batch 16 and 64), latency (batch 1) and peak memory of shvit_torch
(unfolded eager, folded, channels_last, traced, torch.compile), shvit_numpy, shvit_tiny (CPU
and CL, after the JIT) and the peers (ONNX Runtime on shvit_torch's folded ONNX export; timm's
SHViT when timm imports), for s1-s4 at their resolutions, on one core and on all cores; then
the time to first answer (a new process, S1 at 224, one image, one core, caches empty and warm:
see first_answer.py). Then it checks the speed floors (``report.FLOORS``: ratios of images/s, each at
its own variant, batch and thread setting, with the machine named), issue 22's: shvit_tiny CPU ÷ ONNX
Runtime at batch 16 on one core for S1-S4 (>= 0.95 each, goal 1.1), at S1 batch 1 on one core (>= 1.0,
goal 1.3) and at S1 batch 16 on all cores (>= 0.9, goal 1.2), shvit_tiny CPU on all cores ÷ on one
core at S1 batch 16 (>= 1.6, goal 1.9; SKIP on a one-core machine), and issue 15's that still stand
(against shvit_torch folded and timm); and the first-answer targets (``report.TARGETS``, shvit_tiny
CPU: <= 1.5 s warm, goal 1 s; <= 15 s with empty caches, goal 10 s). Last, training on one core:
shvit_numpy's hand-written backward pass and AdamW against torch's autograd (see training.py).

Runs:  default  s1-s4, batches 1/16/64, 1 core and all cores; the compiled runtimes (tinygrad,
                torch.compile: 15-50 s of compiling per input shape) at s1, batch 16 only, except
                shvit_tiny on one core at batches 1 and 16, its CPU device at every variant (its
                captures persist in ~/.cache/shvit: a second run loads them, the first compiles
                8 shapes more); --runtimes naming them lifts that; then the first answers (~2 min)
       --full   the compiled runtimes everywhere too (36 compiles per thread setting), 7 rounds  [slow]
       --quick  s1, batch 16, one core, 3 rounds, no memory, no first answers: the floors at that cell
                (the others SKIP: not measured in this run)  [~2 min]
       --first-answer-only   the first answers and their targets alone  [~2 min]
       --device cuda   torch and tinygrad (and timm) at batch 256, float16, s1-s4
Outputs: default and --full: benchmarks/results/latest.{json,md} and docs/bench.png; --device
cuda: benchmarks/results/gpu.{json,md} and docs/bench-gpu.png; --first-answer-only:
benchmarks/results/first_answer.{json,md} (no chart); --quick and runs narrowed by
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
from shvit_numpy.errors import ShvitError, first_line
from shvit_numpy.weights import atomic_path

from . import first_answer, machine, report, training
from .runners import RUNTIMES

PROG = "python -m benchmarks.bench"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"  # kept in the repository: the latest full run
SCRATCH = ROOT / "runs" / "bench"  # quick and narrowed runs (runs/ is ignored by git)
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
              "NUM_CPU_THREADS",  # tinygrad's CPU device
              "POCL_CPU_MAX_CU_COUNT", "POCL_MAX_PTHREAD_COUNT")  # PoCL (tinygrad's CL device on a CPU)
# shvit_tiny's captures persist in its compiled-model cache (the bench's random weights are the same
# file every run), so a second make bench loads them instead of compiling: on one core it is timed at
# batches 1 and 16, the CPU device at every variant (True), CL at the first (False: one compile more).
# Other compiled runtimes, and other thread settings, at the first variant and the floor batch only.
PERSISTENT = {"tiny-cpu": True, "tiny-cl": False}
LATENCY_BATCHES = (1, 16)


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
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], epilog=__doc__[__doc__.index("Runs:"):],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="s1, batch 16, one core, 3 rounds, no memory: the speed floors at that cell")
    mode.add_argument("--full", action="store_true", help="compiled runtimes at every variant, memory everywhere, 7 rounds")
    mode.add_argument("--first-answer-only", action="store_true",
                      help="only the time to first answer (new process, S1, one core; caches empty and warm) and its targets")
    p.add_argument("--first-answer", action=argparse.BooleanOptionalAction, default=None,
                   help="time the first answers after the speed runs (default: on, off with --quick and narrowed runs)")
    p.add_argument("--variants", type=csv("variant", sorted(VARIANTS)), help="comma-separated, e.g. s1,s4 (default: s1-s4)")
    p.add_argument("--batches", type=positive_ints, help="comma-separated batch sizes (default 1,16,64; 1 = latency)")
    p.add_argument("--threads", type=thread_list, help="comma-separated thread counts or 'all' (default 1,all)")
    p.add_argument("--runtimes", type=csv("runtime", list(RUNTIMES)), help=f"comma-separated subset of: {', '.join(RUNTIMES)}")
    p.add_argument("--skip", type=csv("runtime", list(RUNTIMES)), default=[], help="runtimes to leave out")
    p.add_argument("--rounds", type=int,
                   help="timed rounds per cell (default 5; --quick 3; --full 7); --first-answer-only: warm runs (default 3)")
    p.add_argument("--training", action=argparse.BooleanOptionalAction, default=None,
                   help="time NumPy training against torch's on one core (benchmarks/training.py, ~2 min; default: on in the "
                        "default and --full runs)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls after the first (compiling) call; tinygrad's JIT needs 2 (default 2)")
    p.add_argument("--min-round", type=float, metavar="S", help="a round repeats a call until it lasts S seconds (default 0.25)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak memory (default: on, off with --quick)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the GPU comparison at batch 256, float16")
    p.add_argument("--float32", action="store_true", help="with --device cuda: float32 instead of float16")
    p.add_argument("--out", type=Path, metavar="DIR", help="where the JSON and Markdown go (default: see Outputs below)")
    p.add_argument("--chart", type=Path, metavar="PNG", help="chart path (default: see Outputs below)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a speed floor or first-answer target fails")
    p.add_argument("--list", action="store_true", help="list the runtimes and what each times, then exit")
    return p


def plan(args) -> dict:
    """Everything the workers need to know, decided once: cells per thread setting, rounds, files."""
    cpus = machine.usable_cpus()
    gpu = args.device == "cuda"
    keys = [k for k in (args.runtimes or RUNTIMES) if k not in args.skip and args.device in RUNTIMES[k].devices]
    if not keys:
        raise ShvitError(f"no runtime left to run on {args.device} (chosen: {', '.join(args.runtimes or RUNTIMES)})")
    if args.first_answer_only:
        keys = [k for k in keys if k in first_answer.COMMANDS]
        if not keys:
            raise ShvitError(f"no runtime with a first-answer command chosen (those are: {', '.join(first_answer.COMMANDS)})")
        variants, batches, threads, rounds, min_round = ["s1"], [1], [1], 3, 0.0
    elif args.quick:
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
    # compiled runtimes pay 15-50 s per input shape: only at the first variant and the floor batch
    # (shvit_tiny on one core: see PERSISTENT), unless --full (or --quick, or the GPU run) or --runtimes names them
    everywhere = args.full or args.quick or gpu
    restricted = [k for k in keys if RUNTIMES[k].compiled and k not in (args.runtimes or [])] if not everywhere else []
    memory = (args.memory if args.memory is not None else not args.quick) and not args.first_answer_only
    mem_batch = 16 if 16 in batches else max(batches)
    fa = args.first_answer if args.first_answer is not None else not (args.quick or custom or gpu)
    mode = ("first-answer" if args.first_answer_only else "gpu" if gpu else "custom" if custom else "quick" if args.quick
            else "full" if args.full else "default")
    return dict(keys=keys, variants=variants, batches=batches, threads=threads, rounds=rounds, warmup=args.warmup,
                min_round_s=min_round, device=args.device, half=gpu and not args.float32, cpus=cpus,
                restricted=restricted, memory=memory, mem_batch=mem_batch, floor_batch=mem_batch,
                first_answer=(fa or args.first_answer_only) and not gpu, mode=mode,
                training=args.training if args.training is not None else mode in ("default", "full"))


def limits(p: dict, key: str, threads: int) -> tuple[bool, list[int] | None]:
    """Where a restricted compiled runtime is timed: (every variant?, only these batches, or None: all)."""
    if key not in p["restricted"]:
        return True, None
    if key in PERSISTENT and threads == 1:
        return PERSISTENT[key], [b for b in p["batches"] if b in LATENCY_BATCHES or b == p["floor_batch"]]
    return False, [p["floor_batch"]]


def runtimes_for(p: dict, variant: str, threads: int) -> list[str]:
    return [k for k in p["keys"] if limits(p, k, threads)[0] or variant == p["variants"][0]]


def cell(p: dict, files: dict, variant: str, threads: int) -> dict:
    """One variant's share of a speed worker's spec: files, batches, runtimes (restricted ones at some batches)."""
    only = {k: limits(p, k, threads)[1] for k in p["restricted"]}
    return {"variant": variant, "resolution": RESOLUTION[variant], **files[variant], "batches": p["batches"],
            "runtimes": runtimes_for(p, variant, threads), "only_batches": only}


def timed_cells(p: dict) -> set[tuple[str, str, int, int]]:
    """Every (runtime, variant, batch, threads) the plan's speed workers time, read from the specs
    ``cell`` gives them as worker.py reads them (a runtime in ``only_batches`` at those batches alone):
    what the floors' cells must be among."""
    out = set()
    for threads in p["threads"]:
        for v in p["variants"]:
            c = cell(p, {v: {}}, v, threads)
            out |= {(k, v, b, threads) for k in c["runtimes"] for b in c["batches"]
                    if k not in c["only_batches"] or b in c["only_batches"][k]}
    return out


# -- the models ---------------------------------------------------------------------------------------------------

def random_model(variant: str, seed: int):
    """shvit_torch's ``variant`` in eval mode with random weights and BatchNorm statistics
    (shvit_numpy.weights.random_state, the tests' too): the same values on every run."""
    import torch

    import shvit_torch
    from shvit_numpy.names import state_shapes
    from shvit_numpy.weights import random_state

    model = shvit_torch.create(variant).eval()
    state = random_state(state_shapes(model.config), seed)
    model.load_state_dict({k: torch.from_numpy(a) for k, a in state.items()}, strict=False)
    return model


def prepare_models(p: dict, workdir: Path) -> dict:
    """Per variant: a canonical weight file with random weights and BatchNorm statistics
    (``random_model``) and, for ONNX Runtime, its folded ONNX export. {variant: {weights, onnx}}."""
    import shvit_torch
    from shvit_torch.export import export_onnx

    files = {}
    for i, v in enumerate(p["variants"]):
        model = random_model(v, seed=i)
        weights = workdir / f"{v}.safetensors"
        shvit_torch.save(model, weights)
        onnx = None
        if "ort" in p["keys"]:
            onnx = workdir / f"{v}.onnx"
            try:
                export_onnx(model, onnx, resolution=RESOLUTION[v])
            except Exception as e:  # noted by the ORT runner as "no ONNX export"
                print(f"{PROG}: ONNX export of {v} failed: {first_line(e, named=True)}", file=sys.stderr)
                onnx = None
        files[v] = {"weights": str(weights), "onnx": str(onnx) if onnx else None}
    return files


# -- the workers ---------------------------------------------------------------------------------------------------

def worker_env(threads: int, persist: bool = True) -> dict:
    """The environment of a worker limited to ``threads``. ``persist``: shvit_tiny may use its
    compiled-model cache; only one-core speed workers do. Its key does not name the thread count
    (tinygrad's kernels split work for NUM_CPU_THREADS threads), and the memory figures are those
    of a first run, compiler included."""
    env = dict(os.environ)
    env.update({k: str(threads) for k in THREAD_ENV})
    if threads != 1 or not persist:
        env["SHVIT_CACHE"] = "0"
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
                              env=worker_env(threads, persist=spec["mode"] == "speed"), cwd=ROOT)
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
        cells = [cell(p, files, v, threads) for v in p["variants"]]
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
    jobs = [(k, v) for v in p["variants"] for k in p["keys"] if k not in p["restricted"] or v == p["variants"][0]]
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


def first_answer_runs(p: dict, files: dict, workdir: Path) -> dict:
    """Time to first answer of every runtime that has a CLI, S1 at 224, batch 1, one core (see
    first_answer.py); the model files are the speed runs' S1 (made here if they did not run S1)."""
    if "s1" not in files:
        files = {**files, **prepare_models({**p, "variants": ["s1"]}, workdir)}
    import numpy as np

    x_path = workdir / "first-answer-input.npy"
    np.save(x_path, np.random.default_rng(0).standard_normal((1, 3, RESOLUTION["s1"], RESOLUTION["s1"])).astype(np.float32))
    keys = [k for k in p["keys"] if k in first_answer.COMMANDS]
    cpu = p["cpus"][0]
    warm_runs = p["rounds"] if p["mode"] == "first-answer" else 3
    print(f"first answer: {', '.join(keys)}: new processes on CPU {cpu}, one thread; caches empty, then warm x{warm_runs}",
          file=sys.stderr)
    env = worker_env(1)
    env.pop("SHVIT_CACHE", None)  # the cache is what is timed (warm --no-cache: without it)
    out = first_answer.measure(keys, files["s1"]["weights"], x_path, files["s1"]["onnx"], env, cpu, warm_runs,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
    return {"variant": "s1", "resolution": RESOLUTION["s1"], "batch": 1, "threads": 1, "cpu": cpu,
            "pinned_with": "taskset" if shutil.which("taskset") else "sched_setaffinity", "warm_runs": warm_runs, **out}


# -- main -------------------------------------------------------------------------------------------------------

def outputs(args, p: dict) -> tuple[Path, Path]:
    """(JSON/Markdown path without suffix, chart path). The default and --full runs are the ones
    the repository keeps (benchmarks/results/latest.*, docs/bench.png), the GPU run too (gpu.*,
    docs/bench-gpu.png); --quick and narrowed runs go to runs/bench/ (ignored by git), so a
    partial run never replaces a full one. --out and --chart override the places."""
    mode = p["mode"]
    stem = "latest" if mode in ("default", "full") else "first_answer" if mode == "first-answer" else mode
    keep = mode in ("default", "full", "gpu", "first-answer")  # first_answer.* replaces no other run's files
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
        speed, skipped, memory, answers, trained, interrupted = [], [], [], None, None, False
        if p["mode"] != "first-answer":
            try:
                speed, skipped = speed_runs(p, files, workdir)
            except Stopped as stop:
                speed, skipped, interrupted = stop.partial["speed"], stop.partial["skipped"], True
        if p["memory"] and not interrupted:
            try:
                memory = memory_runs(p, files, workdir)
            except (Stopped, KeyboardInterrupt):
                interrupted = True
        if p["first_answer"] and not interrupted:
            try:
                answers = first_answer_runs(p, files, workdir)
            except KeyboardInterrupt:
                interrupted = True
        if p.get("training") and not interrupted:  # the hand-written backward pass against autograd, one core
            try:
                trained = training.measure(cpu=p["cpus"][0], log=lambda m: print(m, file=sys.stderr, flush=True))
            except KeyboardInterrupt:
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
    if trained is not None:
        result["training"] = trained
    if answers is not None:
        result["first_answer"] = {k: v for k, v in answers.items() if k != "skipped"}
        result["skipped"] += answers["skipped"]
    if p["restricted"] and speed:
        names = ", ".join(RUNTIMES[k].label for k in p["restricted"])
        kept = [f"{RUNTIMES[k].label} at {'every variant' if limits(p, k, 1)[0] else p['variants'][0]}, batches "
                f"{', '.join(map(str, limits(p, k, 1)[1]))}" for k in p["restricted"] if k in PERSISTENT]
        also = (f" (on one core: {'; '.join(kept)}; shvit_tiny's captures persist in its compiled-model cache, "
                "so a second run loads them instead of compiling)") if kept else ""
        result["restricted"] = (f"Compiled runtimes ({names}) were timed at {p['variants'][0]}, batch {p['floor_batch']} only{also}: "
                                "each input shape costs them 15-50 s of compiling; `--full` times them everywhere.")
    result["floors"] = report.check_floors(result) if p["device"] == "cpu" and speed else []
    result["targets"] = report.check_targets(result) if answers is not None else []
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
    for line in report.target_lines(result["targets"]):
        print(line)
    print(f"wrote {base}.json, {base}.md" + (f", {chart_path}" if drew else "") +
          f" in {result['duration_s'] / 60:.1f} min")
    if result["interrupted"]:
        print(f"{PROG}: interrupted; the figures above are what was measured before", file=sys.stderr)
        return 130
    failed = [f for f in result["floors"] + result["targets"] if f["status"] == "FAIL"]
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
