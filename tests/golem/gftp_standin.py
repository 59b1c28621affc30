"""Stand-in for `gftp server` (tests only): answers yapapi's JSON-RPC over stdin/stdout, transfers nothing.

yapapi's engine spawns `gftp server` at start even for jobs that move no files; golem-node ships no gftp.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    if sys.argv[1:] != ["server"]:
        print("gftp stand-in: only `gftp server` is supported", file=sys.stderr)
        sys.exit(2)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        method, params = request.get("method"), request.get("params") or {}
        if method == "version":
            result: object = "0.0.0-standin"
        elif method == "publish":
            result = [{"file": f, "url": f"gftp://standin/{i}"} for i, f in enumerate(params.get("files", []))]
        elif method == "receive":
            result = {"file": params.get("output_file", ""), "url": "gftp://standin/receive"}
        elif method == "close":
            result = ["ok" for _ in params.get("urls", [])]
        else:
            result = "ok"
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": request.get("id"), "result": result}) + "\n")
        sys.stdout.flush()
        if method == "shutdown":
            return


if __name__ == "__main__":
    main()
