"""``python -m shvit_torch.train``: train SHViT on real data, in one process or many (torchrun).

    python -m shvit_torch.train --out runs/digits                       # digits, small SHViT, CPU
    torchrun --nproc_per_node 2 -m shvit_torch.train --out runs/ddp     # the same, DistributedDataParallel
    python -m shvit_torch.train --data PATH --variant s1 --out runs/s1  # an ImageFolder tree
    python -m shvit_torch.train --data PATH --init-from shvit_s1.pth --resolution 128 --out runs/ft

The recipe is the paper's in miniature: AdamW, linear warm-up then cosine decay, weight decay
(not on norms and biases), label smoothing, random affine warps (plus flips for natural
images), optional mixup/cutmix, model EMA, gradient clipping, bf16 autocast, optional hard
distillation from a teacher into the distillation head (DeiT's recipe, which SHViT follows).

``--out`` receives model.safetensors (canonical; loads in all three runtimes), checkpoint.pt
(the full training state, replaced atomically after every epoch: ``--resume`` continues from
it), metrics.json (final figures), metrics.jsonl (one line per epoch) and curves.png.

Randomness is re-seeded at every epoch from (--seed, epoch, rank), so a resumed run repeats
exactly what the uninterrupted run would have done.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from shvit_numpy.cli import Parser, run_training
from shvit_numpy.config import VARIANTS, default_resolution, get_config
from shvit_numpy.digits import DEMO_CONFIG
from shvit_numpy.errors import ShvitError, TrainingError
from shvit_numpy.optim import lr_factor
from shvit_numpy.weights import atomic_path

from . import data as datasets
from .checkpoint import read_checkpoint
from .model import SHViT, create, from_weights, save
from .run import pick_device

PROG = "python -m shvit_torch.train"
# The demo's small SHViT (shvit_numpy.digits.DEMO_CONFIG), with the digits' 10 classes: 334k parameters.
DIGITS_CONFIG = DEMO_CONFIG.replace(num_classes=10)
# Test hook: exit like SIGKILL (status 137, no cleanup) after this many optimisation steps in all.
KILL_ENV = "SHVIT_TEST_KILL_AFTER_STEPS"


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's, built in), 'canvas' (the largest of three of them on a 128x128 image) "
                        "or a folder with train/<class>/ and val/<class>/")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--variant", choices=sorted(VARIANTS), help="s1..s4 (default: a small SHViT suited to small images)")
    p.add_argument("--resolution", type=int,
                   help="image size (default: 64 for digits, 128 for canvas, else the init file's or the variant's)")
    p.add_argument("--init-from", type=Path, metavar="FILE",
                   help="fine-tune from any weight file shvit_torch.load accepts (a new head when the class count differs)")
    p.add_argument("--teacher", type=Path, metavar="FILE", help="hard distillation from this model into the distillation head")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine")
    p.add_argument("--warmup-epochs", type=float, default=2)
    p.add_argument("--weight-decay", type=float, default=0.025)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                   help="random rotation, shift and zoom (default: on)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for folders, off for digits and canvas)")
    p.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="Beta(a, a) mixup; 0 = off")
    p.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="Beta(a, a) cutmix; 0 = off")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help="model EMA decay per step, e.g. 0.999; 0 = off")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm; 0 = off")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on for CUDA, off on CPU)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available; under torchrun, cuda:LOCAL_RANK)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per process (default: OMP_NUM_THREADS, else the cores divided among the processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, metavar="N", help="use only the first N train and N test images (quick runs)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm progress bar (default: when stderr is a terminal)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "limit", "resolution", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.variant and args.init_from:
        p.error("--variant and --init-from exclude each other (the file fixes the architecture)")
    if args.lr <= 0 or args.min_lr < 0:
        p.error(f"--lr must be > 0 and --min-lr >= 0, got {args.lr} and {args.min_lr}")
    if not 0 <= args.ema < 1:
        p.error(f"--ema must be in [0, 1), got {args.ema}")
    return args


# ---- distributed ---------------------------------------------------------------------------------

def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size). torchrun sets WORLD_SIZE and the rendezvous; gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def sync_buffers(model: torch.nn.Module) -> None:
    """Every process takes rank 0's BatchNorm statistics (each process updated its own from its shard)."""
    if dist.is_initialized():
        for b in model.buffers():
            dist.broadcast(b, 0)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over all processes (identity in one process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def reseed(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Fresh randomness for one epoch of one process: the global RNG (drop path, mixup's Beta)
    and the generator for augmentation. A resumed epoch draws exactly the same numbers."""
    s = seed * 1_000_003 + epoch * 1_009 + rank
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


# ---- model, optimiser, schedule ------------------------------------------------------------------

def init_from(path: Path, num_classes: int, distill: bool, drop_path: float) -> tuple[SHViT, int | None, str]:
    """A model holding every tensor of ``path`` (any accepted format) whose name and shape fit; the
    classifier stays freshly initialised when the class count differs."""
    w = read_checkpoint(path)
    model = create(w.config.replace(num_classes=num_classes, distillation=distill), drop_path_rate=drop_path)
    own = model.state_dict()
    take = {k: torch.from_numpy(v) for k, v in w.state.items() if k in own and tuple(own[k].shape) == v.shape}
    model.load_state_dict(take, strict=False)
    skipped = [k for k in w.state if k not in take and not k.startswith(("head.", "head_dist."))]
    if skipped:  # read_checkpoint checked the file against its own config: a guard against drift
        raise ShvitError(f"--init-from {path}: tensor {skipped[0]!r} does not fit the model")
    note = f"initialised {len(take)}/{len(w.state)} tensors from {path}"
    if w.config.num_classes != num_classes:
        note += f" (a new {num_classes}-class head; the file has {w.config.num_classes} classes)"
    return model, w.resolution, note


def build_model(args, num_classes: int) -> tuple[SHViT, int, str]:
    """The model to train, its input resolution, and a note on how it was initialised."""
    distill = args.teacher is not None
    if args.init_from is not None:
        model, file_res, note = init_from(args.init_from, num_classes, distill, args.drop_path)
        res = args.resolution or file_res or default_resolution(model.config)
        return model, res, note
    base = get_config(args.variant) if args.variant else DIGITS_CONFIG
    model = create(base.replace(num_classes=num_classes, distillation=distill), drop_path_rate=args.drop_path)
    default = default_resolution(model.config) if args.variant else datasets.CANVAS_RES if args.data == "canvas" else datasets.DIGITS_RES
    return model, args.resolution or default, "random initialisation"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on kernels and linear weights only, not on norm parameters and biases."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_teacher(path: Path, num_classes: int, device: torch.device) -> SHViT:
    teacher = from_weights(read_checkpoint(path)).fuse().to(device).eval()
    if teacher.config.num_classes != num_classes:
        raise ShvitError(f"--teacher {path} has {teacher.config.num_classes} classes, the data has {num_classes}")
    return teacher


# ---- one step ------------------------------------------------------------------------------------

@dataclass
class Step:
    """What one optimisation step needs besides the batch."""

    net: torch.nn.Module  # the model, or its DDP wrapper
    model: SHViT
    opt: torch.optim.Optimizer
    device: torch.device
    bf16: bool = False
    label_smoothing: float = 0.0
    clip_grad: float = 0.0
    teacher: SHViT | None = None


def compute_loss(s: Step, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, class logits) for a batch with soft targets (B, classes). With a teacher, DeiT's hard
    distillation: half the loss on the class head, half on the distillation head against the
    teacher's predicted labels."""
    with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.bf16):
        out = s.net(x)
        if s.teacher is None:
            return F.cross_entropy(out, target, label_smoothing=s.label_smoothing), out
        with torch.no_grad():
            teacher_labels = s.teacher(x).argmax(1)  # (B,)
        logits, logits_dist = out
        loss = 0.5 * F.cross_entropy(logits, target, label_smoothing=s.label_smoothing) + 0.5 * F.cross_entropy(logits_dist, teacher_labels)
        return loss, logits


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true in any process (all processes must stop together under DDP)."""
    return all_sum([float(flag)], device)[0] > 0 if dist.is_initialized() else flag


def train_step(s: Step, x: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Forward, loss, backward, clip, AdamW step. Raises ``TrainingError`` on a non-finite loss or
    gradient norm, before the weights are touched. Returns (loss, class logits)."""
    loss, logits = compute_loss(s, x, target)
    bad = not bool(torch.isfinite(loss))
    if any_rank(bad, s.device):
        raise TrainingError(f"the loss became {loss.item()}" if bad else "another process's loss became non-finite")
    s.opt.zero_grad(set_to_none=True)
    loss.backward()
    if s.clip_grad:
        norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), s.clip_grad)
        if any_rank(not bool(torch.isfinite(norm)), s.device):
            raise TrainingError(f"the gradient norm became {norm.item()}")
    s.opt.step()
    return float(loss.detach()), logits.detach()


