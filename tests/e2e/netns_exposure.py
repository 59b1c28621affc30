"""Runs inside `unshare --net`: deml-server on a non-loopback address, refused or started as the flags say.

Prints one JSON line per check. Usage: netns_exposure.py WORK_DIR
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from deml_client import DemlClient  # noqa: E402
from tests.support import ServerProcess  # noqa: E402
from tests.tls_support import make_pki  # noqa: E402

ADDRESS = "10.200.0.1"
TOKEN = "netns-admin-token-0123456789"


def report(check: str, **fields: Any) -> None:
    print(json.dumps({"check": check, **fields}), flush=True)


def setup_network() -> str:
    """lo up, and a non-loopback address: on a dummy interface where the kernel has one, else on lo."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    dummy = subprocess.run(["ip", "link", "add", "deml0", "type", "dummy"], capture_output=True)
    device = "deml0" if dummy.returncode == 0 else "lo"
    subprocess.run(["ip", "addr", "add", f"{ADDRESS}/24", "dev", device], check=True)
    subprocess.run(["ip", "link", "set", device, "up"], check=True)
    return device


def refused(work: Path, host: str, *flags: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "deml_server", "--host", host, "--port", "0", "--data-dir", str(work / "refused"),
         "--workers", "1", "--inference-workers", "1", *flags],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    return {"rc": done.returncode, "stderr": done.stderr[-2000:], "stdout": done.stdout[-500:]}


def main() -> None:
    work = Path(sys.argv[1])
    report("network", device=setup_network())
    pki = make_pki(work / "pki", hosts=(ADDRESS, "127.0.0.1"))
    tokens = work / "tokens.txt"
    tokens.write_text(f"{TOKEN} admin\n")
    tls = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    auth = ["--auth-tokens", str(tokens)]
    report("plain_address", **refused(work, ADDRESS))
    report("all_addresses", **refused(work, "0.0.0.0"))
    report("tls_only", **refused(work, ADDRESS, *tls))
    report("tokens_only", **refused(work, ADDRESS, *auth))
    small = ["--host", ADDRESS, "--workers", "1", "--inference-workers", "1"]
    server = ServerProcess(work / "secured", *small, *tls, *auth)
    try:
        with DemlClient(server.target, tls_ca=pki.ca, token=TOKEN) as client:
            report("secured", target=server.target, models=len(client.list_models()))
    finally:
        server.stop()
    insecure = ServerProcess(work / "insecure", *small, "--insecure")
    try:
        with DemlClient(insecure.target) as client:
            report("insecure", target=insecure.target, models=len(client.list_models()))
    finally:
        insecure.stop()
    report("insecure_log", text=insecure.log_path.read_text()[-3000:])
    report("end")


if __name__ == "__main__":
    main()
