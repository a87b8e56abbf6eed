#!/usr/bin/env bash
# Set up curvx on a fresh machine: a venv with torch, the Fashion-MNIST data where apt
# can install it, and an editable install that compiles the C++/CUDA extension.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q torch==2.14.1 torchvision==0.29.1
"$PIP" install -q setuptools wheel numpy tqdm matplotlib scikit-learn \
    pytest pytest-benchmark scipy ruff clang-format

# Fashion-MNIST (the paper's data set) from Debian's package, where apt is available
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
    if ! { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }; then
        echo "setup: could not install dataset-fashion-mnist with apt; use" \
             "'curvx train --data-dir DIR' or '--dataset digits'" >&2
    fi
fi

# The extension compiles against the torch installed above (no build isolation)
"$PIP" install -q --no-build-isolation -e .
"$VENV/bin/python" -m curvx.info
