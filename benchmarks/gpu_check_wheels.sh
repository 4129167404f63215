#!/usr/bin/env bash
# Wheels the GPU check needs that the device machines lack (no network there), fetched here
# into .whl/ for the device tool to carry: megatron-core for the device's Python (3.12,
# x86-64). Everything else it imports is in their image (/work/.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl megatron-core==0.16.1
ls -l .whl
