"""``python -m benchmarks.profile_ops``: where one batch's time goes, shvit_torch folded vs ONNX Runtime.

Both run the same folded S1 weights on the same batch, pinned to the same CPUs with the same
thread count. torch.profiler times each aten operator; ONNX Runtime's own profiler times each
graph node. Convolutions are split by kind (weight shape): dense 3x3 (the stem), depthwise
3x3 (residual DW and PatchMerging's stride-2 conv), pointwise 1x1 (FFN, qkv, projections);
everything else by operator. The table shows milliseconds per batch and the share of the
total, side by side, so the gap between the two runtimes has names.

``--numpy``: the same question for shvit_numpy's folded model (CPU time and MAC rate by kind of
operation; its convolutions and attention timed exclusively).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from shvit_numpy.cli import Parser
from shvit_numpy.config import RESOLUTION, VARIANTS

PROG = "python -m benchmarks.profile_ops"
MARK = "SHVIT_PROFILE_CHILD"


def conv_kind(weight_shape, groups_hint=None) -> str:
    """Name a convolution by its weight (out, in/groups, kh, kw)."""
    if not weight_shape or len(weight_shape) != 4:
        return "conv (other)"
    _, cin_g, kh, _ = weight_shape
    if kh == 1:
        return "conv pointwise 1x1"
    return "conv depthwise 3x3" if cin_g == 1 else "conv dense 3x3 (stem)"


# ---- torch ---------------------------------------------------------------------------------------------------

TORCH_CONV = ("aten::mkldnn_convolution", "aten::_convolution_depthwise2d", "aten::thnn_conv2d", "aten::_slow_conv2d_forward",
              "aten::_nnpack_spatial_convolution", "aten::convolution_overrideable", "aten::_mkldnn_convolution")


def torch_profile(model, x, repeats: int, channels_last: bool = False) -> dict[str, float]:
    """Milliseconds per batch by operator (self CPU time), convolutions split by kind."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        for _ in range(3):
            model(xt.contiguous(memory_format=fmt))
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(repeats):
                model(xt.contiguous(memory_format=fmt))
    out = defaultdict(float)
    conv_names = set(TORCH_CONV)
    for e in prof.key_averages(group_by_input_shape=True):
        ms = e.self_cpu_time_total / 1000 / repeats
        if ms <= 0:
            continue
        if e.key in conv_names or (e.key.startswith("aten::") and "conv" in e.key and ms > 0 and e.input_shapes
                                   and len(e.input_shapes) > 1 and len(e.input_shapes[1]) == 4):
            shapes = e.input_shapes
            out[conv_kind(shapes[1] if len(shapes) > 1 else None)] += ms
        else:
            out[e.key.removeprefix("aten::")] += ms
    return dict(out)


# ---- ONNX Runtime -------------------------------------------------------------------------------------------------

def ort_profile(onnx_path: Path, x, threads: int, repeats: int) -> dict[str, float]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(onnx_path.with_suffix(""))
    sess = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(3 + repeats):
        sess.run(None, {name: x})
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    start = runs[2][1] if len(runs) == 3 + repeats else 0  # the first three runs are warm-up
    out = defaultdict(float)
    for e in events:
        if e.get("ts", 0) < start or e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        if op in ("Conv", "FusedConv", "NchwcConv", "QLinearConv"):
            shapes = [next(iter(d.values())) for d in args.get("input_type_shape", [])]
            op = conv_kind(shapes[1] if len(shapes) > 1 else None)
        out[op] += e["dur"] / 1000 / repeats
    return dict(out)


# ---- main -------------------------------------------------------------------------------------------------------

def table(torch_ms: dict, ort_ms: dict, top: int, form: str = "") -> str:
    tt, ot = sum(torch_ms.values()), sum(ort_ms.values())
    conv = sorted({k for k in list(torch_ms) + list(ort_ms) if k.startswith("conv")})
    rest = sorted({k for k in list(torch_ms) + list(ort_ms) if not k.startswith("conv")},
                  key=lambda k: -(torch_ms.get(k, 0) + ort_ms.get(k, 0)))
    keys = conv + rest[:top]
    lines = [f"| operator | shvit_torch folded{', ' + form if form else ''} (ms) | share | ONNX Runtime (ms) | share |",
             "|---|---|---|---|---|"]
    for k in keys:
        a, b = torch_ms.get(k, 0.0), ort_ms.get(k, 0.0)
        lines.append(f"| {k} | {a:.1f} | {100 * a / tt:.0f}% | {b:.1f} | {100 * b / ot:.0f}% |")
    other_t = tt - sum(torch_ms.get(k, 0) for k in keys)
    other_o = ot - sum(ort_ms.get(k, 0) for k in keys)
    lines.append(f"| (everything else) | {other_t:.1f} | {100 * other_t / tt:.0f}% | {other_o:.1f} | {100 * other_o / ot:.0f}% |")
    lines.append(f"| **total (operator time)** | **{tt:.1f}** | | **{ot:.1f}** | |")
    return "\n".join(lines)


