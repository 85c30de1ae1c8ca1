"""From the bench's JSON to what people read: Markdown tables, the speed floors, the PNG chart."""
from __future__ import annotations

from dataclasses import dataclass

from shvit_numpy.config import RESOLUTION

from .machine import one_line
from .runners import RUNTIMES
from .worker import SETTLE_S

# The paper's A100 throughput (images/s, batch 256, float16); see /work/shared/spec/shvit.md.
PAPER_A100 = {"s1": 33_489, "s2": 26_878, "s3": 20_522, "s4": 14_283}
# one colour per runtime in every chart: torch blues, numpy orange, tinygrad greens, peers purple and grey
COLORS = {"torch-eager": "#9ecae1", "torch-folded": "#6baed6", "torch-cl": "#3182bd", "torch-traced": "#08519c",
          "torch-compile": "#08306b", "numpy": "#fd8d3c", "tiny-cpu": "#74c476", "tiny-cl": "#31a354", "tiny-cuda": "#006d2c",
          "ort": "#756bb1", "timm": "#636363"}


THREADS = ("one", "all")  # a floor's thread setting: one core, or every CPU the run could use


@dataclass(frozen=True)
class Floor:
    """numerator / denominator of images/s at one cell (variant, batch, threads); PASS when >= floor
    (None: no floor, goal only). The numerator is the fastest of the runtimes it names that were
    measured. ``threads`` is "one" (one core) or "all" (every CPU the run could use: the machine's
    cores). Kind "threads": the numerator's one runtime at ``threads`` ÷ the same runtime on one core
    (how it scales), ``denominator`` naming it again."""

    name: str
    numerator: tuple[str, ...]
    denominator: str
    floor: float | None
    goal: float
    issue: int
    variant: str = "s1"
    batch: int = 16  # batch 1: the ratio of latencies' inverses (speed at one image)
    threads: str = "one"
    kind: str = "runtimes"  # or "threads"

    def __post_init__(self):
        if self.threads not in THREADS or self.kind not in ("runtimes", "threads"):
            raise ValueError(f"floor {self.name!r}: threads must be one of {', '.join(THREADS)} and kind 'runtimes' or 'threads'")
        if self.kind == "threads" and (self.numerator != (self.denominator,) or self.threads == "one"):
            raise ValueError(f"floor {self.name!r}: a 'threads' floor compares one runtime at 'all' with itself on one core")

    def cells(self, all_cores: int) -> tuple[tuple, tuple]:
        """The (variant, batch, threads) of the numerator and of the denominator, in a run whose
        all-cores setting is ``all_cores`` threads."""
        n = 1 if self.threads == "one" else all_cores
        return (self.variant, self.batch, n), (self.variant, self.batch, 1 if self.kind == "threads" else n)


TORCH_FOLDED = ("torch-folded", "torch-cl", "torch-traced", "torch-compile")
# The timm floors take shvit_torch's fastest folded form: traced, ours and timm's are the same graph, so
# traced against traced could only measure noise; what users of shvit_torch can get is the question.
FLOORS = [
    # issue 22: shvit_tiny against ONNX Runtime on every variant and both thread settings, and its scaling
    *(Floor("shvit_tiny CPU (JIT) ÷ ONNX Runtime (same folded weights)", ("tiny-cpu",), "ort", 0.95, 1.1, 22, variant=v)
      for v in ("s1", "s2", "s3", "s4")),
    Floor("shvit_tiny CPU (JIT) ÷ ONNX Runtime, batch 1 (inverse latency)", ("tiny-cpu",), "ort", 1.0, 1.3, 22, batch=1),
    Floor("shvit_tiny CPU (JIT) ÷ ONNX Runtime, all cores", ("tiny-cpu",), "ort", 0.9, 1.2, 22, threads="all"),
    Floor("shvit_tiny CPU (JIT) on all cores ÷ on one core", ("tiny-cpu",), "tiny-cpu", 1.6, 1.9, 22, threads="all", kind="threads"),
    # issue 15's that issue 22 kept (its shvit ÷ ONNX Runtime ones, at batches 16 and 1, are above)
    Floor("shvit_tiny CPU (JIT) ÷ shvit_torch folded", ("tiny-cpu",), "torch-folded", 1.0, 1.3, 15),
    Floor("shvit_torch fast path (optimize()) ÷ timm folded and traced", ("torch-traced", "torch-compile"), "timm", 1.0, 1.2, 15),
    Floor("shvit_torch folded (fastest form) ÷ timm folded and traced", TORCH_FOLDED, "timm", 1.0, 1.2, 15),
    Floor("shvit_numpy ÷ shvit_torch folded", ("numpy",), "torch-folded", 0.5, 0.75, 15),
]


