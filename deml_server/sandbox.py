"""The kernel sandbox around the local backend's training workers (bubblewrap).

Why bubblewrap rather than `unshare` + `setpriv` + a mount script: one exec builds the whole view from an empty
tmpfs root with explicit, read-only binds (an allowlist: nothing of the host is visible unless named here),
sets PR_SET_NO_NEW_PRIVS unconditionally, makes the network, PID, IPC and UTS namespaces, kills the sandbox when
the server dies (--die-with-parent), and works both for a root server and, through an unprivileged user
namespace, for a non-root one. `unshare` alone would need a shell and `mount` inside the new namespace to lay the
same view out, and a second helper to drop privileges. The worker inside is the ordinary long-lived
`python -m provider_runtime serve`, so it stays warm (torch imported, its data cache filled) for as long as its job
runs.

What a worker sees: /usr (and the /bin, /lib symlinks), the Python installation, the virtual environment, the
provider_runtime package, a few files of /etc, a private /dev and /proc, and three directories of its own: the
task bundles handed to it (read-only, /deml/in), where it writes results (/deml/out) and its scratch space
(/deml/tmp: HOME, TMPDIR, and /tmp unless an operator's read-only path lies under /tmp), and any host directory
the operator lists with --worker-read-only-path. The server's data directory (database, artifacts, other jobs)
is not there, even under such a path; the root is read-only; there is no network (a fresh network namespace
whose loopback is not the server's).

Who it runs as: with a root server, bwrap keeps the host's user namespace and `setpriv` switches the worker to
an unprivileged uid of its own (uid_base + slot; per slot so that one worker's RLIMIT_NPROC cannot starve
another's) with every capability and the bounding set dropped. Without root, bwrap makes a user namespace
mapping the server's uid, drops every capability and disables further user namespaces. Either way the worker
cannot see, signal or ptrace the server (its own PID namespace) and cannot regain privileges (no_new_privs).
The rlimits (provider_runtime.limits) are applied by the worker to itself before it reads its first request.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deml_server.envvars import env_bool, env_int, env_str
from deml_server.errors import InvalidArgument
from provider_runtime.limits import LIMITS_ENV, WorkerLimits

__all__ = ["IN_DIR", "OUT_DIR", "SCRATCH_DIR", "Sandbox", "SandboxConfig", "SandboxUnavailable", "default_limits"]

IN_DIR = Path("/deml/in")
OUT_DIR = Path("/deml/out")
SCRATCH_DIR = Path("/deml/tmp")

# /etc files Python, glibc and torch may read; nothing else of /etc is visible.
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "localtime", "nsswitch.conf", "passwd", "group", "hosts")
_PROBE_TIMEOUT = 30.0


class SandboxUnavailable(Exception):
    """The host cannot run sandboxed workers; the message says why in words."""


def default_limits() -> WorkerLimits:
    """Sane defaults for a training worker.

    The machine's RAM as address space (at least 8 GiB), 16 GiB files, 4096 open files, 1024 processes and
    threads, a day of CPU time in the worker's life.
    """
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 0
    return WorkerLimits(
        memory_bytes=max(ram, 8 << 30),
        file_bytes=16 << 30,
        open_files=4096,
        processes=1024,
        cpu_seconds=86_400,
    )


@dataclass(frozen=True)
class Sandbox:
    """How to start one sandboxed training worker; `probe()` says whether this host can."""

    bwrap: str = "bwrap"
    limits: WorkerLimits = field(default_factory=default_limits)
    # Root servers only: worker slot N runs as uid (and gid) uid_base + N.
    uid_base: int = 2_000_000_000
    python: str = sys.executable
    # Paths to hide even if they lie inside a path the sandbox binds (the server's data directory).
    hidden: tuple[Path, ...] = ()
    # Host directories every worker may read (datasets), bound read-only at the same path.
    read_only: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        for path in self.read_only:
            if any(path.resolve().is_relative_to(h) for h in self.hidden):
                raise InvalidArgument(f"worker read-only path {path} lies inside the server's data directory")

    @property
    def as_root(self) -> bool:
        """Whether the server is root (then the worker's uid is switched rather than mapped)."""
        return os.geteuid() == 0

    def worker_uid(self, slot: int) -> int:
        """The uid files in a worker's output and scratch directories must belong to."""
        return self.uid_base + slot if self.as_root else os.geteuid()

    def command(self, slot: int, exchange: Path, argv: Sequence[str], env: dict[str, str]) -> list[str]:
        """The command line running `argv` (a path inside the sandbox, e.g. python) with only `env` set.

        `exchange` holds the worker's in/, out/ and tmp/ directories (see prepare_exchange). Start it in a session
        of its own (start_new_session): the sandbox then has no controlling terminal to push input into (what
        bwrap's --new-session guards against), and its processes stay in one process group, which is how the
        backend kills all of them (--new-session would put the namespace's first process in a group of its own,
        out of reach if bwrap is killed before that process has armed --die-with-parent).
        """
        args = [
            self.bwrap,
            "--unshare-pid",
            "--unshare-net",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
        ]
        if not self.as_root:
            args += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        args += self._mounts(exchange)
        args += ["--clearenv"]
        for key, value in {**env, LIMITS_ENV: self.limits.to_env()}.items():
            args += ["--setenv", key, value]
        args += ["--chdir", str(SCRATCH_DIR), "--"]
        if self.as_root:
            uid = str(self.worker_uid(slot))
            args += [
                _setpriv(),
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
            ]
        return args + list(argv)

    def prepare_exchange(self, exchange: Path, slot: int) -> None:
        """Create the worker's in/ (server-owned, read-only inside), out/ and tmp/ (the worker's own)."""
        if exchange.exists():
            shutil.rmtree(exchange)
        for sub in ("in", "out", "tmp"):
            (exchange / sub).mkdir(parents=True, mode=0o755)
        uid = self.worker_uid(slot)
        for sub in ("out", "tmp"):
            (exchange / sub).chmod(0o700)
            if self.as_root:
                os.chown(exchange / sub, uid, uid)

    def give(self, path: Path, slot: int) -> None:
        """Hand a directory the server created to the worker (root servers: chown it to the worker's uid)."""
        if self.as_root:
            uid = self.worker_uid(slot)
            os.chown(path, uid, uid)

    def can_read(self, st: os.stat_result) -> bool:
        """Whether the worker may read a file the server owns (a root server's workers have uids of their own).

        Artifacts are private to the server (0600), so their bundle entries (weights) are copied, not linked.
        """
        return not self.as_root or bool(st.st_mode & stat.S_IROTH)

    def python_paths(self) -> tuple[list[str], str]:
        """The worker's interpreter (as the server runs it) and the PYTHONPATH that finds provider_runtime."""
        return [self.python], str(_package_root())

    def probe(self, scratch: Path) -> None:
        """Start a throwaway sandboxed Python that checks what it must not see; SandboxUnavailable if that fails."""
        if shutil.which(self.bwrap) is None:
            raise SandboxUnavailable(
                f"bubblewrap ({self.bwrap!r}) is not installed or not on PATH (Debian: apt-get install bubblewrap)"
            )
        if self.as_root and shutil.which("setpriv") is None:
            raise SandboxUnavailable("setpriv (util-linux) is not installed; a root server needs it to drop to a uid")
        exchange = scratch / "probe"
        self.prepare_exchange(exchange, 0)
        # The worker's own checks: its interpreter and provider_runtime load, and the server's data is not there.
        check = (
            "import os, sys\n"
            "import provider_runtime.limits\n"
            f"hidden = {[str(p) for p in self.hidden]!r}\n"
            "assert not any(os.path.isdir(p) and os.listdir(p) for p in hidden), 'the data directory is visible'\n"
            "print('ok')\n"
        )
        executable, pythonpath = self.python_paths()
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": pythonpath, "HOME": str(SCRATCH_DIR)}
        command = self.command(0, exchange, [*executable, "-c", check], env)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxUnavailable(f"bubblewrap could not be started: {exc}") from None
        finally:
            shutil.rmtree(exchange, ignore_errors=True)
        if done.returncode != 0 or done.stdout.strip() != "ok":
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise SandboxUnavailable(f"bubblewrap cannot build the worker sandbox on this host: {why}")

    def _mounts(self, exchange: Path) -> list[str]:
        sources = _system_paths(self.python, self.read_only)
        args: list[str] = []
        made: set[str] = {"/"}
        for target in [*sources, IN_DIR, OUT_DIR, SCRATCH_DIR]:
            # bwrap would create missing parents 0700 when running as root: make them 0755 so the worker can pass.
            for parent in reversed(Path(target).parents):
                if str(parent) not in made:
                    made.add(str(parent))
                    args += ["--perms", "0755", "--dir", str(parent)]
        for name in ("bin", "lib", "lib64", "sbin"):
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), str(host)]
            elif host.is_dir():
                args += ["--ro-bind", str(host), str(host)]
        for path in sources:
            args += ["--ro-bind", str(path), str(path)]
        if not any(p.is_relative_to("/tmp") for p in sources):
            # Programs that write to /tmp rather than $TMPDIR get the scratch space too.
            args += ["--symlink", str(SCRATCH_DIR), "/tmp"]
        for name in _ETC_FILES:
            args += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        for hidden in self.hidden:
            if any(hidden.is_relative_to(p) for p in sources):
                args += ["--tmpfs", str(hidden)]
        args += [
            "--ro-bind",
            str(exchange / "in"),
            str(IN_DIR),
            "--bind",
            str(exchange / "out"),
            str(OUT_DIR),
            "--bind",
            str(exchange / "tmp"),
            str(SCRATCH_DIR),
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--remount-ro",
            "/",
        ]
        return args


