#!/usr/bin/env bash
# Fill <repo>/wheels/ (git-ignored) with the wheels bench/gpu.sh installs on a bare GPU machine
# that cannot reach a package registry. That machine (see bench/README.md, "GPU") has Python
# 3.12 with PyTorch, torchvision, numpy, h5py, typer, rich and setuptools, but not kornia.
# kornia needs kornia-rs (compiled: one wheel per Python version), numpy and torch >= 2.5.1.
#
#   bash bench/fetch_wheels.sh                 # for CPython 3.12 on x86-64 Linux
#   PY_VERSION=3.11 bash bench/fetch_wheels.sh # another Python
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dest="$repo/wheels"
py_version="${PY_VERSION:-3.12}"
kornia="${KORNIA_VERSION:-0.9.0}"
kornia_rs="${KORNIA_RS_VERSION:-0.2.0}"
mkdir -p "$dest"
# Platform tags: pip matches each exactly, so name the manylinux levels the wheels are built for.
python3 -m pip download --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$dest" "kornia==$kornia" "kornia-rs==$kornia_rs"
ls -l "$dest"