@dataclass(frozen=True)
class Target:
    """A first answer's wall seconds in one cache state; PASS when <= ceiling (None: figures only)."""

    name: str
    runtime: str
    state: str  # "cold" or "warm" (the median of the warm runs)
    ceiling: float | None
    goal: float


# issue 22's targets (issue 15's, with the warm ceiling lowered from 2 s): a new process, S1 at 224, one image, one core
TARGETS = [
    Target("shvit_tiny CPU, warm caches", "tiny-cpu", "warm", 1.5, 1.0),
    Target("shvit_tiny CPU, empty caches", "tiny-cpu", "cold", 15.0, 10.0),
    Target("shvit_tiny CL (PoCL on a CPU), warm caches", "tiny-cl", "warm", None, 1.0),
    Target("shvit_tiny CL (PoCL on a CPU), empty caches", "tiny-cl", "cold", None, 10.0),
]
STATES = {"cold": "cold_s", "warm": "warm_s", "warm_no_cache": "warm_no_cache_s"}


def seconds(row: dict, state: str) -> float | None:
    """A first-answer row's seconds in ``state`` (warm: the median), None if not measured."""
    v = row.get(STATES[state])
    return v["median"] if isinstance(v, dict) else v


def check_targets(result: dict) -> list[dict]:
    """Each first-answer target's measured seconds and PASS / FAIL / SKIP ("—" where no ceiling)."""
    fa = result.get("first_answer") or {}
    rows = {r["runtime"]: r for r in fa.get("rows", [])}
    reasons = {s["runtime"]: s["reason"] for s in result.get("skipped", []) if s["where"].startswith("first answer")}
    out = []
    for t in TARGETS:
        entry = {"name": t.name, "runtime": t.runtime, "state": t.state, "ceiling": t.ceiling, "goal": t.goal}
        value = seconds(rows[t.runtime], t.state) if t.runtime in rows else None
        if value is None:
            entry.update(value=None, status="SKIP", reason=reasons.get(t.runtime, "not measured in this run"))
        else:
            status = "—" if t.ceiling is None else ("PASS" if value <= t.ceiling else "FAIL")
            entry.update(value=value, status=status, goal_met=value <= t.goal)
        out.append(entry)
    return out


def throughput(row) -> dict:
    """images/s: the median, and the range the slowest and fastest rounds give."""
    s, b = row["seconds"], row["batch"]
    return {"median": b / s["median"], "min": b / s["max"], "max": b / s["min"]}


def find(rows, runtime, variant, batch, threads):
    for r in rows:
        if (r["runtime"], r["variant"], r["batch"], r["threads"]) == (runtime, variant, batch, threads):
            return r
    return None


def all_cores(result: dict) -> int:
    """The run's all-cores thread count: the CPUs it could use (bench.py's "all")."""
    return result["machine"]["cores"]


def skip_reason(result: dict, runtime: str, variant: str, threads: int) -> str:
    """Why ``runtime`` has no figure at (variant, threads): the run's own note, else not in its plan."""
    label = f"{threads} thread{'s' if threads > 1 else ''}"
    for s in result.get("skipped", []):
        if s["runtime"] == runtime and s["where"] in (label, f"{label}, {variant}"):
            return s["reason"]
    return "not measured in this run (see --quick, --runtimes)"


def check_floors(result: dict) -> list[dict]:
    """Each floor's measured ratio (medians) at its cell and PASS / FAIL / SKIP."""
    here = {(r["runtime"], r["variant"], r["batch"], r["threads"]): throughput(r)["median"]
            for r in result["speed"] if r.get("device", "cpu") == "cpu"}
    n = all_cores(result)
    out = []
    for f in FLOORS:
        num_cell, den_cell = f.cells(n)
        measured = [k for k in f.numerator if (k, *num_cell) in here]
        num_key = max(measured, key=lambda k: here[(k, *num_cell)]) if measured else None
        entry = {"name": f.name, "issue": f.issue, "kind": f.kind, "numerator": num_key or f.numerator[0],
                 "denominator": f.denominator, "floor": f.floor, "goal": f.goal, "variant": f.variant, "batch": f.batch,
                 "threads": num_cell[2], "denominator_threads": den_cell[2],
                 "fastest_of": list(f.numerator) if len(f.numerator) > 1 else None}
        missing = [(k, c) for k, c in ((num_key or f.numerator[0], num_cell), (f.denominator, den_cell)) if (k, *c) not in here]
        if f.kind == "threads" and n == 1:
            entry.update(value=None, status="SKIP", reason="a one-core machine: no all-cores setting to scale to")
        elif missing:
            key, (variant, _, threads) = missing[0]
            entry.update(value=None, status="SKIP", reason=f"{key}: {skip_reason(result, key, variant, threads)}")
        else:
            value = here[(entry["numerator"], *num_cell)] / here[(f.denominator, *den_cell)]
            status = "—" if f.floor is None else ("PASS" if value >= f.floor else "FAIL")
            entry.update(value=value, status=status, goal_met=value >= f.goal)
        out.append(entry)
    return out


