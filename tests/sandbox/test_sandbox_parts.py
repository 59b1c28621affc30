"""The sandbox's parts on their own: the limits' encoding, the result collection, the settings' checks."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from deml_server.backends.local import _collect, _WorkerFailed
from deml_server.errors import InvalidArgument
from deml_server.sandbox import SandboxConfig, default_limits
from provider_runtime.limits import LIMITS_ENV, WorkerLimits
from provider_runtime.serve import _name_memory_limit


def test_limits_round_trip_through_the_environment_value() -> None:
    limits = WorkerLimits(memory_bytes=1 << 30, file_bytes=1 << 20, open_files=64, processes=32, cpu_seconds=10)

    assert WorkerLimits.from_env(limits.to_env()) == limits


@pytest.mark.parametrize(
    ("raw", "words"),
    [("memory_bytes=lots", "memory_bytes must be a whole number"), ("stack=1", "is not one of"), ("x", "is not one")],
)
def test_a_malformed_limits_value_is_refused_naming_it(raw: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        WorkerLimits.from_env(raw)


def test_a_worker_applies_its_limits_to_itself() -> None:
    code = (
        "import resource; from provider_runtime.limits import apply_from_env; apply_from_env(); "
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[1], resource.getrlimit(resource.RLIMIT_AS)[1])"
    )
    env = {**os.environ, LIMITS_ENV: WorkerLimits(open_files=100, memory_bytes=4 << 30).to_env()}

    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)

    assert done.stdout.split() == ["100", str(4 << 30)]
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[1] != 100  # this process is untouched


def test_negative_limits_are_refused_naming_the_setting() -> None:
    with pytest.raises(InvalidArgument, match="processes must be a whole number >= 0"):
        SandboxConfig(processes=-5, memory_mb=0).limits()


def test_unset_limits_take_the_defaults_and_zero_turns_one_off() -> None:
    limits = SandboxConfig(memory_mb=-1, open_files=0, processes=-1, file_size_mb=-1, cpu_seconds=-1).limits()

    assert limits.memory_bytes == default_limits().memory_bytes >= 8 << 30
    assert limits.open_files == 0 and limits.processes == 1024


def test_collect_moves_regular_files_and_refuses_a_symlink(tmp_path: Path) -> None:
    host_in, host_out, output = tmp_path / "in", tmp_path / "out", tmp_path / "result"
    host_in.mkdir()
    host_out.mkdir()
    (host_out / "result.json").write_text("{}")
    (host_out / "weights.safetensors").symlink_to(tmp_path / "deml.sqlite3")

    with pytest.raises(_WorkerFailed, match=r"'weights\.safetensors' in its result bundle, which is not a regular"):
        _collect("local-0.1", host_in, host_out, output)

    assert not host_in.exists() and not host_out.exists()
    assert not (output / "weights.safetensors").exists()


def test_collect_refuses_a_fifo(tmp_path: Path) -> None:
    host_in, host_out, output = tmp_path / "in", tmp_path / "out", tmp_path / "result"
    host_in.mkdir()
    host_out.mkdir()
    os.mkfifo(host_out / "log.txt")

    with pytest.raises(_WorkerFailed, match=r"'log\.txt'"):
        _collect("local-0.1", host_in, host_out, output)


def test_collect_moves_the_results(tmp_path: Path) -> None:
    host_in, host_out, output = tmp_path / "in", tmp_path / "out", tmp_path / "result"
    host_in.mkdir()
    host_out.mkdir()
    (host_out / "result.json").write_text('{"status": "ok"}')

    _collect("local-0.1", host_in, host_out, output)

    assert (output / "result.json").read_text() == '{"status": "ok"}' and not host_out.exists()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("MemoryError", ""),
        ("_ArrayMemoryError", "Unable to allocate 4.00 GiB for an array"),
        ("RuntimeError", "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes"),
    ],
)
def test_an_allocation_refused_under_the_limit_is_named(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "result.json"
    result = {"status": "error", "error": {"type": kind, "message": message, "traceback": ""}}
    path.write_text(json.dumps(result))

    _name_memory_limit(path, result, 3 << 30)

    written = json.loads(path.read_text())["error"]["message"]
    assert written.startswith("the worker's memory limit (3072 MiB of address space) was reached")
    assert message in written


def test_other_errors_are_left_as_they_are(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    result = {"status": "error", "error": {"type": "ValueError", "message": "bad", "traceback": ""}}
    path.write_text(json.dumps(result))

    _name_memory_limit(path, result, 3 << 30)

    assert json.loads(path.read_text())["error"]["message"] == "bad"
