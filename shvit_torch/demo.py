"""``make demo``: train SHViT on real handwritten digits, then check that PyTorch, NumPy and
tinygrad give the same answers on the test split.

    python -m shvit_torch.demo --out runs/demo            # the tour (a minute or two on 2 cores)
    python -m shvit_torch.demo --out runs/w --bundle      # also refresh the bundled demo weights

Trains with ``python -m shvit_torch.train`` (its outputs land in OUT: model.safetensors,
checkpoint.pt, metrics.jsonl, curves.png), then runs the 450 test digits through the same
weight file in each runtime and prints one table: accuracy, images/s, and the largest
|logit - torch's logit|. OUT/metrics.json gets test_acc, numpy_test_acc, tiny_test_acc and
numpy_max_abs_delta, tiny_max_abs_delta. ``--bundle`` copies the weights to
shvit_numpy/assets/demo.safetensors and writes one test digit per class as a PNG beside them,
so that ``python -m shvit_numpy.run`` and ``python -m shvit_tiny.run`` with no arguments
classify something real; it checks that the weights get every one of those PNGs right.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from shvit_numpy.cli import DEMO_IMAGES, DEMO_WEIGHTS, Parser
from shvit_numpy.errors import ShvitError
from shvit_numpy.weights import atomic_path

from . import data as datasets
from . import train

PROG = "python -m shvit_torch.demo"
MIN_ACC = 0.97
MAX_BUNDLE_BYTES = 2_000_000


def note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr)


def timed(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 150) -> tuple[np.ndarray, float]:
    """Logits for all of x in batches, and images per second (after one warm-up batch)."""
    fn(x[:batch])
    t = time.perf_counter()
    out = np.concatenate([np.asarray(fn(x[i:i + batch]), dtype=np.float32) for i in range(0, len(x), batch)])
    return out, len(x) / (time.perf_counter() - t)


def load_runtimes(weights: Path) -> tuple[dict[str, Callable[[np.ndarray], np.ndarray]], dict[str, str]]:
    """The same weight file in each runtime, as (B, 3, H, W) -> logits functions (torch runs the
    folded model, as the other two do); and why any runtime could not be loaded."""
    import shvit_torch

    fused = shvit_torch.load(weights).fuse()

    def torch_fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return fused(torch.from_numpy(x)).numpy()

    runtimes, failed = {"torch": torch_fn}, {}
    for name, load in (("numpy", load_numpy), ("tinygrad", load_tiny)):
        try:
            runtimes[name] = load(weights)
        except Exception as e:  # noqa: BLE001 - the tour goes on without it, and says why
            failed[name] = one_line(e)
    return runtimes, failed


def load_numpy(weights: Path):
    import shvit_numpy

    return shvit_numpy.load(weights)


def load_tiny(weights: Path):
    import shvit_tiny

    return shvit_tiny.load(weights, device="CPU" if shutil.which("clang") else None)  # else tinygrad's default


def one_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:200]


def evaluate_runtimes(weights: Path, split: datasets.Split) -> tuple[dict[str, dict], dict[str, str]]:
    """Accuracy, images/s and max |delta logits| against torch for each runtime, on one weight
    file; and the runtimes that failed, with their one-line reason."""
    x, y = split.x.numpy(), split.y.numpy()
    runtimes, failed = load_runtimes(weights)
    rows, ref = {}, None
    for name, fn in runtimes.items():
        try:
            logits, speed = timed(fn, x)
        except Exception as e:  # noqa: BLE001
            failed[name] = one_line(e)
            continue
        ref = logits if ref is None else ref
        rows[name] = {"acc": float((logits.argmax(1) == y).mean()), "images_per_s": speed,
                      "max_abs_delta": float(np.abs(logits - ref).max())}
    for name, why in failed.items():
        note(f"the {name} runtime did not run ({why})")
    return rows, failed


def print_table(rows: dict[str, dict], n: int) -> None:
    print(f"\nSHViT on scikit-learn's handwritten digits: {n} test images, one weight file, three runtimes")
    print(f"{'runtime':10s} {'test acc':>9s} {'images/s':>9s} {'max |Δ logits| vs torch':>24s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['acc']:9.4f} {r['images_per_s']:9.0f} {r['max_abs_delta']:24.2e}")


def sample_digits() -> list[tuple[int, np.ndarray]]:
    """One test-split digit of each class, (label, 8x8 scan), the first of its class in the split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    test = datasets.digits_split(d.target)[1]
    return [(label, d.images[next(i for i in test if d.target[i] == label)]) for label in range(10)]