# -- Markdown ------------------------------------------------------------------------------------------------

def fmt(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def cell_text(row) -> str:
    if row is None:
        return "—"
    if row["batch"] == 1:
        s = row["seconds"]
        return f"{fmt(1000 * s['median'])} ({fmt(1000 * s['min'])}–{fmt(1000 * s['max'])})"
    t = throughput(row)
    return f"{fmt(t['median'])} ({fmt(t['min'])}–{fmt(t['max'])})"


def cores(n: int) -> str:
    return "1 core" if n == 1 else f"{n} cores"


def variant_table(result: dict, variant: str) -> list[str]:
    rows = [r for r in result["speed"] if r["variant"] == variant]
    mem = [m for m in result.get("memory", []) if m["variant"] == variant and "peak_rss_mb" in m]
    if not rows and not mem:
        return []
    threads = sorted({r["threads"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    cols = [(t, b) for t in threads for b in batches]
    heads = [f"latency, batch 1, {cores(t)} (ms)" if b == 1 else f"batch {b}, {cores(t)} (images/s)" for t, b in cols]
    mem_batch = mem[0]["batch"] if mem else None
    if mem:
        heads.append(f"peak RSS, batch {mem_batch}, 1 core (MB; + over imports)")
    res = (rows or mem)[0]["resolution"]
    lines = [f"#### {variant} at {res}×{res}", "", "| runtime | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    order = [k for k in RUNTIMES if any(r["runtime"] == k for r in rows) or any(m["runtime"] == k for m in mem)]
    for key in order:
        cells = [cell_text(find(rows, key, variant, b, t)) for t, b in cols]
        if mem:
            m = next((m for m in mem if m["runtime"] == key), None)
            cells.append(f"{m['peak_rss_mb']:.0f} (+{m['delta_mb']:.0f})" if m else "—")
        lines.append(f"| {RUNTIMES[key].label} | " + " | ".join(cells) + " |")
    return lines + [""]


def floor_cell(f: dict) -> str:
    """Where a floor's ratio was taken: "S1 at 224, batch 16, 1 core" (a threads floor: "2 cores ÷ 1 core")."""
    v = f["variant"]
    threads = cores(f["threads"]) + (f" ÷ {cores(f['denominator_threads'])}" if f["kind"] == "threads" else "")
    return f"{v.upper()} at {RESOLUTION[v]}, batch {f['batch']}, {threads}"


def floors_table(floors: list[dict], m: dict) -> list[str]:
    """The floors, each at its cell, under a heading that names the machine they were measured on."""
    lines = [f"#### Speed floors ({m['cpu']}, {cores(m['cores'])}, {vector_isa(m)}; one run, each thread setting in its own process)",
             "",
             f"Ratios of medians of images/s (batch 1: of inverse latencies), rounds interleaved; all cores = the "
             f"{cores(m['cores'])} this run could use. Machine: {one_line(m)}.", "",
             "| ratio of images/s | cell | measured | floor | goal | result |", "|---|---|---|---|---|---|"]
    for f in floors:
        floor = "—" if f["floor"] is None else f"{f['floor']:.2f}"
        head = f"| {f['name']} | {floor_cell(f)} |"
        if f["value"] is None:
            lines.append(f"{head} — | {floor} | {f['goal']:.2f} | SKIP: {f['reason']} |")
            continue
        goal = "goal met" if f["goal_met"] else "below goal"
        who = f" ({RUNTIMES[f['numerator']].label})" if f.get("fastest_of") else ""
        lines.append(f"| {f['name']}{who} | {floor_cell(f)} | {f['value']:.2f} | {floor} | {f['goal']:.2f} | {f['status']}, {goal} |")
    return lines + [""]


def vector_isa(m: dict) -> str:
    flags = m.get("cpu_flags") or []
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"


def first_answer_table(result: dict) -> list[str]:
    fa, m = result["first_answer"], result["machine"]
    lines = [f"#### Time to first answer ({fa['variant'].upper()} at {fa['resolution']}, batch {fa['batch']}, a new process, "
             f"one core; {m['cpu']}, {vector_isa(m)})", "",
             f"Wall seconds from starting `python -m <package>.run --weights W --input X.npy --save-logits Y.npy` until it has "
             f"exited with the logits written (ONNX Runtime: `python -m benchmarks.first_answer --ort`), pinned to CPU "
             f"{fa['cpu']} ({fa['pinned_with']}) with every library on one thread. Empty caches: HOME, XDG_CACHE_HOME, "
             "tinygrad's CACHEDB and PoCL's cache in a new empty folder (nothing compiled before). Warm: the same command "
             f"again on what that run left, median (min–max) of {fa['warm_runs']} runs interleaved across runtimes. "
             "Warm, --no-cache: shvit_tiny without its compiled-model cache, on tinygrad's binary cache alone.", "",
             "| runtime | empty caches (s) | warm caches (s) | warm, --no-cache (s) | max abs logit diff vs shvit_numpy |",
             "|---|---|---|---|---|"]
    for row in fa["rows"]:
        w = row.get("warm_s")
        warm = f"{w['median']:.2f} ({w['min']:.2f}–{w['max']:.2f})" if w else "—"
        nc = row.get("warm_no_cache_s")
        diff = row.get("max_abs_diff_vs_numpy")
        lines.append(f"| {RUNTIMES[row['runtime']].label} | {row['cold_s']:.2f} | {warm} | "
                     f"{f'{nc:.2f}' if nc is not None else '—'} | {f'{diff:.1e}' if diff is not None else '—'} |")
    return lines + [""]


def targets_table(targets: list[dict]) -> list[str]:
    lines = ["#### First-answer targets (S1 at 224, batch 1, a new process, one core)", "",
             "| first logits | measured (s) | ceiling (s) | goal (s) | result |", "|---|---|---|---|---|"]
    for t in targets:
        ceiling = "—" if t["ceiling"] is None else f"{t['ceiling']:g}"
        if t["value"] is None:
            lines.append(f"| {t['name']} | — | {ceiling} | {t['goal']:g} | SKIP: {t['reason']} |")
            continue
        goal = "goal met" if t["goal_met"] else "above goal"
        verdict = f"{t['status']}, {goal}" if t["ceiling"] is not None else f"{goal} (figures only)"
        lines.append(f"| {t['name']} | {t['value']:.2f} | {ceiling} | {t['goal']:g} | {verdict} |")
    return lines + [""]


def target_lines(targets: list[dict]) -> list[str]:
    """One PASS / FAIL / SKIP line per target, for the terminal."""
    out = []
    for t in targets:
        if t["value"] is None:
            out.append(f"SKIP  {t['name']}: {t['reason']}")
        else:
            ceiling = f"<= {t['ceiling']:g} s" if t["ceiling"] is not None else "no ceiling"
            out.append(f"{t['status'] if t['ceiling'] is not None else 'INFO':4}  {t['name']}: {t['value']:.2f} s "
                       f"({ceiling}, goal {t['goal']:g} s{', met' if t['goal_met'] else ''})")
    return out


def gpu_table(result: dict) -> list[str]:
    rows = result["speed"]
    variants = sorted({r["variant"] for r in rows})
    batch = max(r["batch"] for r in rows)
    lines = [f"#### GPU throughput, batch {batch}, {'float16' if rows[0].get('half') else 'float32'} (images/s)", "",
             "| runtime | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for key in [k for k in RUNTIMES if any(r["runtime"] == k for r in rows)]:
        cells = [cell_text(find(rows, key, v, batch, rows[0]["threads"])) for v in variants]
        lines.append(f"| {RUNTIMES[key].label} | " + " | ".join(cells) + " |")
    lines.append("| paper, A100 (timm-style, float16, batch 256) | " + " | ".join(f"{PAPER_A100.get(v, 0):,}" for v in variants) + " |")
    return lines + [""]


def where(places: list[str]) -> str:
    places = sorted(set(places))
    return "; ".join(places) if len(places) <= 3 else f"{len(places)} places: {places[0]} ... {places[-1]}"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    load = result.get("load_average", {})
    stopped = " — **interrupted**: only what was measured before the stop" if result.get("interrupted") else ""
    lines = [f"### `make bench` results ({result['mode']} run, {result['started']}){stopped}", "",
             f"Machine: {one_line(m)}.", ""]
    if load:
        busy = load["before"] > 0.5 * m["cores"]  # "after" counts this run's own work
        lines += [f"Load average (1 min) before / after the run (after includes the run's own work): "
                  f"{load['before']:.2f} / {load['after']:.2f}"
                  + (f". **The machine was busy** (other processes shared its {m['cores']} cores): figures are noisy and low, "
                     "multi-thread ones most (a thread waiting at a barrier for a descheduled peer). Re-run on a quiet machine."
                     if busy else " (quiet)."), ""]
    if result["speed"]:
        lines += [f"Method: {s['rounds']} rounds interleaved in one process per thread setting (the order rotates each round; "
                  f"on several cores each runtime's turn starts after a {SETTLE_S} s pause, in which the threads the runtime "
                  "before left busy-waiting go to sleep), "
                  f"each runtime's first (compiling) call and {s['warmup']} more warm-up call(s) untimed, "
                  f"rounds of at least {s['min_round_s']} s; median (min–max over rounds). Random weights and BatchNorm statistics. "
                  "Input: a float32 NCHW numpy batch; output: logits (numpy on CPU). One core = the process pinned to one CPU with "
                  "every library limited to one thread. Peak RSS: a fresh process per runtime and variant (VmHWM; in brackets, "
                  "the part above the RSS after importing the runtime's libraries).", ""]
    if result.get("device", "cpu") == "cuda":
        lines += gpu_table(result)
    else:
        for v in sorted({r["variant"] for r in result["speed"]} | {x["variant"] for x in result.get("memory", [])}):
            lines += variant_table(result, v)
        if result["floors"]:
            lines += floors_table(result["floors"], m)
        if result.get("first_answer"):
            lines += first_answer_table(result) + targets_table(result.get("targets", []))
        if result.get("training"):
            from .training import markdown as training_table

            lines += training_table(result["training"]) + [""]
    notes = {}
    for sk in result.get("skipped", []):
        notes.setdefault((sk["runtime"], sk["reason"]), []).append(sk["where"])
    for mm in result.get("memory", []):
        if "skipped" in mm:
            notes.setdefault((mm["runtime"], mm["skipped"]), []).append(f"memory, {mm['variant']}")
    if notes:
        lines += ["Not measured:", ""]
        lines += [f"- {RUNTIMES[k].label}: {why} ({where(w)})" for (k, why), w in notes.items()]
        lines.append("")
    if result.get("restricted"):
        lines += [result["restricted"], ""]
    return "\n".join(lines)


# -- chart ----------------------------------------------------------------------------------------------------

def chart(result: dict, path) -> bool:
    """Grouped bars: images/s at the floor batch per variant, one panel per thread setting, plus
    batch-1 latency; min-max whiskers. False when matplotlib is missing or nothing fits."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from shvit_numpy.weights import atomic_path

    rows = result["speed"]
    threads = sorted({r["threads"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    tb = 16 if 16 in batches else max(batches)
    panels = [(t, tb) for t in threads] + ([(threads[0], 1)] if 1 in batches and tb != 1 else [])
    variants = sorted({r["variant"] for r in rows})
    keys = [k for k in RUNTIMES if any(r["runtime"] == k for r in rows)]
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8.0, 5.5 * len(panels)), 5.4), squeeze=False)
    width = 0.8 / max(1, len(keys))
    for ax, (t, b) in zip(axes[0], panels):
        for i, key in enumerate(keys):
            xs, ys, lo, hi = [], [], [], []
            for j, v in enumerate(variants):
                row = find(rows, key, v, b, t)
                if row is None:
                    continue
                if b == 1:
                    s = row["seconds"]
                    mid, a, z = 1000 * s["median"], 1000 * s["min"], 1000 * s["max"]
                else:
                    tp = throughput(row)
                    mid, a, z = tp["median"], tp["min"], tp["max"]
                xs.append(j + (i - (len(keys) - 1) / 2) * width)
                ys.append(mid)
                lo.append(mid - a)
                hi.append(z - mid)
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=RUNTIMES[key].label, color=COLORS.get(key, "#999999"))
        ax.set_xticks(range(len(variants)), variants)
        ax.set_title(f"latency, batch 1, {cores(t)} (ms, lower is better)" if b == 1 else
                     f"throughput, batch {b}, {cores(t)} (images/s)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a runtime missing from the first panel still gets its legend entry
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    rows_of_legend = -(-len(labels) // 4)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    load = result.get("load_average") or {}
    busy = (load.get("before") or 0) > 0.5 * result["machine"]["cores"]
    note = " (BUSY machine: figures noisy and low)" if busy else ""
    stopped = " (interrupted run)" if result.get("interrupted") else ""
    fig.suptitle(f"SHViT on {result['machine']['cpu']} ({result['machine']['cores']} cores), {result['started'][:10]}: "
                 f"median, whiskers min–max{note}{stopped}", fontsize=10)
    fig.tight_layout(rect=(0, 0.045 * rows_of_legend + 0.02, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True
