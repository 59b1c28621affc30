"""Runs inside `unshare --net` (a namespace with only lo): real yagna + the golem backend through yapapi.

Prints one JSON line per check; the tests assert on them. Usage: netns_scenario.py WORK_DIR [errors|negotiation]
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import struct
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from rest_provider import RestProvider  # noqa: E402
from yagna_netns import Yagna, foreign_peers, install_gftp_standin, only_loopback  # noqa: E402

from deml_server.backends.base import WorkItem  # noqa: E402
from deml_server.backends.golem import GolemBackend  # noqa: E402
from deml_server.backends.golem_config import GolemConfig  # noqa: E402
from deml_server.bundle import TaskBundle  # noqa: E402
from deml_server.errors import DemlError  # noqa: E402

IMAGE_HASH = "0" * 56
IMAGE_URL = "http://127.0.0.1:8000/deml.gvmi"  # never fetched: no provider exists


def loopback_up() -> None:
    """`ip link set lo up` without needing iproute2."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def report(check: str, **fields: Any) -> None:
    print(json.dumps({"check": check, **fields}), flush=True)


def item(root: Path, timeout: float = 60.0) -> WorkItem:
    code = root / "code"
    code.mkdir(parents=True, exist_ok=True)
    (code / "task.py").write_text(textwrap.dedent("import torch\n\ndef model():\n    return torch.nn.Linear(4, 2)\n"))
    bundle = TaskBundle(action="init", module="task").write(root / "in", code)
    (root / "out").mkdir(exist_ok=True)
    return WorkItem(label="job netns init", action="init", bundle=bundle, output=root / "out", timeout=timeout)


def config(yagna: Yagna, **overrides: Any) -> GolemConfig:
    cfg = GolemConfig(
        app_key=yagna.app_key,
        api_url=yagna.api_url,
        subnet="deml-netns-test",
        payment_driver="erc20",
        payment_network="hoodi",
        budget_glm=0.5,
        image_hash=IMAGE_HASH,
        image_url=IMAGE_URL,
        provider_wait_seconds=20.0,
        horizon_hours=1.0,
        deploy_timeout_seconds=60.0,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


async def attempt(backend: GolemBackend, work: WorkItem) -> tuple[str, str, float]:
    """Run one item; return (error class, message, seconds)."""
    started = time.monotonic()
    try:
        await backend.start()
        outcome = await backend.run(work)
        return ("outcome", f"ok={outcome.ok} {outcome.error}", time.monotonic() - started)
    except DemlError as exc:
        return (type(exc).__name__, exc.reason, time.monotonic() - started)
    finally:
        await backend.close()


async def watch_demands(yagna: Yagna, seen: list[dict[str, Any]], stop: asyncio.Event) -> None:
    """Poll yagna's market API for our demand (proof that yapapi got as far as posting it)."""
    while not stop.is_set():
        try:
            demands = await asyncio.to_thread(yagna.get, "/market-api/v1/demands")
            if isinstance(demands, list) and demands and not seen:
                seen.append(demands[0])
        except OSError:
            pass
        await asyncio.sleep(1.0)


async def main(work: Path) -> None:
    bin_dir = work / "bin"
    install_gftp_standin(bin_dir, sys.executable)
    plain_path = os.environ["PATH"]
    report("namespace", only_loopback=only_loopback())

    # Without the dev flag yagna validates allocations against the chain, which it cannot reach.
    yagna = Yagna(work / "yagna-a", extra_env={"YAGNA_DEV_SKIP_ALLOCATION_VALIDATION": ""}).start()
    try:
        report("started", seconds_to_api=yagna.started_after)
        wrong_key = GolemBackend(config=config(yagna, app_key="not-a-key"), work_dir=work / "w1")
        result = await attempt(wrong_key, item(work / "i1"))
        report("wrong_key", error=result[0], message=result[1])
        os.environ["PATH"] = plain_path
        result = await attempt(GolemBackend(config=config(yagna), work_dir=work / "w2"), item(work / "i2"))
        report("no_gftp", error=result[0], message=result[1])
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{plain_path}"
        result = await attempt(GolemBackend(config=config(yagna), work_dir=work / "w3"), item(work / "i3"))
        report("allocation", error=result[0], message=result[1])
        gpu = GolemBackend(config=config(yagna, gpu=True), work_dir=work / "w6")
        result = await attempt(gpu, item(work / "i6"))
        report("gpu_on_hoodi", error=result[0], message=result[1], seconds=result[2])
    finally:
        yagna.stop()

    yagna = Yagna(work / "yagna-b").start()
    try:
        seen: list[dict[str, Any]] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_demands(yagna, seen, stop))
        backend = GolemBackend(config=config(yagna), work_dir=work / "w4")
        result = await attempt(backend, item(work / "i4"))
        stop.set()
        await watcher
        report(
            "no_provider",
            error=result[0],
            message=result[1],
            seconds=result[2],
            demand_posted=bool(seen),
            demand_constraints=(seen[0].get("constraints", "") if seen else ""),
            peers=foreign_peers(),
        )
    finally:
        yagna.stop()
    report("end", only_loopback=only_loopback(), peers=foreign_peers())


async def negotiation(work: Path) -> None:
    """Central net, one daemon, a second identity as a REST-only provider: negotiate up to ActivityCreated."""
    install_gftp_standin(work / "bin", sys.executable)
    os.environ["PATH"] = f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}"
    report("namespace", only_loopback=only_loopback())
    yagna = Yagna(work / "yagna-c", central_net="127.0.0.1:7464", gsb_url="tcp://127.0.0.1:7464").start()
    provider: RestProvider | None = None
    try:
        created = json.loads(yagna.cli("id", "create", "provider", "--no-password", "--json"))
        provider_id = created.get("Ok", created)["nodeId"]
        provider_key = yagna.cli("app-key", "create", "provider", "--id", provider_id).strip().splitlines()[-1]
        yagna.stop()
        yagna.start_again()  # the central net binds identities when the daemon starts
        provider = RestProvider(yagna.api_url, provider_key.strip('"'), provider_id, "deml-netns-test").start()
        seen: list[str] = []
        backend = GolemBackend(config=config(yagna, provider_wait_seconds=25.0), work_dir=work / "w5")
        forward = backend._on_event

        def record(event: Any) -> None:
            seen.append(type(event).__name__)
            forward(event)

        backend._on_event = record  # type: ignore[method-assign]
        result = await attempt(backend, item(work / "i5"))
        provider.stop()
        report(
            "negotiation",
            error=result[0],
            message=result[1],
            seconds=result[2],
            events=sorted(set(seen)),
            provider_agreements=len(provider.agreements),
            provider_activities=len(provider.activities),
            requestor=yagna.identity(),
            provider=provider_id,
            peers=foreign_peers(),
        )
    finally:
        if provider is not None:
            provider.stop()
        yagna.stop()
    report("end", only_loopback=only_loopback(), peers=foreign_peers())


if __name__ == "__main__":
    loopback_up()
    scenario = sys.argv[2] if len(sys.argv) > 2 else "errors"
    asyncio.run(negotiation(Path(sys.argv[1])) if scenario == "negotiation" else main(Path(sys.argv[1])))
