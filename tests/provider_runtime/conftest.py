"""Fixtures for provider_runtime tests: task bundles on disk and the CLI as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

MakeBundle = Callable[..., Path]


def runtime_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["DEML_TORCH_THREADS"] = "1"
    return env


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """In-process actions run single-threaded, as warm workers do; tiny batches gain nothing from more."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_bundle(tmp_path: Path) -> MakeBundle:
    """Lay out a task bundle; `code` is an example dir or {filename: source}."""

    def make(
        name: str,
        *,
        code: Path | dict[str, str],
        action: str = "train",
        weights: Path | None = None,
        train: tuple[np.ndarray, np.ndarray] | None = None,
        test: tuple[np.ndarray, np.ndarray] | None = None,
        **task: Any,
    ) -> Path:
        bundle = tmp_path / name
        bundle.mkdir()
        if isinstance(code, Path):
            shutil.copytree(code, bundle / "code", ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (bundle / "code").mkdir()
            for filename, source in code.items():
                (bundle / "code" / filename).write_text(source)
        doc = {
            "action": action,
            "module": "task",
            "partition": {"index": 0, "count": 1, "scheme": "iid", "alpha": 0.5, "seed": 42},
            "hyper": {"local_epochs": 1, "batch_size": 32, "learning_rate": 0.05, "proximal_mu": 0.0},
            "seed": 42,
            "evaluate_after": False,
            "device": "cpu",
        }
        doc.update(task)
        (bundle / "task.json").write_text(json.dumps(doc))
        if weights is not None:
            shutil.copyfile(weights, bundle / "weights.safetensors")
        for split, arrays in (("train", train), ("test", test)):
            if arrays is not None:
                (bundle / "data").mkdir(exist_ok=True)
                np.savez(bundle / "data" / f"{split}.npz", x=arrays[0], y=arrays[1])
        return bundle

    return make


@pytest.fixture
def run_cli() -> Callable[[str, Path, Path], subprocess.CompletedProcess[str]]:
    """`python -m provider_runtime ACTION --input B --output O` in a child process."""

    def run(action: str, bundle: Path, out: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "provider_runtime", action, "--input", str(bundle), "--output", str(out)],
            capture_output=True,
            text=True,
            env=runtime_env(),
            cwd=bundle.parent,
            timeout=120,
        )

    return run


@pytest.fixture
def digits_split() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The digits example's own (train, test) split, loaded without importing it as `task`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return (x_train, y_train), (x_test, y_test)


def start_serve(cwd: Path | None = None) -> subprocess.Popen[str]:
    """A warm worker (`python -m provider_runtime serve`) taking JSON-lines requests on its stdin."""
    return subprocess.Popen(
        [sys.executable, "-m", "provider_runtime", "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=runtime_env(),
        cwd=cwd,
    )


def ask(proc: subprocess.Popen[str], request: dict[str, Any]) -> dict[str, Any]:
    """One request to a warm worker (`serve`) and its reply."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(request) + "\n")
    proc.stdin.flush()
    reply: dict[str, Any] = json.loads(proc.stdout.readline())
    return reply


def pid_in_log(out: Path) -> int:
    """The PID a task's model() printed (`pid=N`) into its result's log."""
    match = re.search(r"pid=(\d+)", (out / "log.txt").read_text())
    assert match is not None
    return int(match.group(1))


def three_class_loader(features: int) -> str:
    """A task file's load_data(): 96 seeded rows of `features` normal features in three classes (64 train, 32 test).

    The file must import numpy as np.
    """
    return f"""
def load_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, {features})).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    return (x[:64], y[:64]), (x[64:], y[64:])
"""
