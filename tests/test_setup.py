"""scripts/system-packages.sh, which `make install` (so `make demo` and `make test`) runs first on a
bare machine: with apt-get stand-ins (nothing is installed for real) it installs what is
missing as root, uses sudo when it may, and otherwise stops at once with the one command to run.
"""
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "system-packages.sh"
STUBS = {
    # apt-get records its arguments; "installing" makes the stand-in compiler and PoCL's ICD file appear
    "apt-get": 'echo "apt-get $*" >> "$LOG"; case "$*" in *install*) printf "#!/bin/sh\\n" > "$BIN/fake-clang";'
               ' chmod +x "$BIN/fake-clang"; touch "$OCL_ICD_VENDORS/pocl.icd";; esac',
    "dpkg": "exit 1",  # nothing installed as far as dpkg knows
}


def run(tmp_path, uid: int, sudo: bool, have: bool = False):
    bin_, vendors = tmp_path / "bin", tmp_path / "vendors"
    bin_.mkdir(exist_ok=True)
    vendors.mkdir(exist_ok=True)
    stubs = dict(STUBS, id=f"echo {uid}")
    if sudo:
        stubs["sudo"] = '[ "$1" = -n ] && shift; echo "sudo $1" >> "$LOG"; "$@"'
    for name, body in stubs.items():
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    if have:
        (bin_ / "fake-clang").write_text("#!/bin/sh\n")
        (bin_ / "fake-clang").chmod(0o755)
        (vendors / "pocl.icd").touch()
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "CC": "fake-clang", "OCL_ICD_VENDORS": str(vendors), "BIN": str(bin_),
           "LOG": str(tmp_path / "log")}
    if not sudo and Path("/usr/bin/sudo").exists():
        pytest.skip("this machine has a real sudo on PATH")
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    log = (tmp_path / "log").read_text() if (tmp_path / "log").exists() else ""
    return r, log


def test_nothing_missing_does_nothing(tmp_path):
    r, log = run(tmp_path, uid=1000, sudo=False, have=True)
    assert r.returncode == 0 and log == "" and r.stderr == ""


def test_root_installs_both_packages(tmp_path):
    r, log = run(tmp_path, uid=0, sudo=False)
    assert r.returncode == 0, r.stderr
    assert "apt-get update" in log and "install -y -qq clang pocl-opencl-icd" in log and "sudo" not in log


def test_a_user_with_sudo_installs_through_it(tmp_path):
    r, log = run(tmp_path, uid=1000, sudo=True)
    assert r.returncode == 0, r.stderr
    assert "sudo apt-get" in log and "install -y -qq clang pocl-opencl-icd" in log


def test_a_user_without_sudo_gets_the_one_command(tmp_path):
    r, log = run(tmp_path, uid=1000, sudo=False)
    assert r.returncode == 1 and log == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith("run:  sudo apt-get install -y clang pocl-opencl-icd"), r.stderr