# ---- evaluation and output -----------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: SHViT, split: datasets.Split, device: torch.device, rank: int = 0, world: int = 1,
             batch: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over a split in eval mode; each process takes every world-th
    image and the sums are reduced."""
    was_training = model.training
    sync_buffers(model)
    model.eval()
    x_all, y_all = split.x[rank::world], split.y[rank::world]
    correct, loss = 0.0, 0.0
    for i in range(0, len(x_all), batch):
        x, y = x_all[i:i + batch].to(device), y_all[i:i + batch].to(device)
        logits = model(x).float()
        correct += float((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    correct, loss, n = all_sum([correct, loss, float(len(x_all))], device)
    return correct / n, loss / n


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train and test, as a PNG (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((a, "loss", "loss (cross-entropy)"), (b, "acc", "accuracy")):
        ax.plot(ep, [h[f"train_{key}"] for h in history], "o-", ms=3, label="train (augmented, label smoothing)")
        ax.plot(ep, [h[f"test_{key}"] for h in history], "o-", ms=3, label="test")
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if key == "loss" else "lower right")
    b.set_ylim(0, 1.01)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2) + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_training_state(path: Path, model: SHViT) -> dict:
    """The dict ``save_checkpoint`` wrote, checked to belong to this model."""
    if not path.is_file():
        raise ShvitError(f"--resume: no checkpoint at {path} (run without --resume first)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any unreadable file is the same user error
        raise ShvitError(f"--resume: {path} is not a readable training checkpoint (truncated, or not written by {PROG})") from None
    if not isinstance(ck, dict) or "epoch" not in ck:
        raise ShvitError(f"--resume: {path} is not a checkpoint written by {PROG}")
    if ck.get("config") != model.config.to_json():
        raise ShvitError(f"--resume: {path} holds another model configuration than these options give; "
                         f"resume with the first run's --variant/--init-from/--teacher")
    return ck


def kill_after() -> int:
    """The test hook ``SHVIT_TEST_KILL_AFTER_STEPS=N`` (0: off)."""
    value = os.environ.get(KILL_ENV, "0")
    if not value.isdigit():
        raise ShvitError(f"{KILL_ENV}={value!r}: expected a step count")
    return int(value)


# ---- the run ---------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything one training process holds."""

    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    ds: datasets.Dataset
    model: SHViT
    sampler: DistributedSampler
    batches: int  # per epoch and process
    step: Step
    sched: torch.optim.lr_scheduler.LRScheduler
    ema: torch.optim.swa_utils.AveragedModel | None
    flip: bool
    history: list[dict]
    start_epoch: int = 0

    @property
    def main_process(self) -> bool:
        return self.rank == 0

    @property
    def eval_model(self) -> SHViT:
        return self.ema.module if self.ema is not None else self.model

    @property
    def checkpoint_path(self) -> Path:
        return self.args.out / "checkpoint.pt"


