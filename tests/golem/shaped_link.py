"""Provider links shaped to a fixed rate, for the Golem stand-in (tests and bench/bench_bandwidth.py; needs root).

Each link is a veth pair from this machine into a network namespace made for it, with a `tbf` qdisc on both
ends (one per direction), and a small file server inside the namespace that reads and writes the provider's VM
tree. The stand-in (standin.py) sends every upload and download of a provider through its link when given one,
so those bytes really cross a rate-limited interface. Nothing leaves the machine: the addresses are private /30s
(10.213.0.0/16) on the veth pairs created here, and the namespaces have no other interface than `lo`.

tc units: `bit` is bits per second, `bps` BYTES per second (`20mbps` = 160 Mbit/s). tbf counts whole frames
(Ethernet, IP and TCP headers too), so payload crosses at about 95 % of the rate (1448 bytes of every 1514).

    python tests/golem/shaped_link.py serve HOST PORT ROOT    # the file server (started inside a namespace)
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import socketserver
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

RATE_BYTES_PER_SECOND = 20_000_000
PORT = 7411
SUBNETS = ipaddress.IPv4Network("10.213.0.0/16")
_HEADER = struct.Struct("!cIQ")  # op (b"P" put, b"G" get), path length, payload length
_REPLY = struct.Struct("!cQ")  # status (b"K" ok, b"E" error), payload length
_PIECE = 1 << 20  # bytes a receive waits for (_receive)


def link_problem() -> str:
    """Why shaped links cannot be made here, or "" when they can."""
    if os.geteuid() != 0:
        return "shaped links need root (network namespaces, veth pairs and tc qdiscs)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    return ""


@dataclass
class Link:
    """One provider's link: the namespace, the host end of the veth pair and the file server's address."""

    namespace: str
    host_if: str
    address: str
    server: subprocess.Popen[bytes] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    bytes_up: int = 0  # payload bytes sent to the provider
    bytes_down: int = 0  # payload bytes fetched from the provider
    seconds: float = 0.0  # time spent in transfers


class ShapedLinks:
    """`count` provider links of `rate` bytes per second each way; `root` is the only tree the servers touch.

    A context manager: `__enter__` makes the namespaces, veth pairs, qdiscs and servers, `__exit__` removes all
    of them (also when making them failed half-way)."""

    def __init__(self, count: int, root: Path, rate: int = RATE_BYTES_PER_SECOND) -> None:
        if count < 1 or count > 64:
            raise ValueError(f"count must be 1..64 links, not {count}")
        if rate < 100_000:
            raise ValueError(f"rate must be at least 100000 bytes per second, not {rate}")
        self.count, self.root, self.rate = count, root.resolve(), rate
        self.links: list[Link] = []

    def __enter__(self) -> ShapedLinks:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            subnets = _free_subnets(self.count)
            tag = f"{os.getpid() % 100000}"
            for index, subnet in enumerate(subnets):
                self._make(f"deml-bw-{tag}-{index}", f"dbw{tag}h{index}", subnet)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _make(self, namespace: str, host_if: str, subnet: ipaddress.IPv4Network) -> None:
        host, peer = (str(a) for a in list(subnet.hosts())[:2])
        peer_if = host_if.replace("h", "p", 1)
        _run("ip", "netns", "add", namespace)
        link = Link(namespace=namespace, host_if=host_if, address=peer)
        self.links.append(link)  # from here on, close() removes it
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _run("ip", "link", "set", peer_if, "netns", namespace)
        _run("ip", "addr", "add", f"{host}/{subnet.prefixlen}", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "-n", namespace, "addr", "add", f"{peer}/{subnet.prefixlen}", "dev", peer_if)
        _run("ip", "-n", namespace, "link", "set", peer_if, "up")
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        for prefix, dev in ((["tc"], host_if), (["tc", "-n", namespace], peer_if)):
            # Egress of each end: host -> provider (uploads) and provider -> host (downloads).
            _run(*prefix, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{self.rate}bps", "burst", "64kb",
                 "latency", "100ms")  # fmt: skip
        command = ["ip", "netns", "exec", namespace, sys.executable, __file__, "serve", peer, str(PORT)]
        link.server = subprocess.Popen([*command, str(self.root)], stdout=subprocess.PIPE)
        assert link.server.stdout is not None
        if link.server.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the file server in {namespace} did not start (exit {link.server.poll()})")

    def close(self) -> None:
        """Stop the servers and delete the namespaces (which deletes their veth pairs)."""
        for link in self.links:
            if link.server is not None and link.server.poll() is None:
                link.server.terminate()
                try:
                    link.server.wait(10)
                except subprocess.TimeoutExpired:
                    link.server.kill()
                    link.server.wait()
            subprocess.run(["ip", "link", "del", link.host_if], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", link.namespace], capture_output=True, check=False)
        self.links.clear()

    def reset_counters(self) -> None:
        for link in self.links:
            link.bytes_up = link.bytes_down = 0
            link.seconds = 0.0

    async def put(self, provider: int, target: Path, data: bytes) -> None:
        """Write `data` to `target` (under root) on the far side of provider's link."""
        link = self.links[provider]
        async with link.lock:
            started = time.monotonic()
            await self._call(link, b"P", target, data)
            link.bytes_up += len(data)
            link.seconds += time.monotonic() - started

    async def get(self, provider: int, source: Path) -> bytes:
        """The bytes of `source` (under root), read on the far side of provider's link."""
        link = self.links[provider]
        async with link.lock:
            started = time.monotonic()
            data = await self._call(link, b"G", source, b"")
            link.bytes_down += len(data)
            link.seconds += time.monotonic() - started
            return data

    async def _call(self, link: Link, op: bytes, path: Path, data: bytes) -> bytes:
        # In a thread with a blocking socket: the bytes cross the link at its rate either way, and a blocking
        # receive of large pieces costs a fraction of the CPU of asyncio's stream reader (see _receive).
        status, body = await asyncio.to_thread(_exchange, link.address, op, str(path.resolve()).encode(), data)
        if status != b"K":
            raise OSError(f"link {link.namespace}: {body.decode(errors='replace')}")
        return body


