"""Does the equivalence suite catch real bugs? ``python -m tests.plant_bugs``

For each runtime it plants three bugs, one at a time, in a scratch copy of the repository:
the wrong attention scale, one residual connection dropped, q and k swapped. It then runs
tests/test_equivalence.py on that copy and reports which test failed first. Every planted bug
must be caught; the script exits 1 if one is not. (Slow: minutes per bug; not part of make test.)
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (runtime, bug, file, text, replacement): each replacement must apply exactly once.
BUGS = [
    ("torch", "attention scale", "shvit_torch/layers.py", "self.scale = qk_dim ** -0.5", "self.scale = pdim ** -0.5"),
    ("torch", "drop FFN residual", "shvit_torch/layers.py", "return self.ffn(self.mixer(self.conv(x)))",
     "return self.ffn.m(self.mixer(self.conv(x)))"),
    ("torch", "swap q and k", "shvit_torch/layers.py", "q, k, v = torch.split(", "k, q, v = torch.split("),
    ("numpy", "attention scale", "shvit_numpy/layers.py", "np.float32(qk_dim ** -0.5)", "np.float32(pdim ** -0.5)"),
    ("numpy", "drop FFN residual", "shvit_numpy/layers.py", "        return self.ffn(x)\n", "        return self.ffn.m(x)\n"),
    ("numpy", "swap q and k", "shvit_numpy/layers.py", "q, k, v = np.split(", "k, q, v = np.split("),
    ("tiny", "attention scale", "shvit_tiny/layers.py", "self.scale = qk_dim ** -0.5", "self.scale = pdim ** -0.5"),
    ("tiny", "drop FFN residual", "shvit_tiny/layers.py", "        return self.ffn(x)\n", "        return self.ffn.m(x)\n"),
    ("tiny", "swap q and k", "shvit_tiny/layers.py", "q, k, v = qkv[:, :self.qk_dim], qkv[:, self.qk_dim:2 * self.qk_dim]",
     "k, q, v = qkv[:, :self.qk_dim], qkv[:, self.qk_dim:2 * self.qk_dim]"),
]


def copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def main() -> int:
    missed = 0
    for runtime, bug, rel, old, new in BUGS:
        with tempfile.TemporaryDirectory() as d:
            copy_repo(Path(d))
            path = Path(d) / rel
            text = path.read_text()
            assert text.count(old) == 1, f"{rel}: the text to mutate for '{bug}' is not there exactly once"
            path.write_text(text.replace(old, new))
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_equivalence.py"],
                               cwd=d, capture_output=True, text=True,
                               env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HYPOTHESIS_PROFILE": "plant"})
            failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in r.stdout.splitlines() if line.startswith("FAILED")]
            caught = r.returncode == 1 and failed
            missed += not caught
            verdict = f"CAUGHT by {failed[0]}" if caught else f"NOT CAUGHT (exit {r.returncode})"
            print(f"{runtime:6s} {bug:18s} {verdict}", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
