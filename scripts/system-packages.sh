#!/usr/bin/env bash
# tinygrad's CPU device compiles C with clang; its OpenCL device runs here on PoCL. `make install`
# (and so `make demo` and `make test`) runs this first: it installs what is missing with apt-get
# (through sudo when not root), or stops at once with the one command to run. Nothing else is touched.
set -euo pipefail
PKGS="clang pocl-opencl-icd"

have_clang() { command -v "${CC:-clang}" >/dev/null 2>&1; }
have_pocl() { dpkg -s pocl-opencl-icd >/dev/null 2>&1 || ls "${OCL_ICD_VENDORS:-/etc/OpenCL/vendors}"/*pocl* >/dev/null 2>&1; }

if [ "$(uname -s)" = "Darwin" ]; then  # macOS: Apple's clang, and Metal/OpenCL come with the system
  have_clang || { echo "shvit: tinygrad's CPU device needs clang: run  xcode-select --install" >&2; exit 1; }
  exit 0
fi
have_clang && have_pocl && exit 0

missing=""
have_clang || missing=" clang"  # each name with its leading space: "installing clang pocl-opencl-icd"
have_pocl || missing="$missing pocl-opencl-icd"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "shvit: tinygrad's CPU and OpenCL devices need:$missing (install them with your package manager), then run make again" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then SUDO=""
elif command -v sudo >/dev/null 2>&1 && { [ -t 0 ] || sudo -n true 2>/dev/null; }; then SUDO="sudo"
else
  echo "shvit: tinygrad's CPU and OpenCL devices need system packages; run:  sudo apt-get install -y $PKGS" >&2
  exit 1
fi
echo "shvit: installing$missing for tinygrad's CPU and OpenCL devices (apt-get)..." >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $PKGS >/dev/null
have_clang && have_pocl || { echo "shvit: apt-get ran but$missing is still missing; run:  sudo apt-get install -y $PKGS" >&2; exit 1; }
