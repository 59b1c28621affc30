"""deml-server with TLS and tokens, deml-client over TLS as separate processes; non-loopback start-up rules."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support import EXAMPLES, ROOT, ServerProcess, load_example
from tests.tls_support import make_pki

ADMIN = "cli-admin-token-0123456789"
TRAIN = "cli-train-token-0123456789"
PREDICT = "cli-predict-token-0123456789"


def cli(target: str, ca: Path, token: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DEML_TOKEN", "DEML_TLS_CA")}
    if token is not None:
        env["DEML_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "deml_client", "--server", target, "--tls-ca", str(ca), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=check,
        timeout=900,
        env=env,
    )


@pytest.mark.slow
def test_train_and_predict_over_tls_with_tokens(tmp_path: Path) -> None:
    # Prepare
    pki = make_pki(tmp_path / "pki")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{ADMIN} admin\n{TRAIN} train\n{PREDICT} predict\n")
    server = ServerProcess(
        tmp_path / "server",
        "--workers", "2",
        "--tls-cert", str(pki.cert),
        "--tls-key", str(pki.key),
        "--auth-tokens", str(tokens),
    )  # fmt: skip
    (_, _), (tx, ty) = load_example("digits").load_data()
    x = np.asarray(tx, np.float32)
    np.save(tmp_path / "x.npy", x)
    try:
        # Execute
        trained = cli(
            server.target, pki.ca, TRAIN, "train", str(EXAMPLES / "digits"), "--workers", "2", "--rounds", "2", "--json"
        )
        report = json.loads(trained.stdout)
        predicted = cli(
            server.target, pki.ca, PREDICT, "predict", "digits:1", "--input", str(tmp_path / "x.npy"),
            "--output", str(tmp_path / "y.npy"), "--quiet",
        )  # fmt: skip
        denied = cli(server.target, pki.ca, PREDICT, "train", str(EXAMPLES / "digits"), "--rounds", "1", check=False)
        anonymous = cli(server.target, pki.ca, None, "models", "list", check=False)
        wrong = cli(server.target, pki.ca, "not-a-token-0123456789", "jobs", "list", check=False)
        untrusted = subprocess.run(
            [sys.executable, "-m", "deml_client", "--server", server.target, "--tls", "--token", ADMIN, "jobs", "list"],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
        # SIGHUP re-reads the token file: the predict token is gone afterwards
        tokens.write_text(f"{ADMIN} admin\n{TRAIN} train\n")
        server.proc.send_signal(signal.SIGHUP)
        gone = cli(server.target, pki.ca, PREDICT, "models", "list", check=False)
        deadline = time.monotonic() + 60
        while gone.returncode == 0 and time.monotonic() < deadline:  # the signal is handled on the server's loop
            time.sleep(0.2)
            gone = cli(server.target, pki.ca, PREDICT, "models", "list", check=False)
    finally:
        server.stop()
    log = server.log_path.read_text()
    # Assert
    assert report["state"] == "SUCCEEDED", report["error"]
    assert report["rounds_committed"] == 2 and report["final_accuracy"] >= 0.85
    assert predicted.returncode == 0
    accuracy = float((np.load(tmp_path / "y.npy").argmax(axis=1) == np.asarray(ty)).mean())
    assert abs(accuracy - report["final_accuracy"]) < 1e-9
    assert denied.returncode == 2 and "PERMISSION_DENIED" in denied.stderr and "predict token" in denied.stderr
    assert anonymous.returncode == 2 and "UNAUTHENTICATED" in anonymous.stderr and "missing" in anonymous.stderr
    assert wrong.returncode == 2 and "UNAUTHENTICATED: the token is not valid" in wrong.stderr
    assert untrusted.returncode == 2 and "UNAVAILABLE" in untrusted.stderr  # the test CA is not a system root
    assert gone.returncode == 2 and "UNAUTHENTICATED" in gone.stderr
    assert "token file" in log and "reloaded" in log
    for token in (ADMIN, TRAIN, PREDICT):
        assert token not in log


def test_a_bad_token_file_stops_the_server_at_start_naming_the_line(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# ok\n{ADMIN} admin\n{TRAIN} trainer\n")
    done = subprocess.run(
        [sys.executable, "-m", "deml_server", "--port", "0", "--data-dir", str(tmp_path / "d"),
         "--auth-tokens", str(tokens)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"{tokens}:3: unknown role 'trainer'" in done.stderr and TRAIN not in done.stderr


@pytest.mark.netns
@pytest.mark.slow
def test_non_loopback_needs_tls_and_tokens_or_insecure(tmp_path: Path) -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2)")
    if os.geteuid() != 0:
        pytest.skip("needs root to make a network namespace with a non-loopback address")
    done = subprocess.run(
        ["unshare", "--net", sys.executable, str(Path(__file__).parent / "netns_exposure.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    checks = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            checks[entry["check"]] = entry
    assert done.returncode == 0 and "end" in checks, f"scenario failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    for name, missing in (
        ("plain_address", "--tls-cert/--tls-key and --auth-tokens"),
        ("all_addresses", "--tls-cert/--tls-key and --auth-tokens"),
        ("tls_only", "without --auth-tokens"),
        ("tokens_only", "without --tls-cert/--tls-key"),
    ):
        assert checks[name]["rc"] == 2, checks[name]
        assert "refusing to listen on" in checks[name]["stderr"] and missing in checks[name]["stderr"]
        assert "--insecure" in checks[name]["stderr"] and "listening on" not in checks[name]["stdout"]
    assert checks["secured"]["target"].startswith("10.200.0.1:") and checks["secured"]["models"] == 0
    assert checks["insecure"]["models"] == 0
    assert "WARNING" in checks["insecure_log"]["text"] and "--insecure" in checks["insecure_log"]["text"]
