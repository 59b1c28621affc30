"""Start the real yagna daemon (from golem-node) for tests, confined to loopback.

Call these only inside a network namespace that has nothing but `lo` (see netns_scenario.py): every address
yagna would use is also pointed at 127.0.0.1, so even a namespace mistake sends nothing outward.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# Every payment network yagna 0.17 knows; each would otherwise reach a public RPC endpoint.
PAYMENT_NETWORKS = (
    "MAINNET", "HOLESKY", "HOODI", "SEPOLIA", "GOERLI", "RINKEBY", "POLYGON", "MUMBAI", "AMOY", "ARBITRUM",
    "BASE", "OPTIMISM",
)  # fmt: skip
HERE = Path(__file__).resolve().parent


def yagna_binary() -> str | None:
    """The yagna that golem-node installed (next to this Python), or one on PATH."""
    beside = Path(sys.executable).parent / "yagna"
    if beside.is_file():
        return str(beside)
    return shutil.which("yagna")


def install_gftp_standin(bin_dir: Path, python: str) -> Path:
    """Put a `gftp` stand-in on a directory that the caller adds to PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "gftp"
    script.write_text(f'#!/bin/sh\nexec "{python}" "{HERE / "gftp_standin.py"}" "$@"\n')
    script.chmod(0o755)
    return script


def only_loopback() -> bool:
    """True when this process's network namespace has no interface but lo."""
    # /proc/self/net follows the namespace; /sys/class/net shows the namespace sysfs was mounted in.
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return [line.split(":")[0].strip() for line in lines] == ["lo"]


def foreign_peers() -> list[str]:
    """Remote addresses of sockets in this namespace that are neither loopback nor unspecified."""
    found: list[str] = []
    for name in ("tcp", "udp", "tcp6", "udp6"):
        path = Path("/proc/self/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            remote = line.split()[2].split(":")[0]
            if set(remote) == {"0"}:
                continue
            if len(remote) == 8 and remote.endswith("7F"):  # 127.x.x.x, little-endian hex
                continue
            if remote == "00000000000000000000000001000000":  # ::1
                continue
            found.append(f"{name} {remote}")
    return found


@dataclass
class Yagna:
    """One yagna daemon with its own data dir, GSB socket and REST port, all on loopback."""

    root: Path
    api_port: int = 7465
    central_net: str = ""  # "127.0.0.1:7464" to use central net mode
    gsb_url: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    app_key: str = ""
    started_after: float = 0.0

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            YAGNA_DATADIR=str(self.root / "data"),
            GSB_URL=self.gsb_url or f"unix:{self.root / 'yagna.sock'}",
            YAGNA_API_URL=self.api_url,
            YA_NET_RELAY_HOST="127.0.0.1:7477",
            YA_NET_BIND_URL="udp://127.0.0.1:0",
            YAGNA_DEV_SKIP_ALLOCATION_VALIDATION="1",
            YAGNA_AUTOCONF_APPKEY="",
            RUST_LOG="info",
        )
        for network in PAYMENT_NETWORKS:
            env[f"{network}_GETH_ADDR"] = "http://127.0.0.1:8545"
        if self.central_net:
            env.update(YA_NET_TYPE="central", CENTRAL_NET_HOST=self.central_net)
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 60.0) -> Yagna:
        binary = yagna_binary()
        assert binary, "yagna is not installed"
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        log = (self.root / "yagna.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, "service", "run", "--api-url", self.api_url, "--disable-metrics-push"],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            start_new_session=True,
        )
        began = time.monotonic()
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"yagna exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.api_port), 0.5):
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"yagna REST API did not answer within {timeout} s: {self.log_tail()}")
        self.started_after = time.monotonic() - began
        self.app_key = self.cli("app-key", "create", "requestor").strip().splitlines()[-1].strip('"')
        return self

    def start_again(self, timeout: float = 60.0) -> Yagna:
        """Restart on the same data dir (the net service binds identities at start), keeping the app key."""
        key = self.app_key
        self.start(timeout)
        self.app_key = key
        return self

    def cli(self, *args: str) -> str:
        binary = yagna_binary()
        assert binary
        done = subprocess.run([binary, *args], env=self.env(), capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"yagna {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def identity(self) -> str:
        raw = json.loads(self.cli("id", "show", "--json"))
        node = raw.get("Ok", raw)
        return str(node.get("nodeId") or node.get("node_id"))

    def get(self, path: str) -> object:
        request = urllib.request.Request(self.api_url + path, headers={"Authorization": f"Bearer {self.app_key}"})
        with urllib.request.urlopen(request, timeout=10) as reply:  # loopback only
            return json.loads(reply.read())

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "yagna.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def namespace_problem() -> str:
    """Why the real-daemon tests cannot run here, or "" when they can."""
    if yagna_binary() is None:
        return "yagna is not installed (pip install 'deml[golem]' brings golem-node's yagna)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run([*unshare_command(), "true"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"`{' '.join(unshare_command())}` is not permitted here (run as root): {probe.stderr.strip()}"
    return ""


def unshare_command() -> list[str]:
    """A new network namespace: directly as root, otherwise inside a user namespace where the kernel allows it."""
    return ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]


def run_scenario(work: Path, name: str, timeout: float = 300.0) -> dict[str, dict[str, object]]:
    """Run netns_scenario.py in a fresh network namespace; its checks by name."""
    done = subprocess.run(
        [*unshare_command(), sys.executable, str(HERE / "netns_scenario.py"), str(work), name],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    checks: dict[str, dict[str, object]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            checks[entry["check"]] = entry
    assert done.returncode == 0 and "end" in checks, f"scenario failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    return checks
