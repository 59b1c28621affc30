#!/usr/bin/env bash
# The demo: set up, start deml-server (local backend, loopback; its dashboard on port 8000 or $DEML_HTTP_PORT),
# train the digits example across 4 workers for 5 rounds beside a centralized baseline, download the registered
# ONNX model, and serve predictions from it over gRPC and over the Open Inference Protocol's REST face.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate

work=$(mktemp -d "${TMPDIR:-/tmp}/deml-demo.XXXXXX")
deml-server --port 0 --http-port "${DEML_HTTP_PORT:-8000}" --data-dir "$work/server" --workers 4 \
    >"$work/server.out" 2>"$work/server.log" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 150); do
    grep -q "dashboard at" "$work/server.out" 2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; exit 1; }
    sleep 0.2
done
target=$(sed -n 's/^deml-server listening on //p' "$work/server.out" | head -n 1)
dashboard=$(sed -n 's/^deml-server dashboard at //p' "$work/server.out" | head -n 1)
echo "deml-server is up on $target (data in $work/server, log in $work/server.log)"
echo "dashboard at $dashboard (OIP REST under ${dashboard}v2/, Prometheus metrics at ${dashboard}metrics)"

deml-client --server "$target" train examples/digits --workers 4 --rounds 5 --baseline
deml-client --server "$target" models list
deml-client --server "$target" models download digits -o "$work/digits.onnx"
python - "$work" <<'PY'
import sys

import numpy as np

sys.path.insert(0, "examples/digits")
from task import load_data  # noqa: E402

(_, _), (x, y) = load_data()
np.save(f"{sys.argv[1]}/x.npy", np.repeat(x, 100, axis=0))  # 36,000 rows
np.save(f"{sys.argv[1]}/y_true.npy", np.repeat(y, 100))
PY
deml-client --server "$target" predict digits --input "$work/x.npy" --output "$work/y.npy"
python - "$work" <<'PY'
import sys

import numpy as np
import onnxruntime as ort

work = sys.argv[1]
x, served, truth = np.load(f"{work}/x.npy"), np.load(f"{work}/y.npy"), np.load(f"{work}/y_true.npy")
local = ort.InferenceSession(f"{work}/digits.onnx", providers=["CPUExecutionProvider"])
expected = local.run(None, {local.get_inputs()[0].name: x})[0]
print(f"served {len(served)} predictions: accuracy {(served.argmax(1) == truth).mean():.4f}, "
      f"max |served - local onnxruntime| = {np.abs(served - expected).max():.2e}")
PY
python - "$work" "$dashboard" <<'PY'
import json
import sys
import urllib.request

import numpy as np

work, dashboard = sys.argv[1:3]
x = np.load(f"{work}/x.npy")[:3]
body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
request = urllib.request.Request(f"{dashboard}v2/models/digits/infer", data=json.dumps(body).encode(), method="POST")
with urllib.request.urlopen(request) as answer:
    output = json.load(answer)["outputs"][0]
rest = np.array(output["data"], np.float32).reshape(output["shape"])
served = np.load(f"{work}/y.npy")[:3]
print(f"REST {dashboard}v2/models/digits/infer: classes {rest.argmax(1).tolist()} (gRPC: {served.argmax(1).tolist()})")
PY
