"""``python -m shvit_numpy.profile --variant s1``: parameters, MACs and activation memory, layer by layer.

Pure arithmetic on the configuration (nothing runs). A convolution costs H'*W'*C_out*(C_in/groups)*k*k
multiply-accumulates; attention N*N*qk for q^T k plus N*N*pdim for v attn^T; the SE gate and the
classifier count as the matrix products they are; element-wise work (norms, softmax, adds) does
not count, as in the paper. Parameters are the unfolded model's (BatchNorm's weight and bias
included, running statistics not), as the paper counts them; ``params_folded`` counts the
inference model, where each BatchNorm's weight and bias became its convolution's (or the
classifier's) bias. Activation bytes are one float32 output of each layer at batch 1.

``--macro`` sets SHViT's 16x16-stem, 3-stage layout beside a conventional 4x4-stem, 4-stage layout
of similar width: tokens and bytes per stage, the paper's macro-design argument in numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

from .cli import Parser
from .config import RESOLUTION, SHViTConfig, get_config, se_channels
from .errors import ShvitError

BYTES = 4  # float32


@dataclass
class Row:
    name: str
    stage: str
    shape: tuple[int, int, int]  # output (C, H, W) for batch 1
    params: int
    macs: int
    params_folded: int  # after BatchNorm folding: a ConvBN keeps w and gains a bias (cout), BN's 2*cout go

    @property
    def act_bytes(self) -> int:
        return BYTES * math.prod(self.shape)


class Counter:
    """Walks the architecture in forward order, tracking (C, H, W) and appending a Row per layer."""

    def __init__(self, cfg: SHViTConfig, h: int, w: int):
        self.cfg, self.rows, self.stage = cfg, [], "stem"
        self.c, self.h, self.w = cfg.in_chans, h, w

    def conv(self, name, cout, k=1, stride=1, groups=1, bn=True, bias=False):
        cin = self.c
        self.h, self.w = -(-self.h // stride), -(-self.w // stride)  # ceil: padding k // 2
        macs = self.h * self.w * cout * (cin // groups) * k * k
        params = cout * (cin // groups) * k * k + (2 * cout if bn else 0) + (cout if bias else 0)
        self.c = cout
        self.rows.append(Row(name, self.stage, (cout, self.h, self.w), params, macs, params - cout if bn else params))

    def dw(self, name):
        self.conv(name, self.c, 3, groups=self.c)

    def ffn(self, name):
        c = self.c
        self.conv(f"{name}.pw1", 2 * c)
        self.conv(f"{name}.pw2", c)

    def attention(self, name, pdim, qk):
        c, n = self.c, self.h * self.w
        self.c = pdim
        self.rows.append(Row(f"{name}.pre_norm", self.stage, (pdim, self.h, self.w), 2 * pdim, 0, 2 * pdim))
        self.conv(f"{name}.qkv", 2 * qk + pdim)
        self.rows.append(Row(f"{name}.attn", self.stage, (n, n, 1), 0, n * n * qk + n * n * pdim, 0))  # q^T k, v attn^T
        self.c = c
        self.conv(f"{name}.proj.1", c)

    def patch_merging(self, name, out):
        hid = 4 * self.c
        self.conv(f"{name}.conv1", hid)
        self.conv(f"{name}.conv2", hid, 3, 2, groups=hid)
        rd, h, w = se_channels(hid), self.h, self.w
        se_params = 2 * hid * rd + rd + hid  # two 1x1 convs with bias on the pooled vector
        self.rows.append(Row(f"{name}.se", self.stage, (hid, h, w), se_params, 2 * hid * rd, se_params))
        self.conv(f"{name}.conv3", out)


def count(cfg: SHViTConfig, h: int, w: int | None = None) -> list[Row]:
    """Every layer of ``cfg`` at an h x w input, in forward order."""
    k = Counter(cfg, h, w or h)
    for i, c in enumerate(cfg.stem_dims):
        k.conv(f"patch_embed.{2 * i}", c, 3, 2)
    for s in range(3):
        k.stage = f"stage{s + 1}"
        if s:
            p = f"stages.{s}.downsample"
            k.dw(f"{p}.0.m")
            k.ffn(f"{p}.1.m")
            k.patch_merging(f"{p}.2", cfg.embed_dim[s])
            k.dw(f"{p}.3.m")
            k.ffn(f"{p}.4.m")
        for j in range(cfg.depth[s]):
            b = f"stages.{s}.blocks.{j}"
            k.dw(f"{b}.conv.m")
            if cfg.types[s] == "s":
                k.attention(f"{b}.mixer.m", cfg.partial_dim[s], cfg.qk_dim[s])
            k.ffn(f"{b}.ffn.m")
    k.stage = "head"
    c, n = k.c, cfg.num_classes
    heads = 2 if cfg.distillation else 1
    k.rows.append(Row("head", "head", (n, 1, 1), heads * (2 * c + c * n + n), heads * c * n, heads * (c * n + n)))
    return k.rows


def summary(rows: list[Row]) -> dict:
    stages = {}
    for r in rows:
        s = stages.setdefault(r.stage, {"params": 0, "macs": 0, "act_bytes": 0})
        s["params"] += r.params
        s["macs"] += r.macs
        s["act_bytes"] += r.act_bytes
    return {"params": sum(r.params for r in rows), "macs": sum(r.macs for r in rows),
            "params_folded": sum(r.params_folded for r in rows), "stages": stages,
            "layers": [{**asdict(r), "act_bytes": r.act_bytes} for r in rows]}


# A conventional hierarchical layout (4x4 patchify stem, four stages at strides 4, 8, 16, 32, as in
# most efficient ViTs) against SHViT's (16x16 stem, three stages at 16, 32, 64), at s1's widths.
MACRO = {
    "conventional 4x4 stem, 4 stages": {"strides": (4, 8, 16, 32), "widths": (64, 128, 224, 320)},
    "SHViT 16x16 stem, 3 stages": {"strides": (16, 32, 64), "widths": (128, 224, 320)},
}


def macro_table(res: int) -> list[dict]:
    """Tokens, and the bytes of one float32 feature map and of one N x N attention map, per stage."""
    out = []
    for layout, spec in MACRO.items():
        for i, (s, c) in enumerate(zip(spec["strides"], spec["widths"])):
            n = math.ceil(res / s) ** 2
            out.append({"layout": layout, "stage": i + 1, "stride": s, "channels": c, "tokens": n,
                        "feature_bytes": BYTES * n * c, "attention_bytes": BYTES * n * n})
    return out


def fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def print_report(rows: list[Row], cfg_name: str, res: int) -> None:
    s = summary(rows)
    print(f"SHViT-{cfg_name} at {res}x{res}, batch 1, float32")
    print(f"{'layer':44s} {'output (C,H,W)':>16s} {'params':>10s} {'MACs':>12s} {'activation':>11s}")
    for r in rows:
        print(f"{r.name:44s} {str(r.shape):>16s} {r.params:>10,d} {r.macs:>12,d} {fmt_bytes(r.act_bytes):>11s}")
    print()
    for name, t in s["stages"].items():
        print(f"{name:8s} params {t['params']:>11,d}  MACs {t['macs'] / 1e6:9.2f}M  activations {fmt_bytes(t['act_bytes'])}")
    print(f"total    params {s['params']:>11,d}  MACs {s['macs'] / 1e6:9.2f}M  (folded for inference: {s['params_folded']:,d} params)")


def print_macro(res: int) -> None:
    print(f"\nMacro design at {res}x{res}, batch 1: tokens and float32 bytes per stage (one feature map, and what one\n"
          "N x N attention map would take there; SHViT itself attends only in its stages 2 and 3)")
    print(f"{'layout':34s} {'stage':>5s} {'stride':>6s} {'C':>5s} {'tokens':>7s} {'feature map':>12s} {'attention map':>14s}")
    table = macro_table(res)
    for r in table:
        print(f"{r['layout']:34s} {r['stage']:>5d} {r['stride']:>6d} {r['channels']:>5d} {r['tokens']:>7d} "
              f"{fmt_bytes(r['feature_bytes']):>12s} {fmt_bytes(r['attention_bytes']):>14s}")
    conv, shvit = (next(r for r in table if r["layout"] == name and r["stage"] == 1) for name in MACRO)
    print(f"First stage: the conventional layout holds {conv['tokens'] / shvit['tokens']:.0f}x the tokens, "
          f"{conv['feature_bytes'] / shvit['feature_bytes']:.0f}x the feature bytes and "
          f"{conv['attention_bytes'] / shvit['attention_bytes']:.0f}x the attention-map bytes of SHViT's.")


def main(argv=None) -> int:
    p = Parser(prog="python -m shvit_numpy.profile", description=__doc__.splitlines()[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="s1", help="s1, s2, s3 or s4 (default s1)")
    p.add_argument("--resolution", type=int, help="input size (default: the variant's, 224; s4 256)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help='print {"params", "macs", "stages", "layers"} as JSON')
    p.add_argument("--macro", action="store_true", help="also compare with a conventional 4x4-stem, 4-stage layout")
    args = p.parse_args(argv)
    try:
        cfg = get_config(args.variant, num_classes=args.num_classes)
        name = args.variant.lower().removeprefix("shvit_")
        res = RESOLUTION.get(name, 224) if args.resolution is None else args.resolution
        if res < 1:
            raise ShvitError(f"--resolution must be >= 1, got {res}")
    except ShvitError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    rows = count(cfg, res)
    if args.json:
        out = summary(rows)
        if args.macro:
            out["macro"] = macro_table(res)
        print(json.dumps(out))
        return 0
    print_report(rows, name, res)
    if args.macro:
        print_macro(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
