"""Runs inside .venv-peers (tritonclient, not DeML): talks to deml-server's REST face like to any Triton server.

Usage: python triton_http_peer.py HOST:PORT X.npy OUT_DIR; prints one JSON object with what it saw and saves the
outputs of each kind of call (binary tensors, JSON tensors, no outputs named) into OUT_DIR.
"""

import json
import sys

import numpy as np
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException


def infer(client: triton.InferenceServerClient, x: np.ndarray, *, binary: bool, name_output: bool = True) -> tuple:
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton.InferRequestedOutput("output", binary_data=binary)] if name_output else None
    result = client.infer("digits", [tensor], outputs=outputs, request_id="peer-1")
    return result.as_numpy("output"), result.get_response()


def error_of(call) -> str:
    try:
        call()
    except InferenceServerException as exc:
        return f"{exc.status()} {exc.message()}"
    return "accepted"


def main() -> None:
    url, x_path, out_dir = sys.argv[1:4]
    client = triton.InferenceServerClient(url=url)
    report = {
        "server_live": client.is_server_live(),
        "server_ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("digits"),
        "unknown_model_ready": client.is_model_ready("no-such-model"),
        "metadata": client.get_model_metadata("digits"),
        "server_metadata": client.get_server_metadata(),
    }
    x = np.load(x_path)
    binary, binary_response = infer(client, x, binary=True)
    as_json, json_response = infer(client, x, binary=False)
    unnamed, _ = infer(client, x, binary=True, name_output=False)
    np.save(f"{out_dir}/binary.npy", binary)
    np.save(f"{out_dir}/json.npy", as_json)
    np.save(f"{out_dir}/unnamed.npy", unnamed)
    report["binary_response"] = binary_response
    report["json_response_outputs"] = [
        {k: v for k, v in output.items() if k != "data"} for output in json_response["outputs"]
    ]

    wrong = triton.InferInput("input", [2, 64], "FP64")
    wrong.set_data_from_numpy(np.zeros((2, 64), np.float64))
    report["statistics"] = client.get_inference_statistics("digits")
    report["wrong_dtype"] = error_of(lambda: client.infer("digits", [wrong]))
    good = triton.InferInput("input", [2, 64], "FP32")
    good.set_data_from_numpy(x[:2])
    report["unknown_model"] = error_of(lambda: client.infer("no-such-model", [good]))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
