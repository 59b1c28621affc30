#!/usr/bin/env bash
# Creates .venv with DeML and its development tools, and buf in .tools/. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a CPU wheel here.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,golem,examples]"

# buf (protobuf lint and breaking-change checks) ships its binary inside an npm package.
if [ ! -x .tools/node_modules/.bin/buf ]; then
    mkdir -p .tools
    npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0
fi
# The dashboard's browser tests drive Debian's chromium through Playwright (`playwright install` cannot download
# browsers here); installed only when missing and we may (root with apt).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
# The local backend runs user code in a bubblewrap sandbox (deml_server/sandbox.py); setpriv is util-linux's.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null
fi
echo "setup done: $(python --version), torch $(python -c 'import torch; print(torch.__version__)'), buf $(.tools/node_modules/.bin/buf --version)"
