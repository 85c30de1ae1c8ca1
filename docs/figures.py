"""``python -m docs.figures`` (``make figures``): every PNG the walkthroughs show, drawn from the code.

    docs/architecture.png   SHViT-S1 at 224: stem, stages, block internals, shapes (from shvit_numpy.profile)
    docs/macs-memory.png    MACs and activation memory per stage for s1-s4, and the macro-design comparison
    docs/attention.png      single-head attention on a real photo (scikit-learn's china.jpg): a head with
                            hand-set weights, and the first attention layer of S1 (random weights, or --weights)
    docs/throughput.png     the three runtimes side by side, from `make bench`'s JSON (benchmarks/results/latest.json,
                            else runs/bench/quick.json); skipped when there is none

Nothing here is trained: the attention maps are from hand-set or random weights unless ``--weights``
names a trained file, and the titles say which. Takes well under a minute on a laptop.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch  # noqa: E402

from shvit_numpy import profile  # noqa: E402
from shvit_numpy.config import RESOLUTION, VARIANTS, get_config  # noqa: E402
from shvit_numpy.weights import atomic_path  # noqa: E402

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
RESULTS = ROOT / "benchmarks" / "results"
COLORS = {"io": "#eeeeee", "conv": "#cfe2f3", "attn": "#f4cccc", "down": "#fff2cc", "head": "#d9ead3"}


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


# -- architecture ---------------------------------------------------------------------------------------------

def stage_shapes(cfg, res: int) -> dict[str, tuple[int, int, int]]:
    """Output (C, H, W) of the stem and of each stage, read off the profiler's layer list."""
    rows = profile.count(cfg, res)
    out = {"stem": next(r.shape for r in rows if r.name == f"patch_embed.{2 * (len(cfg.stem_dims) - 1)}")}
    for s in range(3):
        out[f"stage{s + 1}"] = [r.shape for r in rows if r.stage == f"stage{s + 1}"][-1]
    return out


def box(ax, x, y, w, h, text, color, fontsize=8.5, weight="normal"):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.004,rounding_size=0.012",
                                fc=color, ec="#555555", lw=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, weight=weight)


def arrow(ax, a, b):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, color="#444444", lw=0.9, shrinkA=1, shrinkB=1))


def chain(ax, x, y_top, y_step, w, h, items, fontsize=7.8):
    """A vertical chain of boxes (text, color key), arrows between them; returns the boxes' y."""
    ys = [y_top - i * y_step for i in range(len(items))]
    for y, (text, color) in zip(ys, items):
        box(ax, x, y, w, h, text, COLORS[color], fontsize=fontsize)
    for y0, y1 in zip(ys, ys[1:]):
        arrow(ax, (x, y0 - h / 2 - 0.004), (x, y1 + h / 2 + 0.004))
    return ys


