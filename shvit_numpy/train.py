"""``python -m shvit_numpy.train``: train SHViT in nothing but NumPy, on the demo's task.

    python -m shvit_numpy.train --out runs/np                   # the demo's canvas task from scratch
    python -m shvit_numpy.train --out runs/np --data digits     # scikit-learn's digits at 64x64 (quicker)
    python -m shvit_numpy.train --out runs/ft --init-from shvit_numpy/assets/demo.safetensors --epochs 1

Forward and backward are shvit_numpy.backward's (every gradient written by hand and tested
equal to torch's autograd), the update is shvit_numpy.optim.AdamW with the trainer's parameter
groups, the schedule linear warm-up then cosine decay, the loss cross-entropy with label
smoothing; the only augmentation is a random shift of a few pixels. It does not repeat
shvit_torch.train's recipe (affine warps, mixup, EMA, ...): it shows the same model learning
with nothing but NumPy. ``--out`` receives model.safetensors (canonical: loads in all three
runtimes) and metrics.json (test accuracy, images/s, loss per epoch).

The defaults (12 epochs at batch 64, peak lr 4e-3 after 2 warm-up epochs, as the torch demo)
reached 0.753 test accuracy on the 1000 test canvases (chance: 0.125) in 11 minutes of training
on one core of a busy 2-core Xeon, ~110 images/s (seed 0, 2026-12-03; the torch demo, with its
affine warps, reaches 0.889).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import digits
from .backward import loss_and_grads, parameters
from .cli import Parser, run_training
from .config import SHViTConfig
from .digits import DEMO_CONFIG
from .errors import TrainingError
from .model import SHViT
from .names import state_shapes
from .optim import AdamW, lr_factor
from .weights import atomic_path, load_weights, save_weights

PROG = "python -m shvit_numpy.train"


ZERO_INIT = (".pw2.bn.weight", ".proj.1.bn.weight")  # BN weights that start at 0: the branch starts as the identity


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--data", choices=["canvas", "digits"], default="canvas",
                   help="'canvas' (the demo's task: the largest of three digits, 128x128, 8 classes) or 'digits' (64x64, 10 classes)")
    p.add_argument("--init-from", type=Path, metavar="FILE",
                   help="start from this weight file (a new head when the class count differs); default: random initialisation")
    p.add_argument("--resolution", type=int, help="image size (default: 128 for canvas, 64 for digits)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    p.add_argument("--warmup-epochs", type=float, default=2)
    p.add_argument("--weight-decay", type=float, default=0.025)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max global gradient norm; 0 = off")
    p.add_argument("--shift", type=int, default=4, help="random shift of up to this many pixels (0 = off)")
    p.add_argument("--limit", type=int, metavar="N", help="use only N train and N test images (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (tqdm when installed; default: when stderr is a terminal)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "limit", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.batch_size < 2:
        p.error(f"--batch-size must be >= 2 (BatchNorm needs two samples to train), got {args.batch_size}")
    if args.lr <= 0 or args.min_lr < 0 or args.shift < 0 or args.clip_grad < 0:
        p.error("--lr must be > 0, and --min-lr, --shift and --clip-grad >= 0")
    if not 0 <= args.label_smoothing < 1:
        p.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    return args


# ---- model ----------------------------------------------------------------------------------------

def init_state(cfg: SHViTConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """torch's initialisation, by name: kernels and conv biases U(+-1/sqrt(fan_in)) (kaiming_uniform
    with a = sqrt(5)), the classifier N(0, 0.02) truncated at +-2, BatchNorm and GroupNorm weight 1
    and bias 0 (weight 0 where the spec starts a residual branch as the identity), running mean 0
    and variance 1."""
    shapes, state = state_shapes(cfg), {}
    for name, shape in shapes.items():
        if name.endswith("running_var"):
            a = np.ones(shape)
        elif name.endswith(("running_mean", "bn.bias", "pre_norm.bias", "l.bias")):
            a = np.zeros(shape)
        elif name.endswith(("bn.weight", "pre_norm.weight")):
            zero = name.endswith(ZERO_INIT) or (".blocks." in name and name.endswith(".conv.m.bn.weight"))
            a = np.zeros(shape) if zero else np.ones(shape)
        elif name.endswith(".l.weight"):
            a = np.clip(rng.normal(0, 0.02, shape), -2, 2)
        else:  # conv kernels (C_out, C_in/groups, k, k) and the SE convs' biases
            w_shape = shapes[name.removesuffix(".bias") + ".weight"] if name.endswith(".bias") else shape
            bound = 1 / math.sqrt(int(np.prod(w_shape[1:])))
            a = rng.uniform(-bound, bound, shape)
        state[name] = a.astype(np.float32)
    return state


def build_model(args, num_classes: int) -> tuple[SHViT, str]:
    """The model to train (unfolded) and a note on how it was initialised."""
    rng = np.random.default_rng(args.seed)
    if args.init_from is None:
        cfg = DEMO_CONFIG.replace(num_classes=num_classes)
        return SHViT(cfg).load_state(init_state(cfg, rng)), "random initialisation"
    w = load_weights(args.init_from)
    cfg = w.config.replace(num_classes=num_classes)
    state = init_state(cfg, rng)
    fresh = {k: v for k, v in state.items() if k.startswith(("head.", "head_dist."))}
    state.update({k: v for k, v in w.state.items() if k not in fresh or w.config.num_classes == num_classes})
    note = f"initialised from {args.init_from}"
    if w.config.num_classes != num_classes:
        note += f" (a new {num_classes}-class head; the file has {w.config.num_classes} classes)"
    return SHViT(cfg).load_state(state), note


# ---- data and augmentation ------------------------------------------------------------------------

def class_names(data: str) -> list[str]:
    return list(digits.CANVAS_CLASSES) if data == "canvas" else [str(i) for i in range(10)]


def load_data(args) -> tuple[digits.Arrays, digits.Arrays, int]:
    """(train, test, resolution) of ``--data``, as shvit_torch.train sees them (no augmentation yet)."""
    res = args.resolution or (digits.CANVAS_RES if args.data == "canvas" else digits.DIGITS_RES)
    if args.data == "canvas":  # only the canvases that will be used are drawn
        sizes = digits.CANVAS_SIZES if args.limit is None else tuple(min(args.limit, n) for n in digits.CANVAS_SIZES)
        train, test = digits.canvas_arrays(res, sizes)
    else:
        train, test = digits.digits_arrays(res)
    if args.limit is not None:
        train, test = (digits.Arrays(a.x[:args.limit], a.y[:args.limit]) for a in (train, test))
    return train, test, res


def shift(x: np.ndarray, rng: np.random.Generator, pixels: int) -> np.ndarray:
    """Each image moved by up to ``pixels`` in x and y, the border repeated (paper stays paper)."""
    if not pixels:
        return x
    B, _, H, W = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (pixels, pixels), (pixels, pixels)), mode="edge")
    dy, dx = rng.integers(0, 2 * pixels + 1, (2, B))
    return np.stack([padded[b, :, dy[b]:dy[b] + H, dx[b]:dx[b] + W] for b in range(B)])


def clip(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients together so their global norm is at most ``max_norm``; returns the norm."""
    norm = math.sqrt(sum(float(np.square(g, dtype=np.float64).sum()) for g in grads.values()))
    if max_norm and norm > max_norm:
        for g in grads.values():
            g *= max_norm / (norm + 1e-6)
    return norm