def _package_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _setpriv() -> str:
    return shutil.which("setpriv") or "/usr/bin/setpriv"


def _system_paths(python: str, extra: Sequence[Path] = ()) -> list[Path]:
    """Read-only binds: /usr, the interpreter's installation, the venv, provider_runtime (not the whole repo)."""
    candidates = [
        *(p.resolve() for p in extra),
        Path("/usr"),
        Path(sys.base_prefix).resolve(),
        Path(sys.prefix).resolve(),
        Path(python).resolve().parent,
        _package_root() / "provider_runtime",
    ]
    # Site-packages outside the prefixes (e.g. a user site) that the worker's imports come from.
    for name in ("torch", "numpy", "onnxruntime", "safetensors", "onnx"):
        spec = _find_spec_dir(name)
        if spec is not None:
            candidates.append(spec)
    paths: list[Path] = []
    for path in sorted({p for p in candidates if p.exists()}, key=lambda p: len(p.parts)):
        if not any(path.is_relative_to(kept) for kept in paths):
            paths.append(path)
    return paths


def _find_spec_dir(name: str) -> Path | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent


_MIB = 1 << 20


@dataclass
class SandboxConfig:
    """deml-server's settings for the training workers' sandbox (DEML_* variables, flags override)."""

    # The bubblewrap binary; "none" means no sandbox mechanism (start-up then needs allow_unsandboxed).
    bwrap: str = field(default_factory=lambda: env_str("DEML_BWRAP", "bwrap"))
    allow_unsandboxed: bool = field(default_factory=lambda: env_bool("DEML_ALLOW_UNSANDBOXED_WORKERS", False))
    uid_base: int = field(default_factory=lambda: env_int("DEML_SANDBOX_UID_BASE", 2_000_000_000))
    # Per-worker limits, 0 for none; defaults from default_limits().
    memory_mb: int = field(default_factory=lambda: env_int("DEML_WORKER_MEMORY_MB", -1))
    file_size_mb: int = field(default_factory=lambda: env_int("DEML_WORKER_FILE_SIZE_MB", -1))
    open_files: int = field(default_factory=lambda: env_int("DEML_WORKER_OPEN_FILES", -1))
    processes: int = field(default_factory=lambda: env_int("DEML_WORKER_PROCESSES", -1))
    cpu_seconds: int = field(default_factory=lambda: env_int("DEML_WORKER_CPU_SECONDS", -1))
    # Host directories (datasets) every worker may read; DEML_WORKER_READ_ONLY_PATHS separates them with ":".
    read_only_paths: list[Path] = field(
        default_factory=lambda: [Path(p) for p in env_str("DEML_WORKER_READ_ONLY_PATHS", "").split(os.pathsep) if p]
    )

    def limits(self) -> WorkerLimits:
        """The rlimits, each unset one (-1) from default_limits(); InvalidArgument names a bad one."""
        base = default_limits()

        def pick(value: int, default: int, scale: int = 1) -> int:
            return default if value == -1 else value * scale

        try:
            return WorkerLimits(
                memory_bytes=pick(self.memory_mb, base.memory_bytes, _MIB),
                file_bytes=pick(self.file_size_mb, base.file_bytes, _MIB),
                open_files=pick(self.open_files, base.open_files),
                processes=pick(self.processes, base.processes),
                cpu_seconds=pick(self.cpu_seconds, base.cpu_seconds),
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    def sandbox(self, *, python: str, hidden: Sequence[Path]) -> Sandbox | None:
        """The Sandbox to start workers in; None when the mechanism is "none"."""
        if self.bwrap.strip().lower() in ("", "none"):
            return None
        return Sandbox(
            bwrap=self.bwrap,
            limits=self.limits(),
            uid_base=self.uid_base,
            python=python,
            hidden=tuple(hidden),
            read_only=tuple(self.read_only_paths),
        )

    def add_flags(self, parser: argparse.ArgumentParser) -> None:
        """The "worker sandbox" flag group of deml-server."""
        group = parser.add_argument_group("training worker sandbox (see README, 'Running on a network')")
        group.add_argument(
            "--bwrap", default=self.bwrap, help="bubblewrap binary, or 'none' (DEML_BWRAP; default %(default)s)"
        )
        group.add_argument(
            "--allow-unsandboxed-workers",
            action="store_true",
            default=self.allow_unsandboxed,
            help="run user code without the sandbox when this host cannot sandbox (DEML_ALLOW_UNSANDBOXED_WORKERS)",
        )
        group.add_argument(
            "--sandbox-uid-base",
            type=int,
            default=self.uid_base,
            help="root servers: worker slot N runs as uid BASE+N (DEML_SANDBOX_UID_BASE; default %(default)s)",
        )
        group.add_argument(
            "--worker-read-only-path",
            action="append",
            type=Path,
            default=list(self.read_only_paths),
            metavar="DIR",
            help="a host directory (datasets) every worker may read; repeatable (DEML_WORKER_READ_ONLY_PATHS, ':')",
        )
        for flag, attr, what in (
            ("--worker-memory-mb", "memory_mb", "address space per worker, MiB (default: RAM, at least 8 GiB)"),
            ("--worker-file-size-mb", "file_size_mb", "largest file a worker writes, MiB (default 16384)"),
            ("--worker-open-files", "open_files", "open files per worker (default 4096)"),
            ("--worker-processes", "processes", "processes and threads per worker (default 1024)"),
            ("--worker-cpu-seconds", "cpu_seconds", "CPU seconds in a worker's life (default 86400)"),
        ):
            env = "DEML_WORKER_" + attr.upper()
            group.add_argument(flag, type=int, default=getattr(self, attr), help=f"{what}; 0: no limit ({env})")

    def apply_flags(self, args: argparse.Namespace) -> None:
        """Take the parsed flags of add_flags."""
        self.bwrap = args.bwrap
        self.allow_unsandboxed = args.allow_unsandboxed_workers
        self.uid_base = args.sandbox_uid_base
        self.memory_mb = args.worker_memory_mb
        self.file_size_mb = args.worker_file_size_mb
        self.open_files = args.worker_open_files
        self.processes = args.worker_processes
        self.cpu_seconds = args.worker_cpu_seconds
        self.read_only_paths = list(args.worker_read_only_path)
