"""Training speed on one core: shvit_numpy's hand-written backward pass against torch's autograd.

``python -m benchmarks.training [--batch 64] [--rounds 3] [--steps 4] [--save]``

One training step, the same in both: the demo's model (shvit_numpy.train.DEMO_CONFIG, 334k
parameters, 8 classes) at 128x128, a training-mode forward (batch statistics), cross-entropy with
label smoothing 0.1, the backward pass, and an AdamW step with the trainer's parameter groups
(no gradient clipping, no augmentation). NumPy: ``shvit_numpy.backward.loss_and_grads`` and
``shvit_numpy.optim.AdamW``; torch: eager ``shvit_torch`` with ``loss.backward()`` and
``torch.optim.AdamW``. Both start from the same weight file and see the same batch.

Each measurement is a fresh subprocess pinned to one CPU (``taskset``) with one thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``): one warm-up step, then ``--steps`` timed
steps; the rounds alternate numpy, torch, numpy, torch... so a busy neighbour slows both alike,
and the report gives medians. The issue's target: NumPy at >= 0.25x torch's images/s.
``--save`` writes benchmarks/results/training.json; ``make bench`` runs this too.
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

RESULTS = Path(__file__).parent / "results" / "training.json"
ROOT = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TARGET = 0.25  # the floor: NumPy training at >= 0.25x torch's images/s, one core
RES = 128


def worker(runtime: str, weights: str, batch: int, steps: int) -> dict:
    """Time ``steps`` training steps of one runtime after one warm-up step: images/s per step."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, RES, RES)).astype(np.float32)
    labels = np.arange(batch) % 8
    if runtime == "numpy":
        import shvit_numpy
        from shvit_numpy.backward import loss_and_grads, parameters
        from shvit_numpy.optim import AdamW

        model = shvit_numpy.load(weights, fold=False)
        opt = AdamW(parameters(model), lr=1e-3, weight_decay=0.025)

        def step():
            _, grads = loss_and_grads(model, x, labels, 0.1)
            opt.step(grads)
    else:
        import torch
        import torch.nn.functional as F

        import shvit_torch
        from shvit_torch.train import param_groups

        torch.set_num_threads(1)
        model = shvit_torch.load(weights).train()
        opt = torch.optim.AdamW(param_groups(model, 0.025), lr=1e-3)
        xt, yt = torch.from_numpy(x), torch.from_numpy(labels)

        def step():
            loss = F.cross_entropy(model(xt), yt, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"runtime": runtime, "images_per_s": batch / statistics.median(times), "step_s": times}


def measure(batch: int = 64, rounds: int = 3, steps: int = 4, cpu: int | None = None, log=print) -> dict:
    """Alternating one-core rounds of both runtimes in fresh processes; medians and their ratio."""
    import shvit_torch
    from shvit_numpy.train import DEMO_CONFIG

    cpu = min(os.sched_getaffinity(0)) if cpu is None and hasattr(os, "sched_getaffinity") else (cpu or 0)
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="shvit-train-bench-") as tmp:
        weights = Path(tmp) / "demo.safetensors"
        shvit_torch.save(shvit_torch.create(DEMO_CONFIG), weights)
        runs: dict[str, list[float]] = {"numpy": [], "torch": []}
        for r in range(rounds):
            for runtime in runs:
                out = Path(tmp) / f"{runtime}-{r}.json"
                argv = [sys.executable, "-m", "benchmarks.training", "--worker", runtime, "--weights", str(weights),
                        "--batch", str(batch), "--steps", str(steps), "--json", str(out)]
                if shutil.which("taskset"):
                    argv = ["taskset", "-c", str(cpu)] + argv
                subprocess.run(argv, check=True, env=env, cwd=ROOT)
                runs[runtime].append(json.loads(out.read_text())["images_per_s"])
                log(f"training round {r + 1}/{rounds}: {runtime} {runs[runtime][-1]:.1f} images/s")
    numpy_ips, torch_ips = (statistics.median(runs[k]) for k in ("numpy", "torch"))
    ratio = numpy_ips / torch_ips
    return {"model": "demo (shvit_numpy.train.DEMO_CONFIG)", "resolution": RES, "batch": batch, "threads": 1, "cpu": cpu,
            "steps": steps, "rounds": rounds, "numpy_images_per_s": numpy_ips, "torch_images_per_s": torch_ips,
            "ratio": ratio, "target": TARGET, "status": "PASS" if ratio >= TARGET else "FAIL", "runs": runs}


def markdown(r: dict) -> list[str]:
    """The result as a small Markdown table (the bench report's training section)."""
    return [f"Training, one core (CPU {r['cpu']}, one thread): the demo model at {r['resolution']}x{r['resolution']}, batch "
            f"{r['batch']}: forward, label-smoothed cross-entropy, backward, AdamW; median of {r['rounds']} rounds of "
            f"{r['steps']} steps (`python -m benchmarks.training`).", "",
            "| runtime | images/s | vs torch |", "|---|---:|---:|",
            f"| torch (eager, autograd) | {r['torch_images_per_s']:.1f} | 1.00 |",
            f"| shvit_numpy (backward by hand) | {r['numpy_images_per_s']:.1f} | {r['ratio']:.2f} |", "",
            f"Target: NumPy >= {r['target']}x torch: **{r['status']}**."]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--save", action="store_true", help=f"write {RESULTS.relative_to(ROOT)}")
    p.add_argument("--worker", choices=["numpy", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.batch, args.rounds, args.steps) < 1 or args.batch < 2:
        p.error("--batch must be >= 2, --rounds and --steps >= 1")
    if args.worker:
        Path(args.json).write_text(json.dumps(worker(args.worker, args.weights, args.batch, args.steps)))
        return 0
    result = measure(args.batch, args.rounds, args.steps, log=lambda m: print(m, file=sys.stderr, flush=True))
    from .machine import describe

    result["machine"] = describe()
    print("\n".join(markdown(result)))
    if args.save:
        from shvit_numpy.weights import atomic_path

        with atomic_path(RESULTS) as tmp:
            Path(tmp).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