def bundle(out: Path) -> None:
    """Copy the weights to the package's assets with one sample PNG per digit, and check that
    the weights classify every PNG correctly through the CLIs' own image path."""
    import shvit_numpy
    from shvit_numpy.preprocess import load_images

    size = (out / "model.safetensors").stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise ShvitError(f"{out}/model.safetensors is {size / 1e6:.2f} MB, over the {MAX_BUNDLE_BYTES / 1e6:.0f} MB bundle limit")
    DEMO_IMAGES.mkdir(parents=True, exist_ok=True)
    for old in DEMO_IMAGES.glob("*.png"):
        old.unlink()
    for label, pixels in sample_digits():
        with atomic_path(DEMO_IMAGES / f"digit-{label}.png") as tmp:
            datasets.render_digit(pixels).save(tmp, format="PNG")
    with atomic_path(DEMO_WEIGHTS) as tmp:
        shutil.copyfile(out / "model.safetensors", tmp)
    model = shvit_numpy.load(DEMO_WEIGHTS)
    pngs = sorted(DEMO_IMAGES.glob("*.png"))
    predicted = [model.labels[i] for i in model(load_images(pngs, model.resolution)).argmax(1)]
    wrong = [p.name for p, label in zip(pngs, predicted) if p.stem.split("-")[-1] != label]
    if wrong:
        raise ShvitError(f"the bundled weights misclassify {', '.join(wrong)}; train again with another --seed")
    print(f"bundled {DEMO_WEIGHTS} ({size / 1e6:.2f} MB) and {len(pngs)} PNGs in {DEMO_IMAGES}, all classified correctly",
          file=sys.stderr)


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: this small model's ops are too small to share well between cores)")
    p.add_argument("--bundle", action="store_true", help="refresh shvit_numpy/assets/ with these weights and sample PNGs")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rc = train.main(["--out", str(args.out), "--epochs", str(args.epochs), "--seed", str(args.seed), "--threads", str(args.threads)])
    if rc:
        return rc
    try:
        metrics_path = args.out / "metrics.json"
        metrics = json.loads(metrics_path.read_text())
        split = datasets.digits(metrics["resolution"]).test
        t_eval = time.perf_counter()
        rows, failed = evaluate_runtimes(args.out / "model.safetensors", split)
        print_table(rows, len(split.x))
        metrics["runtimes"], metrics["failed_runtimes"] = rows, failed
        for name, key in (("numpy", "numpy"), ("tinygrad", "tiny")):
            if name in rows:
                metrics[f"{key}_test_acc"] = rows[name]["acc"]
                metrics[f"{key}_max_abs_delta"] = rows[name]["max_abs_delta"]
        metrics.update({"eval_seconds": time.perf_counter() - t_eval, "demo_seconds": time.perf_counter() - t0})
        train.write_json(metrics_path, metrics)
        print(f"\ntraining {metrics['train_seconds']:.0f} s, evaluation {metrics['eval_seconds']:.0f} s, "
              f"{metrics['demo_seconds']:.0f} s in all; wrote {metrics_path}; curves in {args.out / 'curves.png'}")
    except ShvitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    low = [k for k in ("test_acc", "numpy_test_acc", "tiny_test_acc") if k in metrics and metrics[k] < MIN_ACC]
    if low:
        print(f"{PROG}: error: accuracy below {MIN_ACC} for {', '.join(low)}", file=sys.stderr)
    if failed:
        print(f"{PROG}: error: the {' and '.join(failed)} runtime{'s' if len(failed) > 1 else ''} did not run (see the notes above)",
              file=sys.stderr)
    if low or failed:
        return 1
    if args.bundle:
        try:
            bundle(args.out)
        except ShvitError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
