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


def p50_ms(client: DemlClient, x: np.ndarray, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        client.predict("digits", x)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


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
    servers = {
        "no tokens": (DemlServer(work / "open", *flags), None, None),
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
            with DemlClient(server.target, token=ADMIN if token else None, tls_ca=ca) as admin:
                admin.upload_model(model, "digits")
            clients[label] = DemlClient(server.target, token=token, tls_ca=ca)
            p50_ms(clients[label], x, 200)  # warm the channel and the worker's session
        per_block: dict[str, list[float]] = {label: [] for label in clients}
        for _ in range(args.blocks):
            for label, client in clients.items():
                per_block[label].append(p50_ms(client, x, args.requests))
        diffs = [t - o for t, o in zip(per_block["tokens"], per_block["no tokens"], strict=True)]
        result = {
            "p50_ms": {label: statistics.median(values) for label, values in per_block.items()},
            "token_check_added_p50_ms_median_of_blocks": statistics.median(diffs),
            "blocks": {label: [round(v, 4) for v in values] for label, values in per_block.items()},
            "authorize_alone_us": authorize_us(),
        }
        print(json.dumps(result, indent=2))
    finally:
        for client in clients.values():
            client.close()
        for server, _, _ in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
