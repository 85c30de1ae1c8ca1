"""``python -m shvit_torch.train``: train SHViT on real data, in one process or many (torchrun).

    python -m shvit_torch.train --out runs/digits                       # digits, small SHViT, CPU
    torchrun --nproc_per_node 2 -m shvit_torch.train --out runs/ddp     # the same, DistributedDataParallel
    python -m shvit_torch.train --data PATH --variant s1 --init-from shvit_s1.pth --out runs/ft

The recipe is the paper's in miniature: AdamW, linear warm-up then cosine decay, weight decay,
label smoothing, optional mixup/cutmix, model EMA, gradient clipping, optional hard
distillation from a teacher into the distillation head. ``--out`` receives model.safetensors
(canonical; loads in all three runtimes), checkpoint.pt (full state, written atomically every
epoch: ``--resume`` continues from it), metrics.json, metrics.jsonl and curves.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shvit_numpy.cli import Parser
from shvit_numpy.config import SHViTConfig, default_resolution, get_config
from shvit_numpy.errors import ShvitError
from shvit_numpy.weights import atomic_path

from . import data as datasets
from .checkpoint import read_checkpoint
from .model import SHViT, create, save

PROG = "python -m shvit_torch.train"
# A small SHViT for 64x64 digits: 334k parameters, attention over 4x4 then 1x1 tokens.
DIGITS_CONFIG = SHViTConfig(embed_dim=(32, 64, 96), partial_dim=(8, 16, 24), depth=(1, 2, 2), num_classes=10)


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss): one line, the last good checkpoint kept."""


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' (built in) or a folder with train/<class>/ and val/<class>/")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--variant", help="s1..s4 (default: a small SHViT suited to digits)")
    p.add_argument("--resolution", type=int, help="image size (default: 64 for digits, else the variant's)")
    p.add_argument("--init-from", type=Path, metavar="FILE", help="fine-tune from any weight file shvit_torch.load accepts")
    p.add_argument("--teacher", type=Path, metavar="FILE", help="hard distillation from this model into the distillation head")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-epochs", type=float, default=2)
    p.add_argument("--weight-decay", type=float, default=0.025)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.0, help="Beta(a, a) mixup; 0 = off")
    p.add_argument("--cutmix", type=float, default=0.0, help="Beta(a, a) cutmix; 0 = off")
    p.add_argument("--no-augment", action="store_true", help="no random affine warps")
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY", help="model EMA decay per step, e.g. 0.999; 0 = off")
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm; 0 = off")
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (helps on GPUs and recent CPUs)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ---- distributed ---------------------------------------------------------------------------------

def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); torchrun sets WORLD_SIZE. gloo on CPU, nccl on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def all_sum(values: list[float], device) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ---- model, optimiser, schedule ------------------------------------------------------------------

def build_model(args, num_classes: int) -> tuple[SHViT, int, str]:
    """The model to train, its resolution, and a note on how it was initialised."""
    distill = args.teacher is not None
    if args.init_from is not None:
        w = read_checkpoint(args.init_from)
        cfg = w.config.replace(num_classes=num_classes, distillation=distill)
        model = create(cfg, drop_path_rate=args.drop_path)
        own = model.state_dict()
        take = {k: torch.from_numpy(v) for k, v in w.state.items() if k in own and tuple(own[k].shape) == v.shape}
        model.load_state_dict(take, strict=False)
        note = f"initialised {len(take)}/{len(w.state)} tensors from {args.init_from}"
        res = args.resolution or w.resolution or default_resolution(cfg)
    else:
        cfg = get_config(args.variant, num_classes=num_classes, distillation=distill) if args.variant else \
            DIGITS_CONFIG.replace(num_classes=num_classes, distillation=distill)
        model = create(cfg, drop_path_rate=args.drop_path)
        note = "random initialisation"
        res = args.resolution or (datasets.DIGITS_RES if not args.variant else default_resolution(cfg))
    return model, res, note


