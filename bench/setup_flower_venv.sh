#!/usr/bin/env bash
# Creates bench/.venv-flower: Flower's simulation engine (flwr + Ray) for the training benchmark's peer run.
# It is a venv of its own because flwr needs protobuf < 7, which DeML's generated code does not accept.
# Safe to run again; bench/bench_training.py calls it when the venv is missing.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv-flower
# 1.42.0 needs certifi>=2026.10.19, which the package index here does not have; 1.41.0 installs.
FLWR_VERSION=${FLWR_VERSION:-1.41.0}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a CPU wheel here (the
# same torch as DeML's .venv, so both sides train with the same kernels).
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q "flwr[simulation]==${FLWR_VERSION}" scikit-learn numpy psutil mlxtend
"$VENV/bin/python" - <<'EOF'
import flwr, ray, torch, sklearn
print(f"flower venv ready: flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}, "
      f"scikit-learn {sklearn.__version__}")
EOF