def build_run(args) -> tuple[Run, str]:
    """Data, model, optimiser, schedule and EMA, resumed from the checkpoint with ``--resume``;
    and a note on how the model was initialised."""
    device = pick_device(args.device)
    rank, world = setup_distributed(device)
    classes = datasets.class_names(args.data)  # checks the folder layout before anything slow
    torch.manual_seed(args.seed)  # the same initial weights in every process
    model, res, note = build_model(args, len(classes))
    ds = datasets.load(args.data, res, limit=args.limit)  # preprocessed as the runtimes' CLIs do
    model.to(device)
    teacher = load_teacher(args.teacher, len(classes), device) if args.teacher else None
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    sampler = DistributedSampler(range(len(ds.train.x)), num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    batches = len(sampler) // args.batch_size + (len(sampler) % args.batch_size > 1)  # a batch of 1 cannot train BatchNorm
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    total, warmup = batches * args.epochs, int(args.warmup_epochs * batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, total, warmup, args.lr, args.min_lr))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema),
                                              use_buffers=True) if args.ema else None
    run = Run(args, device, rank, world, ds, model, sampler, batches,
              Step(net, model, opt, device, bf16, args.label_smoothing, args.clip_grad, teacher), sched, ema,
              args.data not in ("digits", "canvas") if args.flip is None else args.flip, history=[])
    if args.resume:
        ck = read_training_state(run.checkpoint_path, model)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        run.start_epoch, run.history = ck["epoch"], ck["history"]
        note += f"; resumed after epoch {run.start_epoch}"
    return run, note