def architecture(path: Path, variant: str = "s1") -> None:
    cfg, res = get_config(variant), RESOLUTION[variant]
    shp = stage_shapes(cfg, res)
    rows = profile.count(cfg, res)
    fig = plt.figure(figsize=(15, 8.2))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set(xlim=(0, 1.5), ylim=(0, 0.82))
    ax.axis("off")
    ax.text(0.75, 0.79, f"SHViT-{variant.upper()} at {res}×{res}: {sum(r.macs for r in rows) / 1e6:.0f}M MACs, "
            f"{sum(r.params for r in rows) / 1e6:.2f}M parameters", ha="center", fontsize=12, weight="bold")
    # the macro chain, left to right, each box's output shape under it
    sd, c, pd = cfg.stem_dims, cfg.embed_dim, cfg.partial_dim
    items = [
        (f"image\n{cfg.in_chans}×{res}×{res}", "io", None),
        (f"stem: patchify,\nstride 16\n4 × ConvBN 3×3, s2\n{sd[0]}→{sd[1]}→{sd[2]}→{sd[3]} ch", "conv", shp["stem"]),
        (f"stage 1\n{cfg.depth[0]} × '{cfg.types[0]}' block\nDW 3×3 + FFN\n(no attention)", "conv", shp["stage1"]),
        ("downsample\nDW, FFN,\nPatchMerging+SE,\nDW, FFN", "down", shp["stage2"]),
        (f"stage 2\n{cfg.depth[1]} × '{cfg.types[1]}' block\nDW + SHSA + FFN\nattention on\n{pd[1]} of {c[1]} ch", "attn", shp["stage2"]),
        ("downsample\nDW, FFN,\nPatchMerging+SE,\nDW, FFN", "down", shp["stage3"]),
        (f"stage 3\n{cfg.depth[2]} × '{cfg.types[2]}' block\nDW + SHSA + FFN\nattention on\n{pd[2]} of {c[2]} ch", "attn", shp["stage3"]),
        (f"head\nglobal avg pool\nBN + Linear\n→ {cfg.num_classes} logits", "head", None),
    ]
    xs = np.linspace(0.085, 1.415, len(items))
    w, h, y = 0.14, 0.13, 0.66
    for x, (text, color, shape) in zip(xs, items):
        box(ax, x, y, w, h, text, COLORS[color])
        if shape is not None:
            ch, hh, ww = shape
            ax.text(x, y - h / 2 - 0.012, f"{ch}×{hh}×{ww}\n{hh * ww} tokens", ha="center", va="top", fontsize=8, color="#333333")
    for x0, x1 in zip(xs, xs[1:]):
        arrow(ax, (x0 + w / 2 + 0.004, y), (x1 - w / 2 - 0.004, y))
    ax.text(0.75, 0.53, f"stride 16 from the first layer: {shp['stem'][1] * shp['stem'][2]} tokens at {res} "
            f"(a 4×4 stem would give {(res // 4) ** 2:,}); three stages, not four; attention only where tokens are few",
            ha="center", fontsize=9, style="italic", color="#333333")
    # the blocks
    ax.text(0.085, 0.475, "'i' block", ha="center", fontsize=10, weight="bold")
    chain(ax, 0.085, 0.43, 0.075, 0.14, 0.05, [("x  (C×H×W)", "io"), ("x + DW 3×3 (x)", "conv"), ("x + FFN(x)", "conv")])
    ax.text(0.26, 0.475, "'s' block", ha="center", fontsize=10, weight="bold")
    chain(ax, 0.26, 0.43, 0.075, 0.14, 0.05, [("x  (C×H×W)", "io"), ("x + DW 3×3 (x)", "conv"), ("x + SHSA(x)", "attn"),
                                               ("x + FFN(x)", "conv")])
    ax.text(0.17, 0.13, "DW 3×3: depthwise ConvBN (local mixing)\nFFN: 1×1 C→2C, ReLU, 1×1 2C→C",
            ha="center", va="top", fontsize=8, color="#333333")
    ax.text(0.64, 0.475, "SHSA: single-head self-attention on partial channels", ha="center", fontsize=10, weight="bold")
    ys = chain(ax, 0.55, 0.43, 0.068, 0.2, 0.046, [
        ("x1 = the first pdim channels", "io"),
        ("GroupNorm (one group)", "attn"),
        (f"1×1 ConvBN: pdim → {2 * cfg.qk_dim[1]} + pdim", "attn"),
        (f"q, k: {cfg.qk_dim[1]} × N      v: pdim × N", "attn"),
        (f"attn = softmax(qᵀk / √{cfg.qk_dim[1]}): N × N\nx1 = v · attnᵀ", "attn"),
    ])
    box(ax, 0.77, ys[0], 0.17, 0.046, "x2 = the other C − pdim\nchannels, untouched", COLORS["io"], fontsize=7.8)
    merge = ys[-1] - 0.085
    box(ax, 0.66, merge, 0.3, 0.046, "ReLU(concat[x1, x2]), then 1×1 ConvBN C → C", COLORS["attn"], fontsize=7.8)
    arrow(ax, (0.55, ys[-1] - 0.027), (0.58, merge + 0.027))
    arrow(ax, (0.77, ys[0] - 0.027), (0.74, merge + 0.027))
    ax.text(0.66, merge - 0.035, f"stage 2 of {variant.upper()}: N = {shp['stage2'][1] * shp['stage2'][2]} tokens, "
            f"pdim = {pd[1]} of C = {c[1]}", ha="center", va="top", fontsize=8, color="#333333")
    ax.text(1.19, 0.475, "downsample between stages", ha="center", fontsize=10, weight="bold")
    chain(ax, 1.19, 0.43, 0.068, 0.3, 0.046, [
        ("x + DW 3×3 (x),   x + FFN(x)      (C channels)", "conv"),
        ("PatchMerging: 1×1 ConvBN C → 4C, ReLU", "down"),
        ("depthwise ConvBN 3×3, stride 2, ReLU", "down"),
        ("squeeze-excite: x · σ(fc2(ReLU(fc1(mean_hw x))))", "down"),
        ("1×1 ConvBN 4C → C'      (H and W halved)", "down"),
        ("x + DW 3×3 (x),   x + FFN(x)      (C' channels)", "conv"),
    ])
    save(fig, path)