def numpy_profile(variant: str, batch: int, res: int, iters: int) -> list[dict]:
    """CPU time of the folded NumPy model by kind of operation (exclusive), and each kind's MAC rate:
    what limits it. Its convolution and attention methods are wrapped for the run, then put back."""
    import collections
    import time

    import numpy as np

    from shvit_numpy import layers as nl
    from shvit_numpy.config import get_config
    from shvit_numpy.model import SHViT
    from shvit_numpy.names import state_shapes
    from shvit_numpy.weights import random_state

    cfg = get_config(variant)
    model = SHViT(cfg).load_state(random_state(state_shapes(cfg), 0)).fuse()
    x = np.random.default_rng(1).standard_normal((batch, 3, res, res)).astype(np.float32)
    acc = collections.defaultdict(lambda: [0.0, 0, 0])  # kind -> [exclusive seconds, MACs, calls]
    nested = [0.0]  # time spent in timed calls inside the current one (a stack)
    originals = {}

    def timed(cls, attr, kind, macs):
        orig = originals[(cls, attr)] = getattr(cls, attr)

        def wrapper(self, inp):
            nested.append(0.0)
            t = time.process_time()
            out = orig(self, inp)
            dt = time.process_time() - t
            inner = nested.pop()
            nested[-1] += dt
            a = acc[kind(self, inp)]
            a[0] += dt - inner  # exclusive: the qkv conv inside attention counts as a 1x1 conv
            a[1] += macs(self, inp, out)
            a[2] += 1
            return out
        setattr(cls, attr, wrapper)

    def conv_kind(conv, inp):
        k = conv.weight.shape[2]
        return "depthwise 3x3 (9 shifted multiply-adds)" if conv.groups > 1 else \
            "1x1 conv (one GEMM)" if k == 1 else "stem 3x3 conv (pad + im2col + GEMM)"

    timed(nl.Conv2d, "__call__", conv_kind, lambda c, i, o: o.size * c.weight[0].size)
    timed(nl.SingleHeadAttention, "attention", lambda m, i: "attention core (GroupNorm, q k^T, softmax, attn v)",
          lambda m, i, o: o[2].size * (m.qk_dim + m.pdim))
    try:
        model(x)
        acc.clear()
        t = time.process_time()
        for _ in range(iters):
            model(x)
        total = (time.process_time() - t) / iters
    finally:
        for (cls, attr), f in originals.items():
            setattr(cls, attr, f)
    rows = [{"kind": k, "calls": c // iters, "ms": 1000 * s / iters, "gmac_s": m / s / 1e9 if s else 0.0}
            for k, (s, m, c) in sorted(acc.items(), key=lambda kv: -kv[1][0])]
    rows.append({"kind": "everything else (residual adds, ReLU, SE, concat, pooling, head)", "calls": 0,
                 "ms": 1000 * total - sum(r["ms"] for r in rows), "gmac_s": 0.0})
    rows.append({"kind": "total", "calls": 0, "ms": 1000 * total, "gmac_s": 0.0})
    return rows


def numpy_child(args) -> int:
    res = RESOLUTION[args.variant]
    print(f"shvit_numpy folded, {args.variant} at {res}, batch {args.batch}, {args.threads} thread(s), "
          f"{args.repeats} profiled batches; CPU time per batch\n")
    for r in numpy_profile(args.variant, args.batch, res, args.repeats):
        rate = f"{r['gmac_s']:6.1f} GMAC/s" if r["gmac_s"] else ""
        calls = f"{r['calls']:3d} calls" if r["calls"] else ""
        print(f"{r['ms']:8.1f} ms  {r['kind']:64s} {calls:9s} {rate}")
    return 0


def child(args) -> int:
    if args.numpy:
        return numpy_child(args)
    import numpy as np
    import torch

    from shvit_torch.export import export_onnx

    from .bench import random_model

    torch.set_num_threads(args.threads)
    res = RESOLUTION[args.variant]
    model = random_model(args.variant, seed=0)
    x = np.random.default_rng(0).standard_normal((args.batch, 3, res, res)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{args.variant}.onnx"
        export_onnx(model, path, resolution=res)
        torch_ms = torch_profile(model.fuse(), x, args.repeats, args.channels_last)
        ort_ms = ort_profile(path, x, args.threads, args.repeats)
    print(f"{args.variant} at {res}, batch {args.batch}, {args.threads} thread(s), {args.repeats} profiled batches; "
          f"operator time per batch (profilers add some overhead to both)\n")
    print(table(torch_ms, ort_ms, args.top, "channels_last" if args.channels_last else ""))
    return 0


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--variant", choices=sorted(VARIANTS), default="s1")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="threads, and CPUs pinned to (default 1)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--channels-last", action="store_true", help="profile the folded torch model in channels_last")
    p.add_argument("--top", type=int, default=10, help="non-convolution operators shown (default 10)")
    p.add_argument("--numpy", action="store_true", help="profile shvit_numpy's folded model by kind of operation instead")
    args = p.parse_args(argv)
    if min(args.batch, args.threads, args.repeats, args.top) < 1:
        p.error("--batch, --threads, --repeats and --top must be >= 1")
    if os.environ.get(MARK) == "1":
        return child(args)
    from .bench import worker_env
    from .machine import usable_cpus

    cpus = usable_cpus()
    if args.threads > len(cpus):
        p.error(f"--threads {args.threads} is more than the {len(cpus)} CPUs here")
    env = {**worker_env(args.threads), MARK: "1"}
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cpus[:args.threads]))  # inherited by the re-executed process
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks.profile_ops", *(argv if argv is not None else sys.argv[1:])], env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
