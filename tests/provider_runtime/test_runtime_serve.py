"""`python -m provider_runtime serve`: one warm process answering JSON-lines requests."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import MakeBundle, ask, pid_in_log, start_serve, three_class_loader  # type: ignore[import-not-found]

TASK = """
import os

import numpy as np
import torch


def model():
    print(f"pid={os.getpid()}")
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

""" + three_class_loader(4)

BROKEN = "def model():\n    raise RuntimeError('no model today')\n"


def test_one_process_answers_several_requests(make_bundle: MakeBundle, tmp_path: Path) -> None:
    # Prepare
    proc = start_serve(cwd=tmp_path)
    init_bundle = make_bundle("init", code={"task.py": TASK}, action="init")
    broken_bundle = make_bundle("broken", code={"task.py": BROKEN}, action="init")
    try:
        # Execute
        first = ask(proc, {"id": 1, "action": "init", "input": str(init_bundle), "output": str(tmp_path / "o1")})
        train_bundle = make_bundle("train", code={"task.py": TASK}, weights=tmp_path / "o1" / "weights.safetensors")
        second = ask(proc, {"id": 2, "action": "train", "input": str(train_bundle), "output": str(tmp_path / "o2")})
        third = ask(proc, {"id": 3, "action": "init", "input": str(broken_bundle), "output": str(tmp_path / "o3")})
        garbage = ask(proc, {"id": 4, "action": "dance"})
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        rest = proc.stdout.read()
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Assert
    assert first == {"id": 1, "ok": True}
    assert second == {"id": 2, "ok": True}
    assert third == {"id": 3, "ok": True}  # the bundle is complete; the user's failure is in result.json
    assert garbage["id"] == 4
    assert garbage["ok"] is False
    assert rest == ""  # the user's prints never reached the protocol channel
    assert code == 0
    assert pid_in_log(tmp_path / "o1") == pid_in_log(tmp_path / "o2") == proc.pid
    trained = json.loads((tmp_path / "o2" / "result.json").read_text())
    assert trained["status"] == "ok"
    assert trained["num_examples"] == 64
    broken = json.loads((tmp_path / "o3" / "result.json").read_text())
    assert broken["status"] == "error"
    assert broken["error"]["message"] == "no model today"
