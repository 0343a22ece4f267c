#!/usr/bin/env bash
# The GPU check on a machine without noisymix installed: map the four folders onto the `noisymix` package
# (as pyproject.toml does) and run benchmarks/gpu_check.py. Needs torch, numpy, Pillow, PyYAML,
# scikit-learn, webdataset; faiss (GPU build) for the index part, which is skipped and said so without it.
#
# GPU_CHECK_WHEELS=DIR installs the wheels in DIR first (into a temporary folder, offline): what the GPU
# machine lacks (webdataset, braceexpand, nvidia-cuda-runtime-cu12; faiss-gpu too, or put it on PYTHONPATH).
# cuBLAS 12 is 400+ MB of wheels and cannot travel there; where it is missing and PyTorch's cuBLAS 13 is
# present, FAISS's eight cuBLAS calls go to cuBLAS 13 through benchmarks/cublas12_shim.c, placed where
# faiss-gpu's loader looks for the nvidia-cublas-cu12 wheel (the report names the library used).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/noisymix"
for folder in selection mixing distributed launch; do ln -s "$repo/$folder" "$shim/noisymix/$folder"; done
pythonpath="$shim"
if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$shim/site" "$GPU_CHECK_WHEELS"/*.whl
    pythonpath="$pythonpath:$shim/site"
    if [[ -d "$shim/site/nvidia/cuda_runtime/lib" ]]; then
        export LD_LIBRARY_PATH="$shim/site/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        # faiss-gpu-cu12's loader looks cuBLAS 12 up among installed wheels; here the library path has it
        export _FAISS_WHEEL_DISABLE_CUDA_PRELOAD=1
    fi
    if [[ "$(ldconfig -p)" != *"libcublas.so.12 "* ]]; then
        sites="$(python3 -c 'import site; print(" ".join(site.getsitepackages()))')"
        # shellcheck disable=SC2086  # several folders, split on purpose
        cublas13="$(find $sites /usr/local/cuda*/ -name libcublas.so.13 -print -quit 2>/dev/null || true)"
        if [[ -n "$cublas13" ]]; then
            lib="$shim/site/nvidia/cublas/lib"
            mkdir -p "$lib" "$shim/site/nvidia/curand/lib"
            cc -O2 -fPIC -shared -DCUBLAS13="\"$cublas13\"" -Wl,-soname,libcublas.so.12 \
                -Wl,--version-script="$repo/benchmarks/cublas12_shim.map" -o "$lib/libcublas.so.12" \
                "$repo/benchmarks/cublas12_shim.c" -ldl
            # FAISS names cuBLASLt 12 and its wheel cuRAND 10 as needed but calls neither: empty libraries answer
            cc -shared -fPIC -Wl,-soname,libcublasLt.so.12 -o "$lib/libcublasLt.so.12" -x c /dev/null
            cc -shared -fPIC -Wl,-soname,libcurand.so.10 -o "$shim/site/nvidia/curand/lib/libcurand.so.10" \
                -x c /dev/null
            export LD_LIBRARY_PATH="$lib:$LD_LIBRARY_PATH" GPU_CHECK_CUBLAS13="$cublas13"
        fi
    fi
fi
PYTHONPATH="$pythonpath${PYTHONPATH:+:$PYTHONPATH}" timeout 480 python3 "$repo/benchmarks/gpu_check.py" "$@"
