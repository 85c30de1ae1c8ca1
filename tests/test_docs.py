"""Every ```python block of README.md and docs/*.md runs (``make docs-test``; part of ``make test``).

The blocks of one file run in order in one fresh interpreter, as a reader would paste them,
from the repository root. A block fenced as ```python no-run is shown, not run (for commands
that need hardware or files this machine lacks); use it sparingly.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[ \t]*(?P<flags>[^\n]*)\n(?P<code>.*?)^```", re.M | re.S)


def python_blocks(path: Path) -> list[str]:
    return [m["code"] for m in BLOCK.finditer(path.read_text()) if "no-run" not in m["flags"]]


def test_docs_exist_and_have_code():
    assert (ROOT / "README.md").is_file()
    assert sum(len(python_blocks(p)) for p in FILES) > 0


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_code_blocks_run(path, tmp_path):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    script = "\n\n".join(f"# --- block {i + 1} of {path.name}\n{code}" for i, code in enumerate(blocks))
    (tmp_path / "doc.py").write_text(script)
    r = subprocess.run([sys.executable, str(tmp_path / "doc.py")], cwd=ROOT, capture_output=True, text=True,
                       env={"MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}, timeout=600)
    assert r.returncode == 0, f"{path.name}: a code block failed:\n{r.stderr[-3000:]}"