# -- MACs and memory ------------------------------------------------------------------------------------------

def stage_costs(variant: str) -> dict[str, dict[str, float]]:
    """Per part (stem, stage1-3, head): convolution MACs, attention MACs, activation bytes (batch 1)."""
    rows = profile.count(get_config(variant), RESOLUTION[variant])
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        d = out.setdefault(r.stage, {"conv": 0, "attn": 0, "act": 0})
        d["attn" if r.name.endswith(".attn") else "conv"] += r.macs
        d["act"] += r.act_bytes
    return out


def macs_memory(path: Path) -> None:
    variants = sorted(VARIANTS)
    parts = ["stem", "stage1", "stage2", "stage3"]  # the head is < 0.5M MACs and 4 KiB
    costs = {v: stage_costs(v) for v in variants}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    width = 0.8 / len(variants)
    cmap = plt.get_cmap("tab10").colors
    for i, v in enumerate(variants):
        xs = np.arange(len(parts)) + (i - (len(variants) - 1) / 2) * width
        conv = np.array([costs[v][p]["conv"] for p in parts]) / 1e6
        attn = np.array([costs[v][p]["attn"] for p in parts]) / 1e6
        axes[0].bar(xs, conv, width, color=cmap[i], label=f"{v} ({RESOLUTION[v]}²)")
        # attention's own products: under 1% of any bar, so a black top (a line at most), named in the legend
        axes[0].bar(xs, attn, width, bottom=conv, color="black", lw=0)
        act = np.array([costs[v][p]["act"] for p in parts]) / 2**20
        axes[1].bar(xs, act, width, color=cmap[i], label=v)
    share = max(costs[v][p]["attn"] / (costs[v][p]["conv"] + costs[v][p]["attn"]) for v in variants for p in parts)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(Patch(facecolor="black"))
    labels.append(f"black tops: attention (qᵀk, v·attnᵀ),\nat most {100 * share:.1f}% of a bar")
    axes[0].set(xticks=range(len(parts)), xticklabels=parts, ylabel="million multiply-accumulates",
                title="MACs per stage (batch 1)")
    axes[1].set(xticks=range(len(parts)), xticklabels=parts, ylabel="MiB (float32)",
                title="activation memory per stage\n(sum of every layer's output, batch 1)")
    axes[0].legend(handles, labels, fontsize=8)
    axes[1].legend(fontsize=8)
    # the macro-design comparison at 224 and s1's widths
    table = profile.macro_table(224)
    layouts = list(profile.MACRO)
    for j, layout in enumerate(layouts):
        rows = [r for r in table if r["layout"] == layout]
        xs = np.array([r["stage"] for r in rows]) + (j - 0.5) * 0.38
        vals = [r["attention_bytes"] / 2**10 for r in rows]
        bars = axes[2].bar(xs, vals, 0.38, color=["#999999", "#cc4125"][j], label=layout)
        for b, r in zip(bars, rows):
            axes[2].text(b.get_x() + b.get_width() / 2, b.get_height() * 1.15, f"{r['tokens']:,}\ntokens", ha="center", fontsize=7)
    axes[2].set(yscale="log", xticks=[1, 2, 3, 4], xlabel="stage", ylabel="KiB (float32, log scale)",
                title="one N×N attention map per stage at 224\n(a 4×4 stem vs SHViT's 16×16)", ylim=(0.5, 3e5))
    axes[2].legend(fontsize=8, loc="upper right")
    for a in axes:
        a.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, path)


# -- attention on a real photo --------------------------------------------------------------------------------

def sample_photo() -> Path:
    """china.jpg, shipped inside scikit-learn (a pagoda, sky, water and trees)."""
    import sklearn

    return Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"