def run_epoch(r: Run, epoch: int, kill_step: int = 0) -> dict:
    """One pass over this process's share of the training set, then the (reduced) test metrics."""
    from tqdm import tqdm

    args = r.args
    gen = reseed(args.seed, epoch, r.rank)
    r.sampler.set_epoch(epoch)
    order = torch.tensor(list(r.sampler))
    r.step.net.train()
    sums = [0.0, 0.0, 0.0]  # loss * n, correct, n (this process)
    t0 = time.perf_counter()
    show = r.main_process and (args.progress or (args.progress is None and sys.stderr.isatty()))
    bar = tqdm(range(r.batches), desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, file=sys.stderr, disable=not show)
    for b in bar:
        idx = order[b * args.batch_size:(b + 1) * args.batch_size]
        x, y = r.ds.train.x[idx], r.ds.train.y[idx]
        if args.augment:
            x = datasets.augment(x, gen, flip=r.flip)
        x, target = datasets.mix(x, y, len(r.ds.classes), args.mixup, args.cutmix, gen)
        x, y, target = x.to(r.device), y.to(r.device), target.to(r.device)
        try:
            loss, logits = train_step(r.step, x, target)
        except TrainingError as e:
            kept = f"the last good checkpoint ({r.checkpoint_path}, epoch {epoch}) is kept" if epoch else "no checkpoint was written yet"
            raise TrainingError(f"{e} at epoch {epoch + 1}, step {b + 1}; stopped, {kept}; try a lower --lr") from None
        r.sched.step()
        if r.ema is not None:
            r.ema.update_parameters(r.model)
        sums[0] += loss * len(y)
        sums[1] += float((logits.argmax(1) == y).sum())
        sums[2] += len(y)
        bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}",
                        img_s=f"{sums[2] * r.world / (time.perf_counter() - t0):.0f}")
        if kill_step and epoch * r.batches + b + 1 == kill_step:
            os._exit(137)  # what SIGKILL leaves behind: no cleanup, no final writes
    bar.close()
    loss_sum, correct, n = all_sum(sums, r.device)
    seconds = time.perf_counter() - t0
    test_acc, test_loss = evaluate(r.eval_model, r.ds.test, r.device, r.rank, r.world)
    return {"epoch": epoch + 1, "train_loss": loss_sum / n, "train_acc": correct / n, "test_loss": test_loss,
            "test_acc": test_acc, "lr": r.step.opt.param_groups[0]["lr"], "train_images": int(n),
            "images_per_s": n / seconds, "seconds": seconds}


