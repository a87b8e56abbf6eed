#!/usr/bin/env bash
# Compile the C++/CUDA sources against another torch's headers (default 2.11.0, the
# GPU machine's), without installing it: downloads the wheel, unpacks include/ only.
#   scripts/check_torch_compat.sh [TORCH_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-2.11.0}
WORK=${WORK:-/tmp/curvx-torch-$VERSION}
VENV=${VENV:-.venv}
mkdir -p "$WORK"
if [ ! -d "$WORK/ext/torch/include" ]; then
    "$VENV/bin/pip" download -q --no-deps "torch==$VERSION" -d "$WORK"
    unzip -q -o "$WORK"/torch-"$VERSION"-*.whl 'torch/include/*' -d "$WORK/ext"
fi
INC="$WORK/ext/torch/include"
PYINC=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
FLAGS=(-std=c++17 -I"$INC" -I"$INC/torch/csrc/api/include" -I"$PYINC" -D_GLIBCXX_USE_CXX11_ABI=1)
for f in csrc/ops.cpp csrc/cpu/*.cpp; do
    g++ -fsyntax-only -fopenmp "${FLAGS[@]}" "$f"
    echo "ok: $f against torch $VERSION"
done
if [ -x /usr/local/cuda/bin/nvcc ]; then
    for f in csrc/cuda/*.cu; do
        /usr/local/cuda/bin/nvcc -arch=sm_90 -DCURVX_WITH_CUDA "${FLAGS[@]}" \
            -c "$f" -o "$WORK/$(basename "$f" .cu).o"
        echo "ok: $f against torch $VERSION"
    done
fi
