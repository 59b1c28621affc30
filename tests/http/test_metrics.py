"""/metrics on a real deml-server: Prometheus text that parses, Triton's exact names, counters that rise."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deml.oip import grpc_predict_v2_pb2 as oip_pb2
from deml.oip import grpc_predict_v2_pb2_grpc as oip_pb2_grpc
from deml.v1 import training_pb2
from deml_client import DemlClient
from tests.deml_server.inference.support import channel, export_mlp
from tests.support import SMALL_TASK, ServerThread, make_config, quick_spec, write_task

TRITON = [
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
]


async def _register(thread: ServerThread, path: Path) -> int:
    assert thread.server is not None
    return thread.server.registry.register("digits", thread.server.artifacts.put_file(path)).version


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    root = tmp_path_factory.mktemp("metrics")
    thread = ServerThread(make_config(root / "server", workers=1)).start()
    try:
        thread.call(_register(thread, export_mlp(root / "digits.onnx")))
        yield thread
    finally:
        thread.stop()


def scrape(thread: ServerThread) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float], dict[str, str]]:
    """The text, every sample by (name, labels), and each family's declared type."""
    with urllib.request.urlopen(f"{thread.http_url}/metrics", timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types.setdefault(family.name, family.type)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return text, samples, types


DIGITS_V1 = (("model", "digits"), ("version", "1"))


def rest_infer(thread: ServerThread, count: int, datatype: str = "FP32") -> int:
    body = {"inputs": [{"name": "input", "shape": [count, 64], "datatype": datatype, "data": [0.5] * (count * 64)}]}
    call = urllib.request.Request(
        f"{thread.http_url}/v2/models/digits/infer", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(call, timeout=60) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def grpc_infer(thread: ServerThread, count: int) -> None:
    x = np.zeros((count, 64), np.float32)
    with channel(thread.target) as ch:
        oip_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            oip_pb2.ModelInferRequest(
                model_name="digits",
                inputs=[oip_pb2.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[count, 64])],
                raw_input_contents=[x.tobytes()],
            )
        )


def test_inference_counters_rise_with_requests_from_both_faces(served) -> None:
    # Prepare
    rest_infer(served, 1)
    _, before, _ = scrape(served)

    # Execute: 2 REST requests (3 + 4 rows), 1 gRPC request (5 rows), 1 REST request refused (wrong datatype)
    statuses = [rest_infer(served, 3), rest_infer(served, 4), rest_infer(served, 2, datatype="FP64")]
    grpc_infer(served, 5)
    text, after, types = scrape(served)

    # Assert
    assert statuses == [200, 200, 400]

    def rise(name: str) -> float:
        # The parser names a counter's samples NAME_total; the text itself keeps Triton's names (checked below)
        return after[(f"{name}_total", DIGITS_V1)] - before[(f"{name}_total", DIGITS_V1)]

    for name in TRITON:
        assert types[name] == "counter"
        assert f"# TYPE {name} counter" in text
        assert f'\n{name}{{model="digits",version="1"}} ' in text
        assert f"{name}_total" not in text
    assert rise("nv_inference_request_success") == 3
    assert rise("nv_inference_request_failure") == 1
    assert rise("nv_inference_count") == 12
    assert rise("nv_inference_exec_count") == 3
    assert rise("nv_inference_request_duration_us") > 0
    assert rise("nv_inference_compute_infer_duration_us") > 0
    assert after[("nv_inference_compute_input_duration_us_total", DIGITS_V1)] > 0
    assert after[("nv_inference_queue_duration_us_total", DIGITS_V1)] >= 0
    # The request includes its parts
    assert (
        after[("nv_inference_request_duration_us_total", DIGITS_V1)]
        >= after[("nv_inference_compute_infer_duration_us_total", DIGITS_V1)]
    )
    assert types["process_cpu_seconds"] == "counter"
    assert after[("deml_workers", (("kind", "inference"),))] == 1


def test_training_metrics_count_jobs_rounds_and_attempts(served, tmp_path) -> None:
    # Prepare
    _, before, _ = scrape(served)
    task = write_task(tmp_path / "task", SMALL_TASK)

    # Execute
    with DemlClient(served.target) as client:
        job = client.submit_job(task, quick_spec(rounds=2, workers=1))
        job = client.wait_job(job.id)
    _, after, types = scrape(served)

    # Assert
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    assert before[("deml_jobs", (("state", "SUCCEEDED"),))] == 0
    assert after[("deml_jobs", (("state", "SUCCEEDED"),))] == 1
    assert after[("deml_rounds_committed_total", ())] == 2
    assert types["deml_round_duration_seconds"] == "histogram"
    assert after[("deml_round_duration_seconds_count", ())] == 2
    assert after[("deml_round_duration_seconds_sum", ())] > 0
    assert after[("deml_round_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert after[("deml_task_attempts_total", (("outcome", "OK"),))] >= 2
    assert after[("deml_weights_sent_bytes_total", ())] > 0
    assert after[("deml_weights_received_bytes_total", ())] > 0
    assert ("deml_task_attempts_total", (("outcome", "FAILED"),)) in after


def test_triton_statistics_extension_agrees_with_metrics(served) -> None:
    # Prepare
    assert rest_infer(served, 2) == 200

    # Execute
    with urllib.request.urlopen(f"{served.http_url}/v2/models/digits/stats", timeout=30) as answer:
        stats = json.load(answer)
    with urllib.request.urlopen(f"{served.http_url}/v2/models/stats", timeout=30) as answer:
        every = json.load(answer)
    try:
        urllib.request.urlopen(f"{served.http_url}/v2/models/no-such-model/stats", timeout=30)
        unknown = 200
    except urllib.error.HTTPError as exc:
        unknown = exc.code
    _, samples, _ = scrape(served)

    # Assert
    (model,) = stats["model_stats"]
    # Every version of every model (the training test registered its own), this one among them
    assert model in every["model_stats"]
    assert model["name"] == "digits" and model["version"] == "1"
    inference = model["inference_stats"]
    assert inference["success"]["count"] == samples[("nv_inference_request_success_total", DIGITS_V1)]
    assert inference["fail"]["count"] == samples[("nv_inference_request_failure_total", DIGITS_V1)]
    assert model["inference_count"] == samples[("nv_inference_count_total", DIGITS_V1)]
    assert model["execution_count"] == samples[("nv_inference_exec_count_total", DIGITS_V1)]
    assert inference["success"]["ns"] // 1000 == samples[("nv_inference_request_duration_us_total", DIGITS_V1)]
    assert inference["compute_infer"]["ns"] > 0 and model["last_inference"] > 0
    assert unknown == 404
