"""HTTP benchmark: the Open Inference Protocol's REST face against in-process onnxruntime and the gRPC paths.

Latency: 1-row requests of the digits MLP, p50/p99 over --requests calls each: in-process `InferenceSession.run`,
REST with a JSON tensor (what curl sends), REST with Triton's binary tensor extension (what tritonclient.http
sends), each over one kept-alive connection; overhead = REST minus in-process.
Throughput: --rows rows (65,536 by default, 16 MiB of inputs) through REST with binary tensors against the gRPC
message paths: `DemlClient.predict(..., shared_memory=False)` (deml.v1, streamed messages) and one OIP
`ModelInfer` with raw_input_contents (what tritonclient.grpc sends); median of --repeats runs, measured
alternately so that load from other processes hits every side alike. Ratio > 1: REST is faster. REST is
measured twice: one request of all the rows, and --concurrent requests of an equal part of them at once (each on
its own connection), as a REST client that wants its transfers to overlap with compute can send them.
The REST client sends the JSON header and the array's own buffer (no copy of the array into a body), as the OIP
gRPC message is built once, outside the timing.
The server is a real `deml-server` in a child process (one idle training worker, --workers inference workers).

    python -m bench.bench_http [--workers 2] [--rows 65536] [--concurrent 4] [--repeats 21] [--requests 1000]

Writes bench/out/http.json and prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from bench.bench_inference import export_digits_mlp, percentile

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
HEADER = "Inference-Header-Content-Length"


class Rest:
    """One kept-alive HTTP connection to the REST face."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self._conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)

    def _post(
        self, path: str, body: bytes | list[bytes | memoryview], headers: dict[str, str]
    ) -> tuple[dict[str, str], bytes]:
        self._conn.request("POST", path, body=body, headers=headers)
        answer = self._conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{path}: {answer.status} {data[:500]!r}")
        return dict(answer.getheaders()), data

    def infer_json(self, x: np.ndarray) -> np.ndarray:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()}]}
        _, data = self._post("/v2/models/digits/infer", json.dumps(body).encode(), {"Content-Type": "application/json"})
        output = json.loads(data)["outputs"][0]
        return np.asarray(output["data"], np.float32).reshape(output["shape"])

    def infer_binary(self, x: np.ndarray) -> np.ndarray:
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": list(x.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes},
                    }
                ],
                "parameters": {"binary_data_output": True},
            }
        ).encode()
        x = np.ascontiguousarray(x)
        headers, data = self._post(
            "/v2/models/digits/infer",
            # http.client sends each buffer of the list in turn: the array's bytes are not copied into a body.
            [head, memoryview(x).cast("B")],
            {
                HEADER: str(len(head)),
                "Content-Type": "application/octet-stream",
                "Content-Length": str(len(head) + x.nbytes),
            },
        )
        length = int(headers[HEADER])
        output = json.loads(data[:length])["outputs"][0]
        return np.frombuffer(data, np.float32, offset=length).reshape(output["shape"])

    def close(self) -> None:
        self._conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--concurrent", type=int, default=4, help="REST requests at once, each of rows/concurrent")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--data-dir", type=Path, default=OUT / "http-server", help=argparse.SUPPRESS)
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    model = export_digits_mlp(OUT / "digits-bench-0.onnx")

    import onnxruntime as ort

    from bench.server import DemlServer
    from deml.oip import grpc_predict_v2_pb2 as oip_pb2
    from deml.oip import grpc_predict_v2_pb2_grpc as oip_pb2_grpc
    from deml_client import DemlClient

    x = np.random.default_rng(0).random((args.rows, 64), dtype=np.float32)
    one = x[:1].copy()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]

    server = DemlServer(args.data_dir, "--workers", "1", "--inference-workers", str(args.workers))
    rest = Rest(server.http_url)
    parts = np.array_split(x, args.concurrent)
    rests = [Rest(server.http_url) for _ in parts]
    threads = ThreadPoolExecutor(len(parts))

    def rest_concurrent() -> np.ndarray:
        return np.concatenate(list(threads.map(lambda r, part: r.infer_binary(part), rests, parts)))

    local_1: list[float] = []
    json_1: list[float] = []
    binary_1: list[float] = []
    rest_s: list[float] = []
    rest_concurrent_s: list[float] = []
    deml_grpc_s: list[float] = []
    oip_grpc_s: list[float] = []
    try:
        with DemlClient(server.target) as client:
            client.upload_model(model, "digits")
            server.wait_idle()
            stub = oip_pb2_grpc.GRPCInferenceServiceStub(client.channel)
            oip_request = oip_pb2.ModelInferRequest(
                model_name="digits",
                inputs=[oip_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=x.shape)],
                raw_input_contents=[x.tobytes()],
            )

            def oip_grpc() -> np.ndarray:
                response = stub.ModelInfer(oip_request)
                return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(args.rows, 10)

            max_diff = 0.0
            for got in (
                rest.infer_binary(x),
                rest_concurrent(),
                client.predict("digits", x, shared_memory=False),
                oip_grpc(),
            ):
                max_diff = max(max_diff, float(np.abs(np.asarray(got) - expected).max()))
            max_diff = max(max_diff, float(np.abs(rest.infer_json(x[:100]) - expected[:100]).max()))
            for _ in range(args.repeats):
                for call, times in (
                    (lambda: rest.infer_binary(x), rest_s),
                    (rest_concurrent, rest_concurrent_s),
                    (lambda: client.predict("digits", x, shared_memory=False), deml_grpc_s),
                    (oip_grpc, oip_grpc_s),
                ):
                    started = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - started)
            for _ in range(50):
                rest.infer_json(one)
                rest.infer_binary(one)
            block = 100
            for _ in range(max(1, args.requests // block)):
                for call, times in (
                    (lambda: session.run(None, {"input": one}), local_1),
                    (lambda: rest.infer_json(one), json_1),
                    (lambda: rest.infer_binary(one), binary_1),
                ):
                    for _ in range(block):
                        started = time.perf_counter()
                        call()
                        times.append(time.perf_counter() - started)
    finally:
        rest.close()
        for r in rests:
            r.close()
        threads.shutdown()
        server.stop()
    load = os.getloadavg()[0]

    ms = 1000.0
    rest_med, concurrent_med, deml_med, oip_med = (
        statistics.median(v) for v in (rest_s, rest_concurrent_s, deml_grpc_s, oip_grpc_s)
    )
    latency = {
        name: {"p50": percentile(values, 50) * ms, "p99": percentile(values, 99) * ms}
        for name, values in (("in_process", local_1), ("rest_json", json_1), ("rest_binary", binary_1))
    }
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m_at_end": load,
        },
        "onnxruntime": ort.__version__,
        "workers": args.workers,
        "rows": args.rows,
        "concurrent": args.concurrent,
        "repeats": args.repeats,
        "requests": args.requests,
        "max_abs_diff": max_diff,
        "latency_ms_1_row": latency,
        "overhead_ms_1_row_p50": {
            "rest_json": latency["rest_json"]["p50"] - latency["in_process"]["p50"],
            "rest_binary": latency["rest_binary"]["p50"] - latency["in_process"]["p50"],
        },
        "throughput_rows_per_s": {
            "rest_binary": args.rows / rest_med,
            "rest_binary_concurrent": args.rows / concurrent_med,
            "deml_v1_grpc_messages": args.rows / deml_med,
            "oip_grpc_raw_contents": args.rows / oip_med,
        },
        # > 1: REST with binary tensors is faster than the gRPC path.
        "ratio_rest_binary_vs_deml_v1_grpc": deml_med / rest_med,
        "ratio_rest_binary_vs_oip_grpc": oip_med / rest_med,
        "ratio_rest_binary_concurrent_vs_deml_v1_grpc": deml_med / concurrent_med,
        "ratio_rest_binary_concurrent_vs_oip_grpc": oip_med / concurrent_med,
        "paired_ratio_median_vs_deml_v1_grpc": statistics.median(
            d / r for r, d in zip(rest_s, deml_grpc_s, strict=True)
        ),
        "paired_ratio_median_vs_oip_grpc": statistics.median(o / r for r, o in zip(rest_s, oip_grpc_s, strict=True)),
        "paired_ratio_median_concurrent_vs_deml_v1_grpc": statistics.median(
            d / r for r, d in zip(rest_concurrent_s, deml_grpc_s, strict=True)
        ),
    }
    (OUT / "http.json").write_text(json.dumps(result, indent=2))

    tp = result["throughput_rows_per_s"]
    over = result["overhead_ms_1_row_p50"]
    print(f"| measure ({args.rows:,} rows; {args.workers} inference workers) | value |")
    print("|---|---|")
    for name, label in (("in_process", "in-process onnxruntime"), ("rest_json", "REST, JSON tensor")):
        print(f"| 1-row latency {label} p50 / p99 | {latency[name]['p50']:.3f} / {latency[name]['p99']:.3f} ms |")
    rb = latency["rest_binary"]
    print(f"| 1-row latency REST, binary tensor p50 / p99 | {rb['p50']:.3f} / {rb['p99']:.3f} ms |")
    print(
        f"| 1-row p50 overhead over in-process, REST JSON / binary | {over['rest_json']:.3f} /"
        f" {over['rest_binary']:.3f} ms |"
    )
    print(f"| throughput REST, binary tensors | {tp['rest_binary']:,.0f} rows/s |")
    print(
        f"| throughput REST, binary tensors, {args.concurrent} requests of {args.rows // args.concurrent:,} rows at"
        f" once | {tp['rest_binary_concurrent']:,.0f} rows/s |"
    )
    print(f"| throughput deml.v1 gRPC messages (DemlClient) | {tp['deml_v1_grpc_messages']:,.0f} rows/s |")
    print(f"| throughput OIP gRPC, raw_input_contents | {tp['oip_grpc_raw_contents']:,.0f} rows/s |")
    print(
        "| REST binary / deml.v1 gRPC messages (median ratio; paired) |"
        f" {result['ratio_rest_binary_vs_deml_v1_grpc']:.2f}x;"
        f" {result['paired_ratio_median_vs_deml_v1_grpc']:.2f}x |"
    )
    print(
        f"| REST binary / OIP gRPC (median ratio; paired) | {result['ratio_rest_binary_vs_oip_grpc']:.2f}x;"
        f" {result['paired_ratio_median_vs_oip_grpc']:.2f}x |"
    )
    print(
        f"| REST binary, {args.concurrent} at once / deml.v1 gRPC messages (median ratio; paired) |"
        f" {result['ratio_rest_binary_concurrent_vs_deml_v1_grpc']:.2f}x;"
        f" {result['paired_ratio_median_concurrent_vs_deml_v1_grpc']:.2f}x |"
    )
    print(
        f"| REST binary, {args.concurrent} at once / OIP gRPC |"
        f" {result['ratio_rest_binary_concurrent_vs_oip_grpc']:.2f}x |"
    )
    print(f"| max abs difference of outputs | {max_diff:.2e} |")
    print(f"| machine load average (1 min) at the end | {load:.1f} on {os.cpu_count()} CPUs |")


if __name__ == "__main__":
    main()
