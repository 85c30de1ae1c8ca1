"""``python -m docs.render`` (``make docs``): put each walkthrough's code and output on the page.

For every page (README.md and docs/*.md) it

* replaces each include marker, ``<!-- include: shvit_numpy/layers.py::FFN -->`` (a file, ``::``
  and a dotted name of a function, class or method in it), and the fenced block after it, with
  that definition's current source, so a reader on GitHub sees the implementation itself;
* runs the page's ```` ```python ```` blocks in order in one fresh interpreter (from the repository
  root, as a reader would paste them; blocks fenced ```` ```python no-run ```` are shown, not run),
  and writes what each block printed right after it, as a ```` ```text ```` block under an
  ``<!-- output -->`` marker (replacing the one there; none when a block prints nothing).

``tests/test_docs.py`` runs the same blocks once and fails when a page differs from what this
would write. Output lines that legitimately change between runs and machines (timings, temporary
paths, float rounding reports) are compared loosely: a line that matches a built-in pattern
(``VARYING``) is compared with its numbers and temporary paths masked, and a line that matches the
regex of a ``<!-- varies: REGEX -->`` comment placed right before the block (for output that
depends on the machine, such as its devices) only has to match it on both sides. HTML comments do
not show on GitHub.

    python -m docs.render                       # every page
    python -m docs.render docs/03-*.md          # some pages
    python -m docs.render --check               # report stale pages, write nothing (exit 1 if any)
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT_MARK = "<!-- output -->"
INCLUDE = re.compile(r"^<!-- include: (?P<target>\S+) -->\s*$")
VARIES = re.compile(r"^<!-- varies: (?P<regex>.+?) -->\s*$")
VARYING = [r"\d ?m?s\b", r"/tmp/", r"0x[0-9a-f]+", r"max \|"]  # timings, temporary paths, addresses, rounding
MASKS = [(re.compile(r"/tmp/\S*"), "<path>"),
         (re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"), "<n>")]
MAX_LINES = 40  # longer outputs are cut, with a line saying how many more there were
SEPARATOR = "\x1e--end of block--\x1e\n"
ENV = {"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONHASHSEED": "0"}


class RenderError(Exception):
    """A page that cannot be rendered: a broken marker, an unknown include, a failing block."""


@dataclass
class Block:
    """A fenced ```python block that runs, with the output block the page shows after it (if any)."""

    code: str
    line: int  # 1-based line of its opening fence
    varies: list[str] = field(default_factory=list)
    shown: list[str] | None = None  # the lines of the page's output block; None: the page has none


@dataclass
class Include:
    target: str
    line: int
    shown: list[str] | None  # the lines of the fenced block under the marker; None: not rendered yet


@dataclass
class Page:
    blocks: list[Block]
    includes: list[Include]


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fence_end(lines: list[str], start: int) -> int:
    """The index of the line closing the fence opened at ``lines[start]``."""
    for j in range(start + 1, len(lines)):
        if lines[j].strip() == "```":
            return j
    raise RenderError(f"line {start + 1}: a ``` fence that is never closed")


def scan(text: str):
    """Yield (kind, start, end, info) for the page's pieces, in order; ``end`` is exclusive.

    kinds: "python" (a runnable block; info = its code), "output" (a marker and its text block,
    with the blank line before it), "include" (a marker and its block, if any; info = the target),
    "varies" (info = the regex), "fence" (any other fenced block).
    """
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = fence_end(lines, i) + 1
            info = line[3:].strip().split()
            if info[:1] == ["python"] and "no-run" not in info:
                yield "python", i, end, "\n".join(lines[i + 1:end - 1]) + "\n"
            else:
                yield "fence", i, end, None
            i = end
        elif line.strip() == OUTPUT_MARK:
            if i + 1 >= len(lines) or lines[i + 1].strip() != "```text":
                raise RenderError(f"line {i + 1}: {OUTPUT_MARK} must be followed by a ```text block")
            start = i - 1 if i > 0 and not lines[i - 1].strip() else i
            yield "output", start, fence_end(lines, i + 1) + 1, None
            i = fence_end(lines, i + 1) + 1
        elif m := INCLUDE.match(line):
            end = fence_end(lines, i + 1) + 1 if i + 1 < len(lines) and lines[i + 1].startswith("```") else i + 1
            yield "include", i, end, m["target"]
            i = end
        elif m := VARIES.match(line):
            yield "varies", i, i + 1, m["regex"]
            i += 1
        else:
            i += 1