def photo_tokens(x: np.ndarray, patch: int = 16) -> np.ndarray:
    """A normalised (3, H, W) image -> (1, H/patch, W/patch, 3) tokens: each patch's mean colour,
    centred on the image's mean colour and scaled to unit length (so q·k is a cosine similarity)."""
    c, h, w = x.shape
    t = x.transpose(1, 2, 0).reshape(h // patch, patch, w // patch, patch, c).mean(axis=(1, 3))[None]
    t = t - t.mean(axis=(1, 2), keepdims=True)
    return (t / (np.linalg.norm(t, axis=-1, keepdims=True) + 1e-6)).astype(np.float32)


def colour_head(beta: float = 16.0):
    """A shvit_numpy SingleHeadAttention with hand-set weights over 3 colour channels:
    q = beta * colour, k = v = colour, so each token attends to tokens of similar colour."""
    from shvit_numpy.layers import SingleHeadAttention

    head = SingleHeadAttention(dim=3, qk_dim=3, pdim=3)  # all 3 channels attended, qk 3
    w = np.zeros((9, 3, 1, 1), np.float32)  # qkv: 1x1 conv 3 -> 2*3 + 3
    w[0:3, :, 0, 0] = beta * np.eye(3)  # q
    w[3:6, :, 0, 0] = np.eye(3)  # k
    w[6:9, :, 0, 0] = np.eye(3)  # v
    head.qkv.c.weight = w
    return head


def s1_model(weights: Path | None):
    """S1 in NumPy: the given weight file, or random weights and BatchNorm statistics (seed 0)."""
    import shvit_numpy
    from shvit_numpy.model import SHViT
    from shvit_numpy.names import state_shapes

    if weights is not None:
        return shvit_numpy.load(weights), f"weights from {weights.name}"
    sys.path.insert(0, str(ROOT))
    from tests.helpers import random_state

    cfg = get_config("s1")
    return SHViT(cfg).load_state(random_state(state_shapes(cfg), 0)).fuse(), "random weights (untrained)"


QUERIES = {"sky": (0.12, 0.75), "roof": (0.75, 0.2), "water": (0.55, 0.85), "trees": (0.92, 0.9)}  # (row, col) fractions


def attention(path: Path, weights: Path | None = None, res: int = 448) -> None:
    from shvit_numpy.preprocess import MEAN, STD, load_image

    x = load_image(sample_photo(), res)  # (3, res, res)
    photo = (x.transpose(1, 2, 0) * STD + MEAN).clip(0, 1)
    tokens = photo_tokens(x)
    _, _, hand = colour_head().attention(tokens)  # (1, N, N)
    model, how = s1_model(weights)
    layer = "stages.1.blocks.0.mixer.m"
    learned = model.forward_intermediates(x[None]).attention[layer]  # (1, N, N)
    fig, axes = plt.subplots(3, len(QUERIES) + 1, figsize=(3.1 * len(QUERIES) + 0.6, 9.6),
                             gridspec_kw={"width_ratios": [1] * len(QUERIES) + [0.06]})
    extent = (0, res, res, 0)
    images = {}
    for j, (name, (fr, fc)) in enumerate(QUERIES.items()):
        for i, attn in ((1, hand[0]), (2, learned[0])):
            n = int(round(np.sqrt(attn.shape[-1])))
            r, c = int(fr * n), int(fc * n)
            amap = attn[r * n + c].reshape(n, n)
            ax = axes[i, j]
            ax.imshow(photo, extent=extent)
            if i == 1:  # each map on its own scale: where the weight goes
                images[i] = ax.imshow(amap / amap.max(), extent=extent, cmap="inferno", alpha=0.75, vmin=0, vmax=1)
            else:  # against uniform attention (1/N): red above, blue below
                images[i] = ax.imshow(amap * n * n, extent=extent, cmap="coolwarm", alpha=0.7, vmin=0.5, vmax=1.5)
            ax.plot((c + 0.5) * res / n, (r + 0.5) * res / n, "c*", ms=13, mec="k")
        axes[0, j].imshow(photo, extent=extent)
        axes[0, j].plot(fc * res, fr * res, "c*", ms=16, mec="k")
        axes[0, j].set_title(f"query: {name}", fontsize=10)
    for ax in axes[:, :-1].flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].axis("off")
    axes[1, 0].set_ylabel(f"hand-set head\n{tokens.shape[1]}×{tokens.shape[2]} colour tokens", fontsize=9)
    axes[2, 0].set_ylabel(f"SHViT-S1 {layer}\n{how}", fontsize=9)
    fig.colorbar(images[1], cax=axes[1, -1], label="weight ÷ the map's max")
    fig.colorbar(images[2], cax=axes[2, -1], label="weight × N   (1 = uniform)")
    fig.suptitle(f"Single-head attention on scikit-learn's china.jpg at {res}×{res}: where each query token looks\n"
                 "row 2: shvit_numpy's SingleHeadAttention with weights set by hand (q = 16·colour, k = v = colour); "
                 f"row 3: the first attention layer of S1, {how}", fontsize=9.5)
    fig.tight_layout()
    save(fig, path)


