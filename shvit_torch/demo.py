"""``make demo``: train SHViT to name the largest of three handwritten digits on a canvas, then
check that PyTorch, NumPy and tinygrad give the same answers on the test split.

    python -m shvit_torch.demo --out runs/demo            # the tour (about four minutes on 2 cores)
    python -m shvit_torch.demo --out runs/w --bundle      # also refresh the bundled demo weights

The task (``shvit_torch.data.canvas``): three distinct digits, real 8x8 scans from
scikit-learn, at random places on a 128x128 image; the label is the largest of them, so no
part of the image decides alone. At 128 the attention stages see 4x4 = 16 tokens (stage 2)
and 2x2 (stage 3). Test canvases are built only from scans no training canvas uses.

Trains with ``python -m shvit_torch.train --data canvas`` (its outputs land in OUT:
model.safetensors, checkpoint.pt, metrics.jsonl, curves.png), then runs the 1000 test
canvases through the same weight file in each runtime and prints one table: accuracy,
images/s, and the largest |logit - torch's logit|. OUT/metrics.json gets test_acc,
numpy_test_acc, tiny_test_acc and numpy_max_abs_delta, tiny_max_abs_delta; OUT/attention.png
shows the trained model's stage-2 attention on test canvases. ``--bundle`` copies the weights
to shvit_numpy/assets/demo.safetensors with one test canvas per class as a PNG beside them (the
first of its class the weights get right), so that ``python -m shvit_numpy.run`` and
``python -m shvit_tiny.run`` with no arguments classify something real (it checks the PNG
files give those answers through the CLIs' image path), and the figure to docs/demo-attention.png.
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
from shvit_numpy.errors import ShvitError, first_line
from shvit_numpy.weights import atomic_path

from . import data as datasets
from . import train

PROG = "python -m shvit_torch.demo"
MIN_ACC = 0.6  # chance is 1/8
DOCS_FIGURE = Path(__file__).resolve().parent.parent / "docs" / "demo-attention.png"
MAX_BUNDLE_BYTES = 2_000_000
EPOCHS, LR = 12, 4e-3  # about 2.5 minutes of training on one core


def note(message: str) -> None:
    print(f"{PROG}: note: {message}", file=sys.stderr)


def timed(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int = 100) -> tuple[np.ndarray, float, float]:
    """Logits for all of x in batches; the steady images per second; and the seconds of the first
    call of each batch shape the loop will see (tinygrad compiles there). Every shape is warmed
    before the clock starts, so a compile never counts as speed (a last, smaller batch has a
    shape of its own)."""
    t = time.perf_counter()
    for size in sorted({min(batch, len(x)), len(x) % batch} - {0}):
        fn(x[:size])
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = np.concatenate([np.asarray(fn(x[i:i + batch]), dtype=np.float32) for i in range(0, len(x), batch)])
    return out, len(x) / (time.perf_counter() - t), first


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
            failed[name] = first_line(e, named=True)
    return runtimes, failed


def load_numpy(weights: Path):
    import shvit_numpy

    return shvit_numpy.load(weights)


def load_tiny(weights: Path):
    import shvit_tiny

    return shvit_tiny.load(weights, device="CPU" if shutil.which("clang") else None)  # else tinygrad's default


def evaluate_runtimes(weights: Path, split: datasets.Split) -> tuple[dict[str, dict], dict[str, str]]:
    """Accuracy, images/s and max |delta logits| against torch for each runtime, on one weight
    file; and the runtimes that failed, with their one-line reason."""
    x, y = split.x.numpy(), split.y.numpy()
    runtimes, failed = load_runtimes(weights)
    rows, ref = {}, None
    for name, fn in runtimes.items():
        try:
            logits, speed, first = timed(fn, x)
        except Exception as e:  # noqa: BLE001
            failed[name] = first_line(e, named=True)
            continue
        ref = logits if ref is None else ref
        rows[name] = {"acc": float((logits.argmax(1) == y).mean()), "images_per_s": speed, "first_call_s": first,
                      "max_abs_delta": float(np.abs(logits - ref).max())}
    for name, why in failed.items():
        note(f"the {name} runtime did not run ({why})")
    return rows, failed


def print_table(rows: dict[str, dict], n: int) -> None:
    print(f"\nSHViT naming the largest of three handwritten digits: {n} test canvases, one weight file, three runtimes")
    print(f"{'runtime':10s} {'test acc':>9s} {'images/s':>9s} {'first call':>11s} {'max |Δ logits| vs torch':>24s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['acc']:9.4f} {r['images_per_s']:9.0f} {r['first_call_s']:9.2f} s {r['max_abs_delta']:24.2e}")
    print("images/s: steady speed, batches of 100, every batch shape run once before the clock starts; "
          "first call: that warm-up (tinygrad compiles its kernels there)")


def sample_canvases(model) -> list[tuple[str, object]]:
    """One test canvas of each class, (file name, PIL image): the first of its class in the test
    split that ``model`` (a NumPy SHViT) classifies correctly, so the bundled samples show the
    CLIs right answers (the accuracy on the whole split is the demo's table). The name lists
    the digits in increasing order, so it ends with the label."""
    from sklearn.datasets import load_digits

    from shvit_numpy.preprocess import preprocess_pil

    inks = datasets.digit_inks(load_digits().images)
    picks = []
    for c in range(len(datasets.CANVAS_CLASSES)):
        for s in (s for s in datasets.canvas_split_specs()[1] if s.label == c):
            image = datasets.render_canvas(inks, s)
            if model(preprocess_pil(image, model.resolution)[None]).argmax() == c:
                picks.append((f"canvas-{'-'.join(map(str, sorted(s.digits)))}.png", image))
                break
        else:
            raise ShvitError(f"the weights get no test canvas of class {datasets.CANVAS_CLASSES[c]} right; train longer")
    return picks


def model_pixel(v: float, res: int) -> float:
    """A canvas coordinate -> the same point in the image the model sees: the canvas resized to
    resize_size(res), then its centre res x res crop."""
    size = datasets.resize_size(res)
    return v * size / datasets.resize_size(datasets.CANVAS_RES) - round((size - res) / 2)


def token_of(corner: tuple[int, int], grid: int, res: int) -> int:
    """The index (row-major) of the grid x grid token that holds a digit's centre."""
    r, c = (int(model_pixel(v + datasets.DIGITS_RENDER / 2, res) * grid // res) for v in corner)
    return min(max(r, 0), grid - 1) * grid + min(max(c, 0), grid - 1)


def ink_tokens(spec: datasets.CanvasSpec, grid: int, res: int) -> list[int]:
    """The tokens (row-major) that overlap any digit's 32x32 box: where the ink is."""
    cell, d = res / grid, datasets.DIGITS_RENDER
    spans = [[k for k in range(grid) if model_pixel(v, res) < (k + 1) * cell and k * cell < model_pixel(v + d, res)]
             for corner in spec.corners for v in corner]
    return sorted({r * grid + c for rows, cols in zip(spans[::2], spans[1::2]) for r in rows for c in cols})


def attention_on_ink(attention: dict[str, np.ndarray], specs: list, grid: int, res: int) -> dict[str, float]:
    """Per stage-2 layer, the mean share of the largest digit's token's attention that lands on
    tokens with ink; and 'uniform', the share uniform attention (1/N each) would give them."""
    ink = [ink_tokens(s, grid, res) for s in specs]
    query = [token_of(s.corners[s.digits.index(max(s.digits))], grid, res) for s in specs]
    out = {name: float(np.mean([a[i, q, t].sum() for i, (q, t) in enumerate(zip(query, ink))])) for name, a in attention.items()}
    return out | {"uniform": float(np.mean([len(t) / grid**2 for t in ink]))}


def attention_figure(weights: Path, path: Path, n: int = 4, n_stats: int = 200) -> dict[str, float]:
    """For n test canvases: the image, then, in each stage-2 attention layer, the attention
    weights of the token on the largest digit over all 16 tokens, drawn over the image. Returns
    (and the title shows) ``attention_on_ink`` over the first n_stats test canvases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import shvit_numpy

    model = shvit_numpy.load(weights)
    specs = datasets.canvas_split_specs((0, n_stats))[1]
    x = datasets.canvas(model.resolution, sizes=(0, n_stats)).test.x.numpy()
    inter = model.forward_intermediates(x)
    layers = [k for k in inter.attention if k.startswith("stages.1.")]
    grid, res = inter.stages[1].shape[-1], x.shape[-1]
    on_ink = attention_on_ink({k: inter.attention[k] for k in layers}, specs, grid, res)
    shown = (x[:n].transpose(0, 2, 3, 1) * shvit_numpy.preprocess.STD + shvit_numpy.preprocess.MEAN).clip(0, 1)
    fig, axes = plt.subplots(n, 1 + len(layers), figsize=(2.4 * (1 + len(layers)), 2.5 * n + 0.4), squeeze=False)
    for i, spec in enumerate(specs[:n]):
        q = token_of(spec.corners[spec.digits.index(max(spec.digits))], grid, res)
        pred = model.labels[int(inter.logits[i].argmax())]
        axes[i, 0].imshow(shown[i])
        axes[i, 0].set_title(f"digits {sorted(spec.digits)}\nlabel {max(spec.digits)}, predicted {pred}", fontsize=8)
        for j, name in enumerate(layers):
            a = inter.attention[name][i, q].reshape(grid, grid)
            ax = axes[i, j + 1]
            ax.imshow(shown[i])
            im = ax.imshow(a, cmap="magma", alpha=0.6, extent=(0, res, res, 0), vmin=0, vmax=a.max(), interpolation="nearest")
            qr, qc = divmod(q, grid)
            ax.add_patch(plt.Rectangle((qc * res / grid, qr * res / grid), res / grid, res / grid, fill=False, ec="cyan", lw=1.5))
            ax.set_title(f"{name.removesuffix('.mixer.m')}\nmax weight {a.max():.2f} (uniform {1 / grid**2:.3f})", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    shares = ", ".join(f"{on_ink[k]:.0%}" for k in layers)
    fig.suptitle(f"The trained demo model's stage-2 attention ({grid}x{grid} = {grid * grid} tokens) on test canvases:\n"
                 "the weights of the query token (cyan box, on the largest digit) over every token.\n"
                 f"Over {n_stats} test canvases its weight on tokens with ink: {shares} (uniform: {on_ink['uniform']:.0%})",
                 fontsize=9.5)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return on_ink


def bundle(out: Path) -> None:
    """Copy the weights to the package's assets with one sample PNG per class and the attention
    figure to docs/, and check that the weights classify every PNG file correctly through the
    CLIs' own image path (PNG written, read back, preprocessed)."""
    import shvit_numpy
    from shvit_numpy.preprocess import load_images

    size = (out / "model.safetensors").stat().st_size
    if size > MAX_BUNDLE_BYTES:
        raise ShvitError(f"{out}/model.safetensors is {size / 1e6:.2f} MB, over the {MAX_BUNDLE_BYTES / 1e6:.0f} MB bundle limit")
    with atomic_path(DEMO_WEIGHTS) as tmp:
        shutil.copyfile(out / "model.safetensors", tmp)
    model = shvit_numpy.load(DEMO_WEIGHTS)
    DEMO_IMAGES.mkdir(parents=True, exist_ok=True)
    for old in DEMO_IMAGES.glob("*.png"):
        old.unlink()
    for name, image in sample_canvases(model):
        with atomic_path(DEMO_IMAGES / name) as tmp:
            image.save(tmp, format="PNG")
    pngs = sorted(DEMO_IMAGES.glob("*.png"))
    predicted = [model.labels[i] for i in model(load_images(pngs, model.resolution)).argmax(1)]
    wrong = [p.name for p, label in zip(pngs, predicted) if p.stem.split("-")[-1] != label]
    if wrong:
        raise ShvitError(f"the bundled weights misclassify {', '.join(wrong)}; train again with another --seed")
    with atomic_path(DOCS_FIGURE) as tmp:
        shutil.copyfile(out / "attention.png", tmp)
    print(f"bundled {DEMO_WEIGHTS} ({size / 1e6:.2f} MB) and {len(pngs)} PNGs in {DEMO_IMAGES}, all classified correctly; "
          f"copied the attention figure to {DOCS_FIGURE}", file=sys.stderr)


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: this small model's ops are too small to share well between cores)")
    p.add_argument("--bundle", action="store_true", help="refresh shvit_numpy/assets/ with these weights and sample PNGs")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rc = train.main(["--data", "canvas", "--out", str(args.out), "--epochs", str(args.epochs), "--lr", str(LR),
                     "--seed", str(args.seed), "--threads", str(args.threads)])
    if rc:
        return rc
    try:
        metrics_path = args.out / "metrics.json"
        metrics = json.loads(metrics_path.read_text())
        split = datasets.canvas(metrics["resolution"], sizes=(0, datasets.CANVAS_SIZES[1])).test
        t_eval = time.perf_counter()
        rows, failed = evaluate_runtimes(args.out / "model.safetensors", split)
        print_table(rows, len(split.x))
        last = [h["test_acc"] for h in map(json.loads, (args.out / "metrics.jsonl").read_text().splitlines())][-3:]
        metrics["last_epochs_test_acc"] = last
        print(f"torch's test accuracy after each of the last {len(last)} epochs: {', '.join(f'{a:.3f}' for a in last)} "
              "(the learning rate ends its cosine at 1e-5, so the end of the curve has settled; see docs/07)")
        metrics["runtimes"], metrics["failed_runtimes"] = rows, failed
        for name, key in (("numpy", "numpy"), ("tinygrad", "tiny")):
            if name in rows:
                metrics[f"{key}_test_acc"] = rows[name]["acc"]
                metrics[f"{key}_max_abs_delta"] = rows[name]["max_abs_delta"]
        metrics["attention_on_ink"] = attention_figure(args.out / "model.safetensors", args.out / "attention.png")
        print("stage-2 attention of the token on the largest digit, share on tokens with ink: "
              + ", ".join(f"{k.removesuffix('.mixer.m')} {v:.0%}" for k, v in metrics["attention_on_ink"].items()))
        metrics.update({"eval_seconds": time.perf_counter() - t_eval, "demo_seconds": time.perf_counter() - t0})
        train.write_json(metrics_path, metrics)
        print(f"\ntraining {metrics['train_seconds']:.0f} s, evaluation {metrics['eval_seconds']:.0f} s, "
              f"{metrics['demo_seconds']:.0f} s in all; wrote {metrics_path}; curves in {args.out / 'curves.png'}, "
              f"attention maps in {args.out / 'attention.png'}")
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