def parse(text: str) -> Page:
    lines = text.split("\n")
    page, varies, last = Page([], []), [], None
    for kind, start, end, info in scan(text):
        if kind == "python":
            last = Block(info, start + 1, varies)
            page.blocks.append(last)
            varies = []
            continue
        if kind == "output":
            if last is None:
                raise RenderError(f"line {start + 1}: an output block that follows no python block")
            last.shown = lines[start + (2 if not lines[start].strip() else 1) + 1:end - 1]
        elif kind == "include":
            page.includes.append(Include(info, start + 1, lines[start + 2:end - 1] if end - start > 1 else None))
        elif kind == "varies":
            varies.append(info)
            continue
        last = None
    return page


def source_of(target: str) -> list[str]:
    """The lines of ``path::Dotted.name`` (a top-level or nested def or class, decorators included)."""
    path, _, name = target.partition("::")
    file = ROOT / path
    if not file.is_file() or not name:
        raise RenderError(f"include {target!r}: expected an existing file, '::' and a name")
    text = file.read_text()
    body = ast.parse(text).body
    node = None
    for part in name.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            raise RenderError(f"include {target!r}: no {part!r} in {path}")
        body = node.body
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    code = textwrap.dedent("\n".join(text.split("\n")[first - 1:node.end_lineno]))
    return [f"# {path}: {name}", *code.split("\n")]


