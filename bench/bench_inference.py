"""Inference benchmark: DeML (gRPC + gateway + worker processes) against one in-process onnxruntime session.

Throughput: 65,536 rows of the digits MLP (64 float inputs, 10 logits), DeML through `DemlClient.predict`
against `InferenceSession.run` on the same array, median of --repeats runs each. DeML is measured both ways a
client reaches it: through system shared memory (the default for a client on the server's host) and with the
tensors in gRPC messages (streamed in batches; what a client on another host gets); and from a shared buffer
(`DemlClient.shared_buffer`, the batch built in registered memory, so the client copies nothing).
Latency: 1-row requests, p50/p99 over --requests calls each; overhead = DeML minus in-process.
Both sides run in the same invocation on the same machine; the server is a real `deml-server` in a child process
(one idle training worker, --workers inference workers), the model uploaded through ModelService.

    python -m bench.bench_inference [--workers 2] [--rows 65536] [--repeats 51] [--requests 2000]

Writes bench/out/inference.json and prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def export_digits_mlp(path: Path, hidden: int = 0) -> Path:
    """The digits example's network (64 -> 128 -> 10), or with `hidden` > 0 a compute-heavier MLP
    (64 -> hidden -> hidden -> 10) on the same input, exported by DeML's own export step (dynamic batch)."""
    import torch
    from torch import nn

    from provider_runtime.onnx_export import export_onnx

    torch.manual_seed(0)
    if hidden > 0:
        layers = [nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)]
        net = nn.Sequential(*layers)
    else:
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    export_onnx(net, torch.randn(4, 64), path)
    return path


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--threads-per-worker", type=int, default=1)
    parser.add_argument("--rows", type=int, default=65_536)
    parser.add_argument("--repeats", type=int, default=51)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--model", type=Path, help="an ONNX model with input 'input' FP32[-1, 64] (default: export)")
    parser.add_argument(
        "--hidden",
        type=int,
        default=0,
        help="bench an MLP 64 -> H -> H -> 10 instead of the digits MLP (compute-bound)",
    )
    parser.add_argument("--data-dir", type=Path, default=OUT / "inference-server", help=argparse.SUPPRESS)
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    model = args.model or export_digits_mlp(OUT / f"digits-bench-{args.hidden}.onnx", args.hidden)

    import onnxruntime as ort

    from bench.server import DemlServer
    from deml_client import DemlClient

    x = np.random.default_rng(0).random((args.rows, 64), dtype=np.float32)
    one = x[:1].copy()
    # In-process baseline: one session with onnxruntime's defaults (all cores), except that its idle threads do
    # not spin: spinning does not make the session faster here (13.5 vs 13.7 ms for 65,536 digits rows) but keeps
    # both cores busy after each run, which slowed the DeML call measured next from 17 to 30 ms on 2 cores.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]

    # The real server, as users run it; one idle training worker besides the inference workers.
    server = DemlServer(
        args.data_dir,
        *("--workers", "1", "--inference-workers", str(args.workers)),
        *("--inference-threads", str(args.threads_per_worker)),
    )
    # Both sides are measured alternately, so that load from other processes on the machine hits both alike.
    local_s: list[float] = []
    deml_s: list[float] = []
    grpc_s: list[float] = []
    buffer_s: list[float] = []
    local_1: list[float] = []
    deml_1: list[float] = []
    try:
        with DemlClient(server.target) as client:
            client.upload_model(model, "digits")
            server.wait_idle()
            # The same rows built in a shared buffer: what a caller that loads its batch there gets (no copy).
            buffer = client.shared_buffer(x.shape, x.dtype)
            buffer[...] = x
            max_diff = 0.0
            for source, shared in ((x, True), (x, False), (buffer, True)):
                got = client.predict("digits", source, shared_memory=shared)
                assert isinstance(got, np.ndarray)
                max_diff = max(max_diff, float(np.abs(got - expected).max()))
            for _ in range(args.repeats):
                started = time.perf_counter()
                session.run(None, {"input": x})
                local_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.predict("digits", x, shared_memory=True)
                deml_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.predict("digits", x, shared_memory=False)
                grpc_s.append(time.perf_counter() - started)
                started = time.perf_counter()
                client.predict("digits", buffer)
                buffer_s.append(time.perf_counter() - started)
            for _ in range(50):
                client.predict("digits", one)
            block = 100
            for _ in range(max(1, args.requests // block)):
                for _ in range(block):
                    started = time.perf_counter()
                    session.run(None, {"input": one})
                    local_1.append(time.perf_counter() - started)
                for _ in range(block):
                    started = time.perf_counter()
                    client.predict("digits", one)
                    deml_1.append(time.perf_counter() - started)
    finally:
        server.stop()
    load = os.getloadavg()[0]

    local_med, deml_med, grpc_med = statistics.median(local_s), statistics.median(deml_s), statistics.median(grpc_s)
    buffer_med = statistics.median(buffer_s)
    ms = 1000.0
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_1m_at_end": load,
        },
        "onnxruntime": ort.__version__,
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
        "rows": args.rows,
        "repeats": args.repeats,
        "max_abs_diff": max_diff,
        "throughput_rows_per_s": {
            "in_process": args.rows / local_med,
            "deml_shared_memory": args.rows / deml_med,
            "deml_grpc_messages": args.rows / grpc_med,
            "deml_shared_buffer": args.rows / buffer_med,
        },
        "throughput_ratio": local_med / deml_med,
        "throughput_ratio_grpc_messages": local_med / grpc_med,
        "throughput_ratio_shared_buffer": local_med / buffer_med,
        # Each DeML run against the in-process run just before it: less sensitive to drifts in machine load.
        "paired_ratio_median": statistics.median(a / b for a, b in zip(local_s, deml_s, strict=True)),
        "paired_ratio_median_grpc_messages": statistics.median(a / b for a, b in zip(local_s, grpc_s, strict=True)),
        "latency_ms_1_row": {
            "in_process": {"p50": percentile(local_1, 50) * ms, "p99": percentile(local_1, 99) * ms},
            "deml": {"p50": percentile(deml_1, 50) * ms, "p99": percentile(deml_1, 99) * ms},
        },
    }
    lat = result["latency_ms_1_row"]
    result["overhead_ms_1_row"] = {
        "p50": lat["deml"]["p50"] - lat["in_process"]["p50"],
        "p99": lat["deml"]["p99"] - lat["in_process"]["p99"],
    }
    (OUT / "inference.json").write_text(json.dumps(result, indent=2))

    tp = result["throughput_rows_per_s"]
    over = result["overhead_ms_1_row"]
    print(f"| measure ({args.rows:,} rows; {args.workers} workers x {args.threads_per_worker} thread) | value |")
    print("|---|---|")
    print(f"| in-process onnxruntime throughput | {tp['in_process']:,.0f} rows/s |")
    print(f"| DeML predict throughput, shared memory (same host) | {tp['deml_shared_memory']:,.0f} rows/s |")
    print(f"| throughput ratio, shared memory (DeML / in-process) | {result['throughput_ratio']:.2f}x |")
    print(f"| DeML predict throughput, tensors in gRPC messages | {tp['deml_grpc_messages']:,.0f} rows/s |")
    print(f"| throughput ratio, gRPC messages | {result['throughput_ratio_grpc_messages']:.2f}x |")
    print(
        f"| DeML predict throughput, inputs built in a shared buffer | {tp['deml_shared_buffer']:,.0f} rows/s"
        f" ({result['throughput_ratio_shared_buffer']:.2f}x) |"
    )
    print(
        f"| median of paired ratios, shared memory / gRPC messages | {result['paired_ratio_median']:.2f}x /"
        f" {result['paired_ratio_median_grpc_messages']:.2f}x |"
    )
    inproc = lat["in_process"]
    print(f"| 1-row latency in-process p50 / p99 | {inproc['p50']:.3f} / {inproc['p99']:.3f} ms |")
    print(f"| 1-row latency DeML p50 / p99 | {lat['deml']['p50']:.3f} / {lat['deml']['p99']:.3f} ms |")
    print(f"| 1-row overhead p50 / p99 | {over['p50']:.3f} / {over['p99']:.3f} ms |")
    print(f"| max abs difference of outputs | {max_diff:.2e} |")
    print(f"| machine load average (1 min) at the end | {load:.1f} on {os.cpu_count()} CPUs |")


if __name__ == "__main__":
    main()
