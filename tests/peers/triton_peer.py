"""Runs inside .venv-peers (tritonclient, not DeML): talks to a deml-server like to any Triton/KServe server.

Usage: python triton_peer.py HOST:PORT X.npy Y.npy; prints one JSON object with what it saw.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def main() -> None:
    url, x_path, y_path = sys.argv[1:4]
    client = triton.InferenceServerClient(url=url)
    report = {
        "server_live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("digits"),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "metadata": client.get_model_metadata("digits", as_json=True),
    }
    x = np.load(x_path)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("digits", [tensor], outputs=[triton.InferRequestedOutput("output")])
    np.save(y_path, result.as_numpy("output"))

    wrong = triton.InferInput("input", [2, 64], "FP64")
    wrong.set_data_from_numpy(np.zeros((2, 64), np.float64))
    try:
        client.infer("digits", [wrong])
        report["wrong_dtype"] = "accepted"
    except InferenceServerException as exc:
        report["wrong_dtype"] = f"{exc.status()} {exc.message()}"
    try:
        client.infer("no-such-model", [tensor])
        report["unknown_model"] = "accepted"
    except InferenceServerException as exc:
        report["unknown_model"] = f"{exc.status()} {exc.message()}"
    print(json.dumps(report))


if __name__ == "__main__":
    main()