def run_blocks(blocks: list[Block], name: str, workdir: Path, timeout: float = 600) -> list[str]:
    """Run the blocks in order in one fresh interpreter from the repository root; each one's stdout.

    Raises RenderError naming the block that failed, with the end of its traceback.
    """
    files = []
    for k, b in enumerate(blocks, 1):
        f = workdir / f"{Path(name).stem}_block{k:02d}_line{b.line}.py"
        f.write_text(b.code)
        files.append(str(f))
    driver = workdir / "run_blocks.py"
    driver.write_text(textwrap.dedent(f"""\
        import sys
        import traceback
        scope = {{"__name__": "__main__", "__builtins__": __builtins__}}
        for k, f in enumerate({files!r}, 1):
            try:
                exec(compile(open(f).read(), f, "exec"), scope)
            except BaseException as e:
                sys.stdout.flush()
                traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the block's own frame
                sys.exit(100 + k)
            sys.stdout.flush()
            sys.stdout.write({SEPARATOR!r})
            sys.stdout.flush()
        """))
    r = subprocess.run([sys.executable, str(driver)], cwd=ROOT, capture_output=True, text=True, env=ENV,
                       timeout=timeout)
    outputs = r.stdout.split(SEPARATOR)
    if r.returncode != 0:
        k = r.returncode - 100 if 100 < r.returncode <= 100 + len(blocks) else len(outputs)
        where = f"block {k} (line {blocks[k - 1].line})" if k <= len(blocks) else "after the last block"
        raise RenderError(f"{name}: {where} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return outputs[:len(blocks)]


def output_lines(stdout: str) -> list[str]:
    """What the page shows for a block's stdout: lines right-stripped, trailing blanks dropped, long ones cut."""
    lines = [ln.rstrip() for ln in stdout.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if any(ln.startswith("```") for ln in lines):
        lines = [(" " + ln if ln.startswith("```") else ln) for ln in lines]
    if len(lines) > MAX_LINES:
        lines = [*lines[:MAX_LINES], f"... ({len(lines) - MAX_LINES} more lines)"]
    return lines


def masked(line: str) -> str:
    """The line with numbers and temporary paths masked, if it matches a VARYING pattern."""
    if not any(re.search(p, line) for p in VARYING):
        return line
    for rx, sub in MASKS:
        line = rx.sub(sub, line)
    return " ".join(line.split())  # a number one digit longer shifts a right-aligned column


def same_line(a: str, b: str, varies: list[str]) -> bool:
    return a == b or masked(a) == masked(b) or any(re.search(p, a) and re.search(p, b) for p in varies)


def first_difference(shown: list[str], fresh: list[str], varies: list[str]) -> str | None:
    """None when the page's lines match the fresh ones (varying lines loosely), else a description."""
    for n, (a, b) in enumerate(zip(shown, fresh), 1):
        if not same_line(a, b, varies):
            return f"output line {n}: the page has {a!r}, the code prints {b!r}"
    if len(shown) != len(fresh):
        n = min(len(shown), len(fresh)) + 1
        extra = fresh[n - 1] if len(fresh) > len(shown) else shown[n - 1]
        return (f"output line {n}: the page shows {len(shown)} lines, the code prints {len(fresh)} "
                f"(first unmatched: {extra!r})")
    return None


def stale_includes(name: str, page: Page) -> list[str]:
    problems = []
    for inc in page.includes:
        fresh = source_of(inc.target)
        if inc.shown is None:
            problems.append(f"{name}: include {inc.target} (line {inc.line}) is not rendered")
        elif inc.shown != fresh:
            n = next((i for i, (a, b) in enumerate(zip(inc.shown, fresh)) if a != b), min(len(inc.shown), len(fresh)))
            a = inc.shown[n] if n < len(inc.shown) else "<end>"
            b = fresh[n] if n < len(fresh) else "<end>"
            problems.append(f"{name}: include {inc.target} (line {inc.line}) differs from the source at its "
                            f"line {n + 1}: the page has {a!r}, the source {b!r}")
    return problems


def stale_outputs(name: str, page: Page, outputs: list[str]) -> list[str]:
    problems = []
    for k, (b, out) in enumerate(zip(page.blocks, outputs), 1):
        fresh = output_lines(out)
        where = f"{name}: block {k} (line {b.line})"
        if b.shown is None:
            if fresh:
                problems.append(f"{where} prints {len(fresh)} lines the page does not show (first: {fresh[0]!r})")
        elif not fresh:
            problems.append(f"{where} prints nothing, but the page shows an output block")
        elif d := first_difference(b.shown, fresh, b.varies):
            problems.append(f"{where}, {d}")
    return problems


def rendered(text: str, outputs: list[str]) -> str:
    """The page with fresh includes and with each runnable block followed by its fresh output.

    An output the page already shows is kept where it matches the fresh one loosely (a timing that
    moved, say), so that rendering twice changes nothing."""
    lines = text.split("\n")
    blocks = parse(text).blocks
    out: list[str] = []
    pos, k = 0, 0
    for kind, start, end, info in scan(text):
        out.extend(lines[pos:start])
        pos = end
        if kind == "python":
            out.extend(lines[start:end])
            fresh, shown = output_lines(outputs[k]), blocks[k].shown
            if shown and fresh and first_difference(shown, fresh, blocks[k].varies) is None:
                fresh = shown
            k += 1
            if fresh:
                out.extend(["", OUTPUT_MARK, "```text", *fresh, "```"])
        elif kind == "include":
            out.extend([lines[start], "```python", *source_of(info), "```"])
        elif kind != "output":
            out.extend(lines[start:end])
    out.extend(lines[pos:])
    return "\n".join(out)


def render(path: Path) -> bool:
    """Rewrite one page in place (atomically); True if it changed."""
    from shvit_numpy.weights import atomic_path

    before = path.read_text()
    page = parse(before)
    for inc in page.includes:
        source_of(inc.target)  # an unknown target fails before the (slow) run
    with tempfile.TemporaryDirectory() as tmp:
        outputs = run_blocks(page.blocks, path.name, Path(tmp)) if page.blocks else []
    now = path.read_text()
    if now != before and [b.code for b in parse(now).blocks] != [b.code for b in page.blocks]:
        raise RenderError(f"{path.name}: its code changed while it ran; run make docs again")
    new = rendered(now, outputs)
    if new == now:
        return False
    with atomic_path(path) as tmp:
        Path(tmp).write_text(new)
    return True


def check(path: Path) -> list[str]:
    """Everything stale on one page (runs its blocks once)."""
    page = parse(path.read_text())
    problems = stale_includes(path.name, page)
    with tempfile.TemporaryDirectory() as tmp:
        outputs = run_blocks(page.blocks, path.name, Path(tmp)) if page.blocks else []
    return problems + stale_outputs(path.name, page, outputs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m docs.render", description=__doc__.splitlines()[0])
    p.add_argument("pages", nargs="*", type=Path, help="default: README.md and docs/*.md")
    p.add_argument("--check", action="store_true", help="report stale pages and write nothing")
    args = p.parse_args(argv)
    bad = 0
    for path in [q.resolve() for q in args.pages] or pages():
        try:  # one broken page does not stop the others
            if not path.is_file():
                raise RenderError(f"{path}: no such page")
            if args.check:
                problems = check(path)
                bad += bool(problems)
                print("\n".join(problems) or f"{path.name}: current")
            else:
                print(f"{path.name}: {'rewritten' if render(path) else 'current'}", flush=True)
        except RenderError as e:
            bad += 1
            print(f"python -m docs.render: error: {e}", file=sys.stderr, flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