# -- throughput -----------------------------------------------------------------------------------------------

THREE = {"torch-folded": "PyTorch (folded)", "numpy": "NumPy", "tiny-cpu": "tinygrad CPU (JIT)", "tiny-cl": "tinygrad CL (JIT)"}


def bench_result() -> dict | None:
    """The CPU result of `make bench`: the full run's (benchmarks/results/latest.json), else a
    quick run's (runs/bench/quick.json), or None."""
    for p in (RESULTS / "latest.json", ROOT / "runs" / "bench" / "quick.json"):
        if p.is_file():
            result = json.loads(p.read_text())
            if result.get("speed") and result.get("device", "cpu") == "cpu":
                result["source"] = p.relative_to(ROOT).as_posix()  # named in the figure's title
                return result
    return None


def throughput(path: Path) -> bool:
    """images/s of the three runtimes on S1 at 224 (batch 16), per thread setting. False: no results yet."""
    result = bench_result()
    if result is None:
        print(f"skipped {path.name}: no benchmark results yet (run `make bench`, or `make bench` with --quick)")
        return False
    rows = [r for r in result["speed"] if r["variant"] == "s1" and r["runtime"] in THREE]
    batch = 16 if any(r["batch"] == 16 for r in rows) else max((r["batch"] for r in rows), default=0)
    rows = [r for r in rows if r["batch"] == batch]
    if not rows:
        print(f"skipped {path.name}: the results hold no S1 rows for the three runtimes")
        return False
    threads = sorted({r["threads"] for r in rows})
    keys = [k for k in THREE if any(r["runtime"] == k for r in rows)]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    width = 0.8 / len(threads)
    for i, t in enumerate(threads):
        xs, ys, err = [], [], [[], []]
        for j, k in enumerate(keys):
            r = next((r for r in rows if r["runtime"] == k and r["threads"] == t), None)
            if r is None:
                continue
            s = r["seconds"]
            mid = batch / s["median"]
            xs.append(j + (i - (len(threads) - 1) / 2) * width)
            ys.append(mid)
            err[0].append(mid - batch / s["max"])
            err[1].append(batch / s["min"] - mid)
        ax.bar(xs, ys, width, yerr=err, capsize=3, label="1 core" if t == 1 else f"{t} cores")
        for x, y, up in zip(xs, ys, err[1]):
            ax.text(x, y + up, f"{y:.0f}", ha="center", va="bottom", fontsize=8)
    load = (result.get("load_average") or {}).get("before")
    busy = ", a busy machine: noisy" if load is not None and load > 0.5 * result["machine"]["cores"] else ""
    ax.set(xticks=range(len(keys)), xticklabels=[THREE[k] for k in keys], ylabel="images / s (higher is better)",
           title=f"One weight file, three runtimes: SHViT-S1 at 224, batch {batch}\n{result['machine']['cpu']}, "
                 f"{result['machine']['cores']} cores\n{result['mode']} run of `make bench`, {result['started'][:10]}{busy} "
                 f"({result['source']}); median, whiskers min–max")
    ax.title.set_fontsize(9.5)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, path)
    return True


FIGURES = {"architecture": architecture, "macs-memory": macs_memory, "attention": attention, "throughput": throughput}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m docs.figures", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", metavar="NAME", help=f"which figures (default all): {', '.join(FIGURES)}")
    p.add_argument("--weights", type=Path, help="a trained S1 .safetensors for the attention figure's last row")
    p.add_argument("--out", type=Path, default=DOCS, help="folder for the PNGs (default docs/)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in FIGURES]
    if unknown:
        print(f"{p.prog}: error: unknown figure {unknown[0]!r}; expected some of {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    if args.weights is not None and not args.weights.is_file():
        print(f"{p.prog}: error: --weights {args.weights}: no such file (expected an S1 .safetensors)", file=sys.stderr)
        return 2
    for name in args.names or FIGURES:
        target = args.out / f"{name}.png"
        if name == "attention":
            attention(target, args.weights)
        else:
            FIGURES[name](target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
