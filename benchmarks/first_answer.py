"""Time to first answer: a new process, from its start until its logits are on disk.

What a user waits for the first time a runtime answers: ``python -m shvit_<x>.run --weights W
--input X.npy --save-logits Y.npy`` (ONNX Runtime: ``python -m benchmarks.first_answer --ort``,
the same steps in a few lines), timed from before the process starts until it has exited with
Y.npy written: interpreter start, imports, reading and folding the weights, compiling (where the
runtime compiles) and one forward pass. One core: the process is pinned to one CPU (``taskset``,
else the scheduler's affinity) and every library limited to one thread (so tinygrad compiles in
one worker, not one per core).

Three states of the caches a first run fills:

* ``cold``: HOME, XDG_CACHE_HOME, tinygrad's CACHEDB and PoCL's kernel cache in an empty
  folder: nothing compiled before (a new machine, a new user). Python's bytecode of the
  installed packages is kept: ``pip install`` writes it.
* ``warm``: the same command again with what the cold run left there (shvit_tiny: its
  compiled-model cache and tinygrad's binaries).
* ``warm_no_cache`` (shvit_tiny only): warm again with ``--no-cache``: tinygrad's own binary
  cache alone, i.e. what shvit_tiny's compiled-model cache adds.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# runtime key (as in runners.RUNTIMES) -> the module whose CLI answers, and its extra arguments
COMMANDS = {
    "numpy": ("shvit_numpy.run", []),
    "torch-folded": ("shvit_torch.run", ["--device", "cpu"]),  # the CLI folds BatchNorm, eval mode
    "tiny-cpu": ("shvit_tiny.run", ["--device", "CPU"]),
    "tiny-cl": ("shvit_tiny.run", ["--device", "CL"]),
    "ort": ("benchmarks.first_answer", ["--ort"]),
}
CACHED = ("tiny-cpu", "tiny-cl")  # runtimes with a compiled-model cache to switch off (--no-cache)


class NoAnswer(Exception):
    """The process failed or wrote no logits; ``str()`` is its last line of stderr."""


def command(key: str, weights, x_path, logits, onnx=None, no_cache: bool = False) -> list[str]:
    """The argv of one first-answer run of runtime ``key``."""
    module, extra = COMMANDS[key]
    if key == "ort":
        if onnx is None:
            raise NoAnswer("no ONNX export of this model")
        return [sys.executable, "-m", module, "--ort", str(onnx), str(x_path), str(logits)]
    return ([sys.executable, "-m", module, "--weights", str(weights), "--input", str(x_path), "--save-logits", str(logits),
             "--topk", "0"] + extra + (["--no-cache"] if no_cache else []))


def cache_env(env: dict, home: Path) -> dict:
    """``env`` with every cache a first run fills placed under ``home``."""
    cache = home / ".cache"
    return {**env, "HOME": str(home), "XDG_CACHE_HOME": str(cache), "CACHEDB": str(cache / "tinygrad" / "cache.db"),
            "POCL_CACHE_DIR": str(cache / "pocl")}


def time_first_answer(argv: list[str], env: dict, logits: Path, cpu: int | None = None, timeout: float = 900) -> float:
    """Wall seconds from starting ``argv`` (pinned to ``cpu`` when given) until it exits having
    written ``logits``; NoAnswer if it fails, times out or writes nothing."""
    logits = Path(logits)
    logits.unlink(missing_ok=True)
    pre = None
    if cpu is not None:
        if shutil.which("taskset"):
            argv = ["taskset", "-c", str(cpu)] + argv
        elif hasattr(os, "sched_setaffinity"):
            pre = lambda: os.sched_setaffinity(0, {cpu})  # noqa: E731
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=pre)
    except subprocess.TimeoutExpired:
        raise NoAnswer(f"no answer within {timeout:.0f} s") from None
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not logits.is_file():
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no logits written"])[-1]
        raise NoAnswer(last[:200])
    return seconds


def summary(samples: list[float]) -> dict:
    import statistics

    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def measure(keys, weights, x_path, onnx, env: dict, cpu: int | None, warm_runs: int = 3, log=print) -> dict:
    """Every runtime of ``keys`` in ``COMMANDS``: one cold run each (its own empty cache folder),
    then ``warm_runs`` rounds of warm runs interleaved across runtimes (the order rotates), then
    one warm ``--no-cache`` run per cached runtime. Returns {"rows": [...], "skipped": [...]}; each
    row holds seconds and the largest |logit difference| from shvit_numpy's answer."""
    import numpy as np

    keys = [k for k in keys if k in COMMANDS]
    work = Path(tempfile.mkdtemp(prefix="shvit-first-answer-"))
    rows, skipped, answers = {}, [], {}

    def one(key, state, no_cache=False):
        """Seconds of one run, or None (noted in ``skipped``) when it gave no answer."""
        out = work / f"{key}.npy"
        try:
            argv = command(key, weights, x_path, out, onnx, no_cache)
            secs = time_first_answer(argv, cache_env(env, work / f"home-{key}"), out, cpu)
        except NoAnswer as e:
            skipped.append({"runtime": key, "where": f"first answer, {state}", "reason": str(e)})
            return None
        answers.setdefault(key, []).append(np.load(out))
        log(f"  first answer, {key}, {state}: {secs:.2f} s")
        return secs

    try:
        for key in keys:
            (work / f"home-{key}").mkdir(mode=0o700)
            if (cold := one(key, "cold")) is not None:
                rows[key] = {"runtime": key, "cold_s": cold}
        warm = {k: [] for k in rows}
        for r in range(warm_runs):
            live = [k for k in rows if len(warm[k]) == r]  # a runtime that failed warm once is not retried
            for key in live[r % max(1, len(live)):] + live[:r % max(1, len(live))]:
                if (secs := one(key, "warm")) is not None:
                    warm[key].append(secs)
        for key, row in rows.items():
            row["warm_s"] = summary(warm[key]) if warm[key] else None
            if key in CACHED:
                row["warm_no_cache_s"] = one(key, "warm, --no-cache", no_cache=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = answers.get("numpy", [None])[0]
    for key, row in rows.items():
        diffs = [float(np.max(np.abs(a.astype(np.float64) - ref))) for a in answers.get(key, [])
                 if ref is not None and a.shape == ref.shape]
        row["max_abs_diff_vs_numpy"] = max(diffs) if diffs else None  # over every run: cold, warm, --no-cache
    return {"rows": list(rows.values()), "skipped": skipped}


def ort_main(onnx: str, x_path: str, logits: str) -> int:
    """ONNX Runtime's first answer: load the export, run the batch on one thread, save the logits."""
    import numpy as np
    import onnxruntime as ort

    from shvit_numpy.weights import atomic_path

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    y = session.run(None, {session.get_inputs()[0].name: np.load(x_path)})[0]
    with atomic_path(logits) as tmp, open(tmp, "wb") as f:
        np.save(f, y)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--ort":
        sys.exit(ort_main(*sys.argv[2:]))
    print(f"usage: python -m benchmarks.first_answer --ort MODEL.onnx X.npy Y.npy\n{__doc__.splitlines()[0]}", file=sys.stderr)
    sys.exit(2)
