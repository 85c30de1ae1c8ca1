"""Every ```python block of README.md and docs/*.md runs, and every page is current (``make docs-test``).

The blocks of one page run once, in order, in one fresh interpreter from the repository root, as a
reader would paste them (``docs.render.run_blocks``). A block fenced as ```python no-run is shown,
not run (for commands that need hardware or files this machine lacks); use it sparingly. From that
same run, each block's printed output must be what the page shows under it, and every
``<!-- include: file::name -->`` must show that definition's current source: ``make docs`` rewrites
both. Cost: one run of each page's blocks, as before (about 45 s in all on a 2-core machine).
"""
import re

import pytest

from docs import render

FILES = render.pages()
CHAPTERS = [p for p in FILES if re.match(r"0[1-7]-", p.name)]
HINT = "\nrun make docs (python -m docs.render) to rewrite the page from the code"


def test_docs_exist_and_have_code():
    assert (render.ROOT / "README.md").is_file()
    assert sum(len(render.parse(p.read_text()).blocks) for p in FILES) > 0


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_includes_are_current(path):
    problems = render.stale_includes(path.name, render.parse(path.read_text()))
    assert not problems, "\n".join(problems) + HINT


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_code_blocks_run_and_outputs_are_current(path, tmp_path):
    page = render.parse(path.read_text())
    if not page.blocks:
        pytest.skip(f"{path.name} has no python blocks")
    try:
        outputs = render.run_blocks(page.blocks, path.name, tmp_path)
    except render.RenderError as e:
        pytest.fail(str(e), pytrace=False)
    problems = render.stale_outputs(path.name, page, outputs)
    assert not problems, "\n".join(problems) + HINT


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.name for p in CHAPTERS])
def test_chapter_says_what_it_teaches_and_ends_with_checked_exercises(path):
    """Opens with a 'What you will learn' note; ends with 2-3 exercises, each a hidden solution that asserts."""
    text = path.read_text()
    head = text.split("\n## ", 1)[0]
    assert "**What you will learn:**" in head, f"{path.name}: no '**What you will learn:**' before its first section"
    assert "\n## Exercises\n" in text, f"{path.name}: no '## Exercises' section"
    exercises = text.split("\n## Exercises\n", 1)[1]
    assert "\n## " not in exercises, f"{path.name}: the exercises are not the last section"
    solutions = re.findall(r"<details>(.*?)</details>", exercises, re.S)
    assert 2 <= len(solutions) <= 3, f"{path.name}: {len(solutions)} exercise solutions, expected 2 or 3"
    for n, s in enumerate(solutions, 1):
        blocks = render.parse(s).blocks
        assert blocks and any(re.search(r"\bassert", b.code) for b in blocks), \
            f"{path.name}: exercise {n}'s solution has no runnable python block that asserts its answer"


def test_stale_pages_are_caught(tmp_path):
    """The checks themselves: a changed output, a missing one and an outdated include are each reported."""
    page = ("```python\nprint('a')\nprint(1.5, 'ms')\n```\n\n<!-- output -->\n```text\na\n9.9 ms\n```\n\n"
            "<!-- include: docs/render.py::masked -->\n```python\n# docs/render.py: masked\nold\n```\n")
    parsed = render.parse(page)
    assert render.stale_outputs("p.md", parsed, ["a\n1.5 ms\n"]) == []  # a timing: loose
    [changed] = render.stale_outputs("p.md", parsed, ["b\n1.5 ms\n"])
    assert "block 1 (line 1)" in changed and "'a'" in changed and "'b'" in changed
    assert render.stale_outputs("p.md", render.parse("```python\nprint(1)\n```\n"), ["1\n"])
    [inc] = render.stale_includes("p.md", parsed)
    assert "docs/render.py::masked" in inc and "'old'" in inc
    fresh = render.rendered(page, ["b\n1.5 ms\n"])
    assert render.stale_includes("p.md", render.parse(fresh)) == []
    assert render.stale_outputs("p.md", render.parse(fresh), ["b\n1.5 ms\n"]) == []
    assert render.rendered(fresh, ["b\n1.5 ms\n"]) == fresh  # rendering is idempotent
    assert render.rendered(fresh, ["b\n2.5 ms\n"]) == fresh  # and keeps a timing that moved
    machine = render.parse("<!-- varies: ^devices: -->\n```python\nx\n```\n\n<!-- output -->\n```text\ndevices: CPU\n```\n")
    assert render.stale_outputs("p.md", machine, ["devices: CPU, CL\n"]) == []
    assert render.stale_outputs("p.md", machine, ["device list: CPU\n"])
    blocks = render.parse("```python\nx = 1\n```\n\n```python\n1 / 0\n```\n").blocks
    with pytest.raises(render.RenderError, match=r"(?s)block 2 \(line 5\) failed.*ZeroDivisionError"):
        render.run_blocks(blocks, "p.md", tmp_path)


def test_a_timing_one_digit_longer_is_still_the_same_line():
    from docs.render import same_line

    assert same_line("second (JIT capture)          4.5 ms", "second (JIT capture)         14.0 ms", [])
    assert not same_line("accuracy 0.889", "accuracy 0.890", [])  # not a timing: compared exactly
