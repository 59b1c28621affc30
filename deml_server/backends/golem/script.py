"""What a provider's VM runs: the bundle's files addressed by content, the shell script, the result unpacked.

Nothing here imports yapapi; the backend turns these plans into yapapi Script commands.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shlex
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from provider_runtime.reference import REFERENCE_DIR_ENV

# Inside the VM (provider_runtime/Dockerfile declares both as volumes).
VM_INPUT = "/golem/input"
VM_OUTPUT = "/golem/output"
VM_CACHE = f"{VM_INPUT}/cache"
# Where the job's resident worker keeps its socket, PID file and log.
VM_RESIDENT = f"{VM_INPUT}/resident"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Upload:
    """One file of the bundle, stored on the VM under its content hash."""

    relative: str
    digest: str
    source: Path | None = None
    data: bytes | None = None

    @property
    def target(self) -> str:
        """Where the file lives on the VM; the same content always goes to the same place."""
        return f"{VM_CACHE}/{self.digest}"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Digests of files by identity (device, inode, size, modification and change times). A round's global weights are
# one read-only file hard-linked into each of its task bundles: hashed once a round, not once a task (a 271 MB
# file costs 0.2 s of a core each time).
_digests: OrderedDict[tuple[int, int, int, int, int], str] = OrderedDict()
_DIGESTS_KEPT = 64


def file_digest(path: Path) -> str:
    """sha256_file, remembered for the same file as long as it is unchanged (its inode, size and times)."""
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _digests.get(key)
    if digest is None:
        digest = sha256_file(path)
        if path.stat().st_mtime_ns == st.st_mtime_ns:
            _digests[key] = digest
            while len(_digests) > _DIGESTS_KEPT:
                _digests.popitem(last=False)
    return digest


def pack_code(code_dir: Path) -> bytes:
    """A reproducible tar.gz of the user's code (same bytes for the same files, so it is uploaded once)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in sorted(code_dir.rglob("*")):
            if "__pycache__" in path.parts or not (path.is_file() or path.is_dir()):
                continue
            info = archive.gettarinfo(str(path), str(path.relative_to(code_dir)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if path.is_file():
                with path.open("rb") as f:
                    archive.addfile(info, f)
            else:
                archive.addfile(info)
    # gzip's header holds a timestamp: zero it so the bytes depend on the content only.
    return gzip.compress(buffer.getvalue(), compresslevel=6, mtime=0)


def plan_uploads(bundle: Path) -> tuple[bytes, list[Upload]]:
    """task.json, the packed code and every other file of a bundle, each addressed by content."""
    task_json = (bundle / "task.json").read_bytes()
    code = pack_code(bundle / "code")
    uploads = [Upload("code.tar.gz", hashlib.sha256(code).hexdigest(), data=code)]
    for path in sorted(bundle.rglob("*")):
        relative = path.relative_to(bundle)
        if not path.is_file() or relative.parts[0] == "code" or relative.parts == ("task.json",):
            continue
        uploads.append(Upload(str(PurePosixPath(*relative.parts)), file_digest(path), source=path))
    return task_json, uploads


def resident_key(job_id: str) -> str:
    """The name a job's resident worker goes by on a provider's VM (provider_runtime.resident)."""
    return hashlib.sha256(job_id.encode()).hexdigest()[:16]


def vm_command(action: str, uploads: list[Upload], job_id: str) -> str:
    """The shell script run in the VM: lay the bundle out from the cache, run provider_runtime, pack the result.

    The task runs in the job's resident worker on the VM (provider_runtime.resident: started by the job's first
    task there, it keeps torch imported, the reference, the data and the update's rounding residuals in memory).
    """
    task = f"{VM_INPUT}/task"
    lines = [
        "set -e",
        f"rm -rf {task} {VM_OUTPUT}/result {VM_OUTPUT}/result.tar",
        f"mkdir -p {task}/code {VM_OUTPUT}/result",
        f"mv {VM_INPUT}/task.json {task}/task.json",
    ]
    for upload in uploads:
        if upload.relative == "code.tar.gz":
            lines.append(f"tar -xzf {upload.target} -C {task}/code")
            continue
        target = shlex.quote(f"{task}/{upload.relative}")
        lines.append(f"mkdir -p $(dirname {target}) && ln -s {upload.target} {target}")
    lines += [
        # The global weights' reference (int8 broadcast) is kept on the VM between tasks: a task then reads it and
        # one delta, not the chain's keyframe and every delta since.
        f"{REFERENCE_DIR_ENV}={VM_INPUT}/reference python3 -m provider_runtime {shlex.quote(action)} "
        f"--input {task} --output {VM_OUTPUT}/result --resident {VM_RESIDENT} --key {resident_key(job_id)}",
        # Not gzipped: the result is weights (fp32 values barely deflate; compressed updates are packed already),
        # and gzip -6 of a 68 MB update costs a provider seconds of CPU to save ~7 % of it.
        f"tar -cf {VM_OUTPUT}/result.tar -C {VM_OUTPUT}/result .",
    ]
    return "\n".join(lines)


def unpack_result(archive: Path, dest: Path) -> None:
    """Extract a provider's result bundle; links, devices and paths outside dest are refused."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:") as tar:
        tar.extractall(dest, filter="data")
    if not (dest / "result.json").is_file():
        raise ValueError("the result bundle has no result.json")
    json.loads((dest / "result.json").read_text())
