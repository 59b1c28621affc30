"""deml-server: the command that runs the DeML server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from deml_server.config import ServerConfig
from deml_server.errors import DemlError
from deml_server.server import start_server


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """Flags override the environment's defaults."""
    config = ServerConfig()
    parser = argparse.ArgumentParser(prog="deml-server", description="Federated training and sharded inference.")
    parser.add_argument("--host", default=config.host, help="address to bind (default %(default)s: loopback)")
    parser.add_argument("--port", type=int, default=config.port, help="port (0 picks a free one; default %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=config.data_dir, help="jobs, models and artifacts")
    parser.add_argument("--workers", type=int, default=config.workers, help="training worker processes")
    parser.add_argument(
        "--inference-workers", type=int, default=config.inference_workers, help="onnxruntime worker processes"
    )
    parser.add_argument("--backend", default=config.backend, help="where work runs: local (default) or golem")
    parser.add_argument("--max-upload-bytes", type=int, default=config.max_upload_bytes)
    parser.add_argument("--task-timeout", type=float, default=config.task_timeout_seconds, help="seconds per task")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.host = args.host
    config.port = args.port
    config.data_dir = args.data_dir
    config.workers = args.workers
    config.inference_workers = args.inference_workers
    config.backend = args.backend
    config.max_upload_bytes = args.max_upload_bytes
    config.task_timeout_seconds = args.task_timeout
    return config


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM."""
    server = await start_server(config)
    # One machine-readable line, so scripts and tests can find the port when they passed --port 0.
    print(f"deml-server listening on {config.host}:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    """Entry point of `deml-server`."""
    try:
        config = parse_args(argv)
        asyncio.run(serve(config))
    except DemlError as exc:
        print(f"deml-server: {exc.reason}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
