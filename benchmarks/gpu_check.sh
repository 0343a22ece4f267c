#!/usr/bin/env bash
# The GPU check on a machine without noisymix installed: map the four folders onto the `noisymix` package
# (as pyproject.toml does) and run benchmarks/gpu_check.py. Needs torch, numpy, Pillow, PyYAML,
# scikit-learn, webdataset; faiss (GPU build) for the index part, which is skipped and said so without it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shim="$(mktemp -d)"
mkdir -p "$shim/noisymix"
for folder in selection mixing distributed launch; do ln -s "$repo/$folder" "$shim/noisymix/$folder"; done
PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" timeout 480 python3 "$repo/benchmarks/gpu_check.py" "$@"
