"""Runs inside .venv-peers (tritonclient, not DeML): talks to a deml-server like to any Triton/KServe server.

Usage: python triton_peer.py HOST:PORT X.npy Y.npy; prints one JSON object with what it saw.
"""

import json
import os
import sys

import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException


def shared_memory_round_trip(client: triton.InferenceServerClient, x: np.ndarray, y_path: str) -> dict:
    """Inputs and outputs through system shared memory, the way Triton's own examples do it."""
    in_bytes, out_bytes = x.nbytes, x.shape[0] * 10 * 4
    key = f"/deml_peer_{os.getpid()}"
    handle = shm.create_shared_memory_region("deml_peer_data", key, in_bytes + out_bytes)
    try:
        shm.set_shared_memory_region(handle, [x])
        client.unregister_system_shared_memory()
        client.register_system_shared_memory("deml_peer_data", key, in_bytes + out_bytes)
        status = client.get_system_shared_memory_status(as_json=True)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_shared_memory("deml_peer_data", in_bytes)
        output = triton.InferRequestedOutput("output")
        output.set_shared_memory("deml_peer_data", out_bytes, offset=in_bytes)
        result = client.infer("digits", [tensor], outputs=[output])
        shape = [int(d) for d in result.get_output("output").shape]
        np.save(y_path, shm.get_contents_as_numpy(handle, np.float32, shape, offset=in_bytes))
        client.unregister_system_shared_memory("deml_peer_data")
        after = client.get_system_shared_memory_status(as_json=True)
    finally:
        shm.destroy_shared_memory_region(handle)
    return {"shm_status": status, "shm_output_shape": shape, "shm_status_after": after}


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

    report["extensions"] = client.get_server_metadata(as_json=True).get("extensions", [])
    report.update(shared_memory_round_trip(client, x, y_path.replace(".npy", "-shm.npy")))

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
