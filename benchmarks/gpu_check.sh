#!/usr/bin/env bash
# The GPU check (issue 13.4): GPU-only tests, attention at full shapes, bf16 training steps of
# transfusion-0.16b at seq 4096 (tokens/s, MFU, peak memory vs mtf-plan) and text->image
# sampling speed with the KV cache, into one JSON (benchmarks/gpu_check.py has the parts).
#
#   bash benchmarks/gpu_check.sh --out OUT/gpu_check.json          # one GPU, within 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/dry.json     # CPU, tiny shapes, seconds
#   bash benchmarks/gpu_check.sh --parts training,sampling ...     # some parts again
#
# What it assumes of the machine (the device machines of this workplace: see
# /work/.library/device/README.md and KINDS.md), and does about it:
# - No network: nothing is downloaded, ever.
# - A Python with PyTorch (CUDA) and the usual packages: the project's .venv if the copy has
#   one, else MTF_PYTHON, else `python3` (on the device machines the one holding PyTorch,
#   with numpy, pyyaml, pillow, safetensors, tokenizers, sentencepiece, pytest, triton).
# - This project is not installed there: the repository root goes on PYTHONPATH instead.
# - megatron-core is not there either: if it cannot be imported, the wheels in .whl/ are
#   installed with `pip install --no-index --no-deps` into a scratch directory. Fetch them
#   beforehand, where pip has a network: `bash benchmarks/gpu_check_wheels.sh` (.whl/ is
#   git-ignored; the device tool carries it when named in `carry`).
# A part that fails (or a package still missing) is recorded in the JSON with its error and
# the next part runs; the exit status is 1 if any part failed, after the JSON is written.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
PY="${MTF_PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        SITE="$(mktemp -d /tmp/mtf-site.XXXXXX)"
        echo "installing" .whl/*.whl "into $SITE (no index, no deps)"
        "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --target "$SITE" .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:$SITE"
    else
        echo "warning: megatron.core is not importable and .whl/ has no wheels; the parts that need it will fail" >&2
    fi
fi
exec "$PY" -m benchmarks.gpu_check "$@"