def evaluate(model: SHViT, split: digits.Arrays, batch: int = 250) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in inference mode: a folded copy, running statistics."""
    folded = copy.deepcopy(model).fuse()
    correct, loss = 0, 0.0
    for i in range(0, len(split.x), batch):
        z = np.asarray(folded(split.x[i:i + batch]), np.float64)
        y = split.y[i:i + batch]
        z -= z.max(1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
        correct += int((z.argmax(1) == y).sum())
        loss -= float(log_p[np.arange(len(y)), y].sum())
    n = max(1, len(split.x))
    return correct / n, loss / n


# ---- the run --------------------------------------------------------------------------------------

def progress(total: int, desc: str, show: bool):
    """A tqdm bar when tqdm is installed and ``show``; else a stand-in that prints nothing."""
    if show:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
        except ImportError:
            pass

    return Quiet()


class Quiet:
    """What ``progress`` gives without a bar: the same calls, doing nothing."""

    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def train(args) -> dict:
    classes = class_names(args.data)
    model, note = build_model(args, len(classes))  # a bad --init-from fails before the data is built
    train_set, test_set, res = load_data(args)
    params = parameters(model)
    n_params = sum(p.size for p in params.values())
    print(f"{PROG}: {len(train_set.x)} train / {len(test_set.x)} test images, {len(classes)} classes, {res}x{res}; "
          f"{n_params:,} parameters; {note}; NumPy only", file=sys.stderr)
    opt = AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    n = len(train_set.x)
    batches = n // args.batch_size + (n % args.batch_size > 1)  # a last batch of 1 cannot train BatchNorm
    total, warmup = batches * args.epochs, int(args.warmup_epochs * batches)
    show = args.progress or (args.progress is None and sys.stderr.isatty())
    history, step, seconds = [], 0, 0.0
    for epoch in range(args.epochs):
        rng = np.random.default_rng([args.seed, epoch])
        order = rng.permutation(n)
        bar = progress(batches, f"epoch {epoch + 1}/{args.epochs}", show)
        sums, t0 = [0.0, 0], time.perf_counter()
        for b in range(batches):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            x, y = shift(train_set.x[idx], rng, args.shift), train_set.y[idx]
            loss, grads = loss_and_grads(model, x, y, args.label_smoothing)
            norm = clip(grads, args.clip_grad)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise TrainingError(f"the {'loss' if not math.isfinite(loss) else 'gradient norm'} became non-finite at epoch "
                                 f"{epoch + 1}, step {b + 1}; try a lower --lr")
            opt.lr = args.lr * lr_factor(step, total, warmup, args.lr, args.min_lr)
            opt.step(grads)
            step += 1
            sums[0] += loss * len(y)
            sums[1] += len(y)
            bar.update()
            bar.set_postfix(loss=f"{sums[0] / sums[1]:.3f}", img_s=f"{sums[1] / (time.perf_counter() - t0):.0f}")
        bar.close()
        dt = time.perf_counter() - t0
        seconds += dt
        test_acc, test_loss = evaluate(model, test_set)
        history.append({"epoch": epoch + 1, "train_loss": sums[0] / max(1, sums[1]), "test_loss": test_loss,
                        "test_acc": test_acc, "images_per_s": sums[1] / dt, "seconds": dt})
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {history[-1]['train_loss']:.4f}, test acc {test_acc:.4f}, "
              f"{history[-1]['images_per_s']:.0f} images/s", file=sys.stderr)
    test_acc, test_loss = history[-1]["test_acc"], history[-1]["test_loss"]
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "epochs": args.epochs, "resolution": res, "classes": classes,
               "train_images": n, "test_images": len(test_set.x), "train_seconds": seconds,
               "images_per_s": n * args.epochs / max(seconds, 1e-9), "parameters": n_params,
               "config": json.loads(model.config.to_json()), "data": args.data, "seed": args.seed, "history": history,
               "runtime": "numpy"}
    args.out.mkdir(parents=True, exist_ok=True)
    save_weights(args.out / "model.safetensors", model.config, model.state_dict(), classes, res)
    with atomic_path(args.out / "metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"{PROG}: test accuracy {test_acc:.4f}; wrote model.safetensors and metrics.json in {args.out}", file=sys.stderr)
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_training(PROG, lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
