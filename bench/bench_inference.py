"""Inference benchmark: DeML (gRPC + gateway + worker processes) against one in-process onnxruntime session.

Throughput: 65,536 rows of the digits MLP (64 float inputs, 10 logits), DeML through `InferenceClient.predict`
against `InferenceSession.run` on the same array, median of --repeats runs each. DeML is measured both ways a
client reaches it: through system shared memory (the default for a client on the server's host) and with the
tensors in gRPC messages (streamed in batches; what a client on another host gets).
Latency: 1-row requests, p50/p99 over --requests calls each; overhead = DeML minus in-process.
Both sides run in the same invocation on the same machine; the server runs in a child process.

    python -m bench.bench_inference [--workers 2] [--rows 65536] [--repeats 51] [--requests 2000]

Writes bench/out/inference.json and prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def export_digits_mlp(path: Path, hidden: int = 0) -> Path:
    """The digits example's network (64 -> 128 -> 10), or with `hidden` > 0 a compute-heavier MLP
    (64 -> hidden -> hidden -> 10) on the same input, exported with a dynamic batch dimension."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if hidden > 0:
        layers = [nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)]
        net = nn.Sequential(*layers).eval()
    else:
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    torch.onnx.export(
        net,
        (torch.randn(4, 64),),
        str(path),
        dynamo=True,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        external_data=False,
    )
    return path


async def serve(model: Path, data_dir: Path, workers: int, threads: int) -> None:
    """Child process: registry with the model, gateway, both gRPC faces on 127.0.0.1; prints the port."""
    import grpc

    from deml_server.artifacts import ArtifactStore
    from deml_server.inference import MAX_MESSAGE_BYTES
    from deml_server.inference.gateway import InferenceGateway
    from deml_server.registry import ModelRegistry
    from deml_server.servicers import inference, oip
    from deml_server.servicers.interceptor import ErrorMappingInterceptor
    from deml_server.store import JobStore

    data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(data_dir / "deml.sqlite3")
    artifacts = ArtifactStore(data_dir / "artifacts")
    registry = ModelRegistry(store, artifacts)
    registry.register("digits", artifacts.put_file(model))
    gateway = InferenceGateway(registry, workers=workers, threads_per_worker=threads)
    await gateway.start()
    await gateway.load("digits")
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor()],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    inference.add_to_server(server, gateway, registry)
    oip.add_to_server(server, gateway, registry)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0.5)
    await gateway.close()
    store.close()


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
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, default=OUT / "inference-server", help=argparse.SUPPRESS)
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    if args.serve:
        asyncio.run(serve(args.model, args.data_dir, args.workers, args.threads_per_worker))
        return
    model = args.model or export_digits_mlp(OUT / f"digits-bench-{args.hidden}.onnx", args.hidden)

    import grpc
    import onnxruntime as ort

    from deml_client.inference import InferenceClient

    x = np.random.default_rng(0).random((args.rows, 64), dtype=np.float32)
    one = x[:1].copy()
    # In-process baseline: one session with onnxruntime's defaults (all cores), except that its idle threads do
    # not spin: spinning does not make the session faster here (13.5 vs 13.7 ms for 65,536 digits rows) but keeps
    # both cores busy after each run, which slowed the DeML call measured next from 17 to 30 ms on 2 cores.
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]

    shutil.rmtree(args.data_dir, ignore_errors=True)
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.bench_inference",
            "--serve",
            "--model",
            str(model),
            "--data-dir",
            str(args.data_dir),
            "--workers",
            str(args.workers),
            "--threads-per-worker",
            str(args.threads_per_worker),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    # Both sides are measured alternately, so that load from other processes on the machine hits both alike.
    local_s: list[float] = []
    deml_s: list[float] = []
    grpc_s: list[float] = []
    local_1: list[float] = []
    deml_1: list[float] = []
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        options = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            client = InferenceClient(channel, same_host=True)
            max_diff = 0.0
            for shared in (True, False):
                got = client.predict("digits", x, shared_memory=shared)
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
            client.close()
    finally:
        if child.stdin is not None:
            child.stdin.close()
        child.wait(timeout=30)
    load = os.getloadavg()[0]

    local_med, deml_med, grpc_med = statistics.median(local_s), statistics.median(deml_s), statistics.median(grpc_s)
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
        },
        "throughput_ratio": local_med / deml_med,
        "throughput_ratio_grpc_messages": local_med / grpc_med,
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