def lr_lambda(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    """Linear warm-up from ~0, then cosine decay to ``floor``: a factor on the base rate."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return (floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * t))) / base


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on BatchNorm/GroupNorm parameters and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, split: datasets.Split, device, batch: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over a split, in eval mode."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(split.x), batch):
        x, y = split.x[i:i + batch].to(device), split.y[i:i + batch].to(device)
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    return correct / len(split.x), loss / len(split.x)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep, [h["train_loss"] for h in history], label="train")
    a.plot(ep, [h["test_loss"] for h in history], label="test")
    a.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    b.plot(ep, [h["train_acc"] for h in history], label="train")
    b.plot(ep, [h["test_acc"] for h in history], label="test")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.01))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2) + "\n")


# ---- the run ---------------------------------------------------------------------------------------

def train(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = setup_distributed(device)
    main_process = rank == 0
    torch.manual_seed(args.seed)
    classes = datasets.class_names(args.data)  # checks the folder layout before anything is loaded
    model, res, note = build_model(args, len(classes))
    ds = datasets.load(args.data, res)  # images preprocessed at the model's resolution
    model.to(device)
    teacher = None
    if args.teacher is not None:
        from .model import from_weights

        teacher = from_weights(read_checkpoint(args.teacher)).fuse().to(device).eval()
        if teacher.config.num_classes != len(ds.classes):
            raise ShvitError(f"--teacher has {teacher.config.num_classes} classes, the data has {len(ds.classes)}")

    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    steps_per_epoch = math.ceil(len(ds.train.x) / world / args.batch_size)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total, int(args.warmup_epochs * steps_per_epoch), args.lr, args.min_lr))
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema),
                                              use_buffers=True) if args.ema else None
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    start_epoch, history = 0, []
    ckpt_path = args.out / "checkpoint.pt"
    if args.resume:
        if not ckpt_path.is_file():
            raise ShvitError(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema") is not None:
            ema.load_state_dict(ck["ema"])
        gen.set_state(ck["generator"][rank] if rank < len(ck["generator"]) else ck["generator"][0])
        torch.set_rng_state(ck["torch_rng"])
        start_epoch, history = ck["epoch"], ck["history"]
        note += f"; resumed after epoch {start_epoch}"
    if main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        print(f"{PROG}: {len(ds.train.x)} train / {len(ds.test.x)} test images of {len(ds.classes)} classes at {res}x{res}; "
              f"{sum(p.numel() for p in model.parameters()):,} parameters; {note}; {world} process(es) on {device}", file=sys.stderr)

    from tqdm import tqdm

    kill_after = int(os.environ.get("SHVIT_TEST_KILL_AFTER_STEPS", "0"))  # test hook: simulate a kill mid-epoch
    steps_done, t_start = 0, time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        ddp.train()
        perm = torch.randperm(len(ds.train.x), generator=gen if world == 1 else torch.Generator().manual_seed(args.seed + epoch))
        shard = perm[rank::world]
        sums = [0.0, 0.0, 0.0]  # loss * n, correct, n
        t0 = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not main_process or args.no_progress,
                   file=sys.stderr, leave=False)
        for step in bar:
            idx = shard[step * args.batch_size:(step + 1) * args.batch_size]
            if len(idx) == 0:
                continue
            x, y = ds.train.x[idx], ds.train.y[idx]
            if not args.no_augment:
                x = datasets.augment(x, gen)
            x, target = datasets.mix(x, y, len(ds.classes), args.mixup, args.cutmix, gen)
            x, y, target = x.to(device), y.to(device), target.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                out = ddp(x)
                if teacher is not None:  # hard distillation: the second head learns the teacher's argmax
                    with torch.no_grad():
                        t_label = teacher(x).argmax(1)
                    logits = out[0]
                    loss = 0.5 * F.cross_entropy(out[0], target, label_smoothing=args.label_smoothing) + \
                        0.5 * F.cross_entropy(out[1], t_label)
                else:
                    logits = out
                    loss = F.cross_entropy(logits, target, label_smoothing=args.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopped. "
                                    f"The last good checkpoint is {ckpt_path if ckpt_path.exists() else 'not written yet'}; "
                                    f"try a lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            n = len(y)
            sums[0] += float(loss.detach()) * n
            sums[1] += float((logits.argmax(1) == y).sum())
            sums[2] += n
            steps_done += 1
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{sums[1] / sums[2]:.3f}",
                            img_s=f"{sums[2] * world / (time.perf_counter() - t0):.0f}")
            if kill_after and steps_done >= kill_after:
                os._exit(137)  # what a SIGKILL leaves behind: no cleanup, no final writes
        loss_sum, correct, n = all_sum(sums, device)
        eval_model = ema.module if ema is not None else model
        test_acc, test_loss = evaluate(eval_model, ds.test, device)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / n, "train_acc": correct / n, "test_loss": test_loss,
                  "test_acc": test_acc, "lr": opt.param_groups[0]["lr"], "images_per_s": n / (time.perf_counter() - t0)}
        history.append(record)
        if main_process:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {record['train_loss']:.4f}, train acc {record['train_acc']:.4f}, "
                  f"test acc {test_acc:.4f}, {record['images_per_s']:.0f} img/s", file=sys.stderr)
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                     "ema": ema.state_dict() if ema is not None else None, "epoch": epoch + 1, "history": history,
                     "generator": [gen.get_state()], "torch_rng": torch.get_rng_state(), "config": model.config.to_json()}
            with atomic_path(ckpt_path) as tmp:
                torch.save(state, tmp)
            with atomic_path(args.out / "metrics.jsonl") as tmp:
                Path(tmp).write_text("".join(json.dumps(h) + "\n" for h in history))

    final = ema.module if ema is not None else model
    final = final.module if hasattr(final, "module") else final
    test_acc, test_loss = evaluate(final, ds.test, device)
    metrics = {"test_acc": test_acc, "test_loss": test_loss, "train_acc": history[-1]["train_acc"] if history else None,
               "epochs": args.epochs, "resolution": res, "classes": ds.classes, "world_size": world,
               "train_seconds": time.perf_counter() - t_start, "config": json.loads(model.config.to_json()),
               "data": args.data, "ema": bool(args.ema)}
    if main_process:
        final.cpu()
        save(final, args.out / "model.safetensors", labels=ds.classes, resolution=res)
        write_json(args.out / "metrics.json", metrics)
        plot_curves(history, args.out / "curves.png")
        print(f"{PROG}: test accuracy {test_acc:.4f}; wrote {args.out}/model.safetensors, metrics.json, curves.png", file=sys.stderr)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    try:
        train(args)
    except ShvitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; --resume continues from the last complete epoch", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
