#!/usr/bin/env bash
# Wheels for bench/gpu.sh's ZeRO rows on a GPU machine that has torch but no deepspeed
# (the lent H200 machine: python 3.12, no access to PyPI).
#
#   bench/gpu-wheels.sh             # here (PyPI reachable): fills build/wheels/, which git ignores
#   bench/gpu-wheels.sh --install   # there: installs them into /tmp/site (no index, no deps)
#
# Carry build/wheels with the call that runs bench/gpu.sh there; gpu.sh runs the --install step
# itself when deepspeed is not importable and build/wheels exists. DeepSpeed 0.19.8 builds as a
# pure-Python wheel (its CUDA ops compile on first use, and the ZeRO rows need none); pydantic's
# compiled core is fetched for CPython 3.12 on manylinux2014 x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=build/wheels
if [ "${1:-}" = --install ]; then
  pip install --quiet --no-index --no-deps --target /tmp/site "$dir"/*.whl
  exit
fi
mkdir -p "$dir"
pip wheel --quiet --no-deps --no-build-isolation -w "$dir" deepspeed==0.19.8
pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  -d "$dir" pydantic pydantic-core annotated-types typing-inspection hjson
ls -1 "$dir"
