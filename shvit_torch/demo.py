"""``make demo``: train SHViT on real handwritten digits, then check that PyTorch, NumPy and
tinygrad give the same answers on the test split.

    python -m shvit_torch.demo --out runs/demo            # the tour (about a minute or two here)
    python -m shvit_torch.demo --out runs/w --bundle      # also refresh the bundled demo weights

Writes OUT/model.safetensors (canonical), the training outputs (metrics.jsonl, curves.png,
checkpoint.pt) and OUT/metrics.json with test_acc, numpy_test_acc, tiny_test_acc and each
runtime's max |logits - torch logits|. ``--bundle`` copies the weights to
shvit_numpy/assets/demo.safetensors and writes one sample PNG per digit beside them, so that
``python -m shvit_numpy.run`` and ``python -m shvit_tiny.run`` with no arguments classify
something real.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shvit_numpy.cli import DEMO_IMAGES, DEMO_WEIGHTS, Parser
from shvit_numpy.errors import ShvitError
from shvit_numpy.weights import atomic_path

from . import data as datasets
from . import train

PROG = "python -m shvit_torch.demo"


def timed(fn, x: np.ndarray, batch: int = 150) -> tuple[np.ndarray, float]:
    """Logits for all of x in batches, and images per second (after one warm-up batch)."""
    fn(x[:batch])
    t = time.perf_counter()
    out = np.concatenate([fn(x[i:i + batch]) for i in range(0, len(x), batch)])
    return out, len(x) / (time.perf_counter() - t)


def evaluate_runtimes(weights: Path, split: datasets.Split) -> dict:
    """Accuracy, speed and max |delta logits| vs torch for each runtime, on the same weights."""
    import shvit_numpy
    import shvit_torch

    x, y = split.x.numpy(), split.y.numpy()
    fused = shvit_torch.load(weights).fuse()

    def torch_fn(b):
        with torch.inference_mode():
            return fused(torch.from_numpy(b)).numpy()

    runtimes = {"torch": torch_fn, "numpy": shvit_numpy.load(weights)}
    try:
        import shutil as _sh

        import shvit_tiny

        runtimes["tinygrad"] = shvit_tiny.load(weights, device="CPU" if _sh.which("clang") else None)
    except (ImportError, ShvitError) as e:
        print(f"{PROG}: note: tinygrad skipped ({e})", file=sys.stderr)
    rows, ref = {}, None
    for name, fn in runtimes.items():
        logits, speed = timed(fn, x)
        ref = logits if ref is None else ref
        rows[name] = {"acc": float((logits.argmax(1) == y).mean()), "images_per_s": speed,
                      "max_abs_delta": float(np.abs(logits - ref).max())}
    return rows


def bundle(out: Path) -> None:
    """The demo weights and one test digit of each class, as PNGs a person can open."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    DEMO_IMAGES.mkdir(parents=True, exist_ok=True)
    with atomic_path(DEMO_WEIGHTS) as tmp:
        shutil.copyfile(out / "model.safetensors", tmp)
    d = load_digits()
    _, idx_test = train_test_split(np.arange(len(d.target)), test_size=0.25, random_state=0, stratify=d.target)
    for label in range(10):
        i = next(i for i in idx_test if d.target[i] == label)
        datasets.render_digit(d.images[i]).save(DEMO_IMAGES / f"digit-{label}.png")
    print(f"bundled {DEMO_WEIGHTS} ({DEMO_WEIGHTS.stat().st_size / 1e6:.2f} MB) and 10 PNGs in {DEMO_IMAGES}", file=sys.stderr)


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--bundle", action="store_true", help="refresh shvit_numpy/assets/ with these weights and sample PNGs")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rc = train.main(["--out", str(args.out), "--epochs", str(args.epochs), "--no-progress"])
    if rc:
        return rc
    metrics_path = args.out / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    split = datasets.digits(metrics["resolution"]).test
    rows = evaluate_runtimes(args.out / "model.safetensors", split)
    print(f"\nSHViT on scikit-learn's digits: {len(split.x)} test images, one weight file, three runtimes")
    print(f"{'runtime':10s} {'test acc':>9s} {'images/s':>9s} {'max |Δ logits| vs torch':>24s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['acc']:9.4f} {r['images_per_s']:9.0f} {r['max_abs_delta']:24.2e}")
    metrics.update({"numpy_test_acc": rows["numpy"]["acc"], "numpy_max_abs_delta": rows["numpy"]["max_abs_delta"],
                    "runtimes": rows, "demo_seconds": time.perf_counter() - t0})
    if "tinygrad" in rows:
        metrics.update({"tiny_test_acc": rows["tinygrad"]["acc"], "tiny_max_abs_delta": rows["tinygrad"]["max_abs_delta"]})
    train.write_json(metrics_path, metrics)
    print(f"\nwrote {metrics_path} ({metrics['demo_seconds']:.0f} s in all); curves in {args.out}/curves.png")
    if args.bundle:
        bundle(args.out)
    low = [k for k in ("test_acc", "numpy_test_acc", "tiny_test_acc") if metrics.get(k, 1) < 0.97]
    if low:
        print(f"{PROG}: error: accuracy below 0.97 for {', '.join(low)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
