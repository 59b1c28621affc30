"""What the token check costs: 1-row predict p50 against a server without tokens and one with --auth-tokens.

Both servers run side by side (same flags otherwise, plaintext on 127.0.0.1, so only the token check differs) and
are called in alternating blocks, so drift of the machine hits both alike. Reported: p50 of each, the difference
of the p50s per block (median over blocks), and the cost of Authority.authorize alone. With --tls a third server
with TLS and tokens is measured too (for information: TLS costs per connection, little per call).

    python bench/bench_auth.py [--requests 2000] [--blocks 10] [--tls]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_inference import export_digits_mlp  # noqa: E402
from bench.server import DemlServer  # noqa: E402
from deml_client import DemlClient  # noqa: E402
from deml_server.auth import Authority, parse_tokens  # noqa: E402

TOKEN = "bench-predict-token-0123456789abcdef"
ADMIN = "bench-admin-token-0123456789abcdef"  # uploads the model; the predict token is what is measured


def timed(client: DemlClient, x: np.ndarray, n: int) -> list[float]:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.predict("digits", x)
        times.append(time.perf_counter() - started)
    return times


def block(clients: dict[str, DemlClient], x: np.ndarray, n: int, step: int = 50) -> dict[str, float]:
    """p50 (ms) of each client over n calls, the clients taking turns every `step` calls."""
    times: dict[str, list[float]] = {label: [] for label in clients}
    for _ in range(0, n, step):
        for label, client in clients.items():
            times[label].extend(timed(client, x, step))
    return {label: statistics.median(values) * 1e3 for label, values in times.items()}


def authorize_us(n: int = 100_000) -> float:
    tokens = "\n".join(f"bench-token-{i:04d}-0123456789 predict" for i in range(10)) + f"\n{TOKEN} predict\n"
    authority = Authority(parse_tokens(tokens, "bench"))
    header = f"Bearer {TOKEN}"
    started = time.perf_counter()
    for _ in range(n):
        authority.authorize(header, "/deml.v1.InferenceService/Predict")
    return (time.perf_counter() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="calls per block and server")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--tls", action="store_true", help="also measure a server with TLS and tokens")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deml-bench-auth-"))
    model = export_digits_mlp(work / "digits.onnx")
    (work / "tokens.txt").write_text(f"{TOKEN} predict\n{ADMIN} admin\n")
    flags = ("--workers", "1", "--inference-workers", "1")
    open_server = DemlServer(work / "open", *flags)
    servers = {
        # The same server twice: without a header, and with one it does not check (the client's own cost).
        "no tokens": (open_server, None, None),
        "no tokens, header sent": (open_server, TOKEN, None),
        "tokens": (DemlServer(work / "tokens", *flags, "--auth-tokens", str(work / "tokens.txt")), TOKEN, None),
    }
    if args.tls:
        from tests.tls_support import make_pki

        pki = make_pki(work / "pki")
        tls_flags = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--auth-tokens", str(work / "tokens.txt"))
        servers["tls + tokens"] = (DemlServer(work / "tls", *flags, *tls_flags), TOKEN, pki.ca)
    x = np.zeros((1, 64), np.float32)
    clients: dict[str, DemlClient] = {}
    try:
        for label, (server, token, ca) in servers.items():
            server.wait_idle()
            if label != "no tokens, header sent":
                with DemlClient(server.target, token=ADMIN if token else None, tls_ca=ca) as admin:
                    admin.upload_model(model, "digits")
            clients[label] = DemlClient(server.target, token=token, tls_ca=ca)
            timed(clients[label], x, 200)  # warm the channel and the worker's session
        per_block: dict[str, list[float]] = {label: [] for label in clients}
        for _ in range(args.blocks):
            for label, p50 in block(clients, x, args.requests).items():
                per_block[label].append(p50)

        def added(label: str, base: str) -> float:
            return statistics.median(a - b for a, b in zip(per_block[label], per_block[base], strict=True))

        result = {
            "p50_ms": {label: statistics.median(values) for label, values in per_block.items()},
            "added_p50_ms_median_of_blocks": {
                "server's token check": added("tokens", "no tokens, header sent"),
                "client's header": added("no tokens, header sent", "no tokens"),
                "both (end to end)": added("tokens", "no tokens"),
            },
            "blocks": {label: [round(v, 4) for v in values] for label, values in per_block.items()},
            "authorize_alone_us": authorize_us(),
        }
        print(json.dumps(result, indent=2))
    finally:
        for client in clients.values():
            client.close()
        for server in {id(s): s for s, _, _ in servers.values()}.values():
            server.stop()


if __name__ == "__main__":
    main()