def _exchange(address: str, op: bytes, name: bytes, data: bytes) -> tuple[bytes, bytes]:
    """One request to the file server at `address`: its reply's status and payload."""
    with socket.create_connection((address, PORT)) as sock:
        sock.sendall(_HEADER.pack(op, len(name), len(data)) + name)
        sock.sendall(data)
        status, size = _REPLY.unpack(_receive(sock, _REPLY.size))
        return status, bytes(_receive(sock, size))


def _receive(sock: socket.socket, size: int) -> bytearray:
    """Exactly `size` bytes from `sock`, in pieces of up to _PIECE, each one receive that waits for all of it.

    The stand-in's transfers run on this machine's cores, beside the providers' training, where a real provider's
    transfers run in its yagna on a machine of its own. A shaped link hands the receiver a few segments at a time:
    read as they came (a buffered socket file, asyncio's stream reader) they cost 17-24 ms of CPU per MB received
    here, a third of a core at 20 MB/s; received into place by waiting receives, 4-8 ms per MB. (A socket
    low-water mark would cut the wake-ups further, but with it the transfers stalled on this kernel.)"""
    out = bytearray(size)
    view = memoryview(out)
    done = 0
    while done < size:
        piece = min(_PIECE, size - done)
        got = sock.recv_into(view[done : done + piece], piece, socket.MSG_WAITALL)
        if got == 0:
            raise ConnectionError(f"the connection closed {size - done} bytes short of {size}")
        done += got
    return out


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {done.stderr.strip()}")


def _free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    """`count` /30s of SUBNETS that no interface on this machine uses yet."""
    listing = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    used = {ipaddress.ip_interface(w).network for line in listing.splitlines() for w in line.split()[3:4]}
    candidates = list(SUBNETS.subnets(new_prefix=30))
    # Start at a place of this process's own, so that two processes making links at once rarely pick the same.
    start = (os.getpid() * 64) % len(candidates)
    free = [s for s in candidates[start:] + candidates[:start] if not any(s.overlaps(u) for u in used)]
    if len(free) < count:
        raise RuntimeError(f"fewer than {count} free /30 subnets left in {SUBNETS}")
    return free[:count]


class _Handler(socketserver.BaseRequestHandler):
    """One request: put or get one file under the server's root."""

    def handle(self) -> None:
        root: Path = self.server.root  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        op, length, size = _HEADER.unpack(_receive(sock, _HEADER.size))
        path = Path(_receive(sock, length).decode()).resolve()
        data = _receive(sock, size)
        try:
            if not path.is_relative_to(root):
                raise PermissionError(f"{path} is outside {root}")
            if op == b"P":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                sock.sendall(_REPLY.pack(b"K", 0))
            elif op == b"G":
                with path.open("rb") as source:
                    sock.sendall(_REPLY.pack(b"K", os.fstat(source.fileno()).st_size))
                    sock.sendfile(source)
            else:
                raise ValueError(f"unknown op {op!r}")
        except (OSError, ValueError) as exc:
            sock.sendall(_REPLY.pack(b"E", len(str(exc).encode())) + str(exc).encode())


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(host: str, port: int, root: Path) -> None:
    """Serve files under `root` on host:port until terminated; prints "ready" once listening."""
    with _Server((host, port), _Handler) as server:
        server.root = root.resolve()  # type: ignore[attr-defined]
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        print("ready", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "serve":
        raise SystemExit(__doc__)
    serve(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
