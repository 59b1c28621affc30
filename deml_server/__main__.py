"""deml-server: the command that runs the DeML server, and its maintenance subcommands (check, backup)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from deml_server import security
from deml_server.config import ServerConfig
from deml_server.errors import DemlError
from deml_server.maintenance import run_backup, run_check
from deml_server.server import start_server


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """Flags override the environment's defaults."""
    config = ServerConfig()
    parser = argparse.ArgumentParser(
        prog="deml-server",
        description="Federated training and sharded inference.",
        epilog="maintenance: `deml-server check --data-dir DIR` verifies a data directory; `deml-server backup"
        " --data-dir DIR DEST` copies it consistently while the server runs (see --help of each)",
    )
    parser.add_argument("--host", default=config.host, help="address to bind (default %(default)s: loopback)")
    parser.add_argument("--port", type=int, default=config.port, help="port (0 picks a free one; default %(default)s)")
    parser.add_argument(
        "--http-port",
        type=int,
        default=config.http_port,
        help="port of the dashboard, /api, the OIP REST face and /metrics, on --host (0 picks a free one;"
        " default %(default)s)",
    )
    parser.add_argument(
        "--http",
        action=argparse.BooleanOptionalAction,
        default=config.http,
        help="serve HTTP besides gRPC (--no-http: gRPC only)",
    )
    parser.add_argument("--data-dir", type=Path, default=config.data_dir, help="jobs, models and artifacts")
    parser.add_argument("--workers", type=int, default=config.workers, help="training worker processes")
    parser.add_argument(
        "--inference-workers", type=int, default=config.inference_workers, help="onnxruntime worker processes"
    )
    parser.add_argument(
        "--inference-threads",
        type=int,
        default=config.inference_threads,
        help="onnxruntime threads per inference worker",
    )
    parser.add_argument("--backend", default=config.backend, help="where work runs: local (default) or golem")
    parser.add_argument(
        "--inference-backend", default=config.inference_backend, help="where inference shards run: local or golem"
    )
    parser.add_argument(
        "--shared-memory",
        action=argparse.BooleanOptionalAction,
        default=config.shared_memory,
        help="let clients on this host pass tensors through system shared memory (objects owned by this user)",
    )
    parser.add_argument("--max-upload-bytes", type=int, default=config.max_upload_bytes)
    parser.add_argument("--task-timeout", type=float, default=config.task_timeout_seconds, help="seconds per task")
    parser.add_argument(
        "--shutdown-grace",
        type=float,
        default=config.shutdown_grace_seconds,
        help="seconds SIGTERM/SIGINT gives the rounds and predictions in flight before stopping anyway (jobs resume"
        " from their last committed round at the next start; env DEML_SHUTDOWN_GRACE; default %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO")
    golem = parser.add_argument_group("golem backend (defaults from YAGNA_* and DEML_GOLEM_* variables)")
    golem.add_argument("--yagna-api-url", default=config.golem.api_url, help="yagna REST API (app key: YAGNA_APPKEY)")
    golem.add_argument("--golem-subnet", default=config.golem.subnet)
    golem.add_argument("--golem-payment-driver", default=config.golem.payment_driver)
    golem.add_argument("--golem-payment-network", default=config.golem.payment_network)
    golem.add_argument("--golem-budget", type=float, default=config.golem.budget_glm, help="GLM this server may spend")
    golem.add_argument("--golem-image-hash", default=config.golem.image_hash)
    golem.add_argument("--golem-image-tag", default=config.golem.image_tag)
    golem.add_argument("--golem-image-url", default=config.golem.image_url)
    golem.add_argument("--golem-min-mem-gib", type=float, default=config.golem.min_mem_gib)
    golem.add_argument("--golem-min-storage-gib", type=float, default=config.golem.min_storage_gib)
    golem.add_argument("--golem-min-threads", type=int, default=config.golem.min_cpu_threads)
    golem.add_argument(
        "--golem-gpu", action="store_true", default=config.golem.gpu, help="ask for vm-nvidia providers (polygon only)"
    )
    golem.add_argument(
        "--golem-horizon-hours", type=float, default=config.golem.horizon_hours, help="how long agreements (VMs) last"
    )
    golem.add_argument(
        "--golem-provider-wait", type=float, default=config.golem.provider_wait_seconds, help="seconds to an agreement"
    )
    golem.add_argument(
        "--golem-deploy-timeout",
        type=float,
        default=config.golem.deploy_timeout_seconds,
        help="seconds a provider may take to deploy the image (0: 1200 CPU, 3600 GPU)",
    )
    golem.add_argument(
        "--golem-max-start-price", type=float, default=config.golem.max_start_price_glm, help="GLM per agreement"
    )
    golem.add_argument(
        "--golem-max-cpu-price", type=float, default=config.golem.max_cpu_price_glm_per_hour, help="GLM per CPU hour"
    )
    golem.add_argument(
        "--golem-max-duration-price",
        type=float,
        default=config.golem.max_duration_price_glm_per_hour,
        help="GLM per hour of a provider's time",
    )
    golem.add_argument(
        "--golem-max-provider-failures",
        type=int,
        default=config.golem.max_provider_failures,
        help="failed tasks after which a provider is not used again",
    )
    security.add_flags(parser, config)
    config.sandbox.add_flags(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config.host = args.host
    config.port = args.port
    config.http_port = args.http_port
    config.http = args.http
    config.data_dir = args.data_dir
    config.workers = args.workers
    config.inference_workers = args.inference_workers
    config.inference_threads = args.inference_threads
    config.backend = args.backend
    config.inference_backend = args.inference_backend
    config.shared_memory = args.shared_memory
    config.max_upload_bytes = args.max_upload_bytes
    config.task_timeout_seconds = args.task_timeout
    config.shutdown_grace_seconds = args.shutdown_grace
    config.golem.api_url = args.yagna_api_url
    config.golem.subnet = args.golem_subnet
    config.golem.payment_driver = args.golem_payment_driver
    config.golem.payment_network = args.golem_payment_network
    config.golem.budget_glm = args.golem_budget
    config.golem.image_hash = args.golem_image_hash
    config.golem.image_tag = args.golem_image_tag
    config.golem.image_url = args.golem_image_url
    config.golem.min_mem_gib = args.golem_min_mem_gib
    config.golem.min_storage_gib = args.golem_min_storage_gib
    config.golem.min_cpu_threads = args.golem_min_threads
    config.golem.gpu = args.golem_gpu
    config.golem.horizon_hours = args.golem_horizon_hours
    config.golem.provider_wait_seconds = args.golem_provider_wait
    config.golem.deploy_timeout_seconds = args.golem_deploy_timeout
    config.golem.max_start_price_glm = args.golem_max_start_price
    config.golem.max_cpu_price_glm_per_hour = args.golem_max_cpu_price
    config.golem.max_duration_price_glm_per_hour = args.golem_max_duration_price
    config.golem.max_provider_failures = args.golem_max_provider_failures
    security.apply_flags(args, config)
    config.sandbox.apply_flags(args)
    return config


async def serve(config: ServerConfig) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully (a second signal stops waiting for work in flight)."""
    server = await start_server(config)
    # Machine-readable lines, so scripts and tests can find the ports when they passed port 0: gRPC first, then
    # the dashboard's URL when HTTP is on.
    print(f"deml-server listening on {config.host}:{server.port}", flush=True)
    if server.http is not None:
        print(f"deml-server dashboard at {server.http.url}", flush=True)
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            server.drain.cut_short()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, server.security.reload)
    await stop.wait()
    await server.shutdown(config.shutdown_grace_seconds)


SUBCOMMANDS = ("check", "backup")


def maintenance(argv: list[str]) -> int:
    """`deml-server check|backup ...`: verify or copy a data directory; the exit status says whether all is intact."""
    parser = argparse.ArgumentParser(prog="deml-server", description="Maintenance of a DeML data directory.")
    commands = parser.add_subparsers(dest="command", required=True)
    default_dir = ServerConfig().data_dir
    check = commands.add_parser(
        "check",
        help="verify the database (PRAGMA integrity_check) and every artifact against its sha256; exit 1 if"
        " anything is damaged or missing",
    )
    check.add_argument("--data-dir", type=Path, default=default_dir, help="the server's data directory")
    backup = commands.add_parser(
        "backup",
        help="copy the database (SQLite online backup; the server may be running) and the artifacts it names,"
        " each verified while copied; exit 1 if the copy is incomplete",
    )
    backup.add_argument("--data-dir", type=Path, default=default_dir, help="the server's data directory")
    backup.add_argument("dest", type=Path, help="a new or empty directory for the copy (a data directory itself)")
    args = parser.parse_args(argv)
    if args.command == "check":
        return run_check(args.data_dir)
    return run_backup(args.data_dir, args.dest)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `deml-server`."""
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] in SUBCOMMANDS:
            raise SystemExit(maintenance(args))
        config = parse_args(args)
        asyncio.run(serve(config))
    except DemlError as exc:
        print(f"deml-server: {exc.reason}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