def save_epoch(r: Run) -> None:
    """checkpoint.pt and metrics.jsonl, each replaced atomically (first process only)."""
    h = r.history[-1]
    print(f"epoch {h['epoch']}/{r.args.epochs}: train loss {h['train_loss']:.4f}, train acc {h['train_acc']:.4f}, "
          f"test acc {h['test_acc']:.4f}, {h['images_per_s']:.0f} images/s", file=sys.stderr)
    save_checkpoint(r.checkpoint_path, {
        "model": r.model.state_dict(), "optimizer": r.step.opt.state_dict(), "scheduler": r.sched.state_dict(),
        "ema": r.ema.state_dict() if r.ema is not None else None, "epoch": h["epoch"], "history": r.history,
        "config": r.model.config.to_json(), "args": {k: str(v) for k, v in vars(r.args).items()}})
    with atomic_path(r.args.out / "metrics.jsonl") as tmp:
        Path(tmp).write_text("".join(json.dumps(h) + "\n" for h in r.history))


def finish(r: Run) -> dict:
    """Final test metrics; the first process writes model.safetensors, metrics.json, curves.png."""
    final = r.eval_model
    test_acc, test_loss = evaluate(final, r.ds.test, r.device, r.rank, r.world)
    seconds = sum(h["seconds"] for h in r.history)
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "train_acc": r.history[-1]["train_acc"] if r.history else None,
               "epochs": r.args.epochs, "resolution": r.ds.resolution, "classes": r.ds.classes,
               "train_images": len(r.ds.train.x), "test_images": len(r.ds.test.x), "world_size": r.world,
               "device": str(r.device), "bf16": r.step.bf16, "train_seconds": seconds,
               "images_per_s": sum(h["train_images"] for h in r.history) / max(seconds, 1e-9),
               "parameters": sum(p.numel() for p in r.model.parameters()), "config": json.loads(r.model.config.to_json()),
               "data": r.args.data, "ema": r.args.ema, "seed": r.args.seed}
    if r.main_process:
        out = r.args.out
        save(final.cpu(), out / "model.safetensors", labels=r.ds.classes, resolution=r.ds.resolution)
        write_json(out / "metrics.json", metrics)
        if r.history:
            plot_curves(r.history, out / "curves.png")
        print(f"{PROG}: test accuracy {test_acc:.4f}; wrote model.safetensors, checkpoint.pt, metrics.json(l), "
              f"curves.png in {out}", file=sys.stderr)
    return metrics


def train(args) -> dict:
    """The whole run; returns the final metrics (the same in every process)."""
    kill_step = kill_after()
    r, note = build_run(args)
    if r.main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        res = r.ds.resolution
        print(f"{PROG}: {len(r.ds.train.x)} train / {len(r.ds.test.x)} test images, {len(r.ds.classes)} classes, {res}x{res}; "
              f"{sum(p.numel() for p in r.model.parameters()):,} parameters; {note}; "
              f"{r.world} process{'es' if r.world > 1 else ''} on {r.device}{', bf16' if r.step.bf16 else ''}", file=sys.stderr)
    for epoch in range(r.start_epoch, args.epochs):
        r.history.append(run_epoch(r, epoch, kill_step))
        if r.main_process:
            save_epoch(r)
    return finish(r)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    try:
        code = run_training(PROG, lambda: train(args), "interrupted; --resume continues from the last complete epoch")
        if code == 0 and dist.is_initialized():  # every rank done before any closes its connections: gloo aborted
            dist.barrier()  # a rank still closing when the other had gone ("terminate called without an active exception")
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
