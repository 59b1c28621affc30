"""Inference worker: keeps onnxruntime sessions open and runs the shards a gateway hands it.

Started as `python -m provider_runtime.infer_worker --in-file A --out-file B`. Control messages are JSON lines:
requests on stdin, replies on the stdout the process was started with (fd 1 itself is pointed at stderr, so a stray
print cannot corrupt the protocol). Tensors never travel through the pipes: the caller writes inputs into the
shared input file (on /dev/shm) and names their offsets; the worker reads them in place, runs the session and
writes the outputs into the shared output file, growing it when they do not fit, and replies with their offsets.

Requests:
  {"id": 1, "load": "/path/model.onnx"}                     -> {"id": 1, "ok": true, "providers": [...]}
  {"id": 3, "forget": [path, ...]}                          -> {"id": 3, "ok": true}  (unmap clients' files)
  {"id": 2, "model": PATH, "in_size": N,
   "inputs": [[name, dtype, shape, offset], ...]}           -> {"id": 2, "ok": true, "out_size": M,
                                                               "outputs": [[name, dtype, shape, offset], ...]}
  failures                                                  -> {"id": n, "ok": false, "kind": K, "error": text}
     K is "load" (the model cannot be opened), "input" (onnxruntime rejected the inputs), "resources" (no room
     for the outputs in shared memory), "cancelled" or "error".
An input may instead live in a client's shared-memory file: [name, dtype, shape, offset, path, [dev, inode]] is
read in place from that file. "outputs_to": [[name, path, [dev, inode], offset, capacity], ...] asks for outputs
to be written into such files; their reply entries carry a fifth element, 1, and an offset into that file.
A file whose (dev, inode) differs from the request's was replaced since its region was registered: refused.
A line with an id on the file descriptor given as --cancel-fd stops the run with that id (RunOptions.terminate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import signal
import sys
import threading
from collections import OrderedDict
from typing import IO, Any

import numpy as np
import onnxruntime as ort

from provider_runtime.lifeline import die_with_parent
from provider_runtime.shared_files import reserve

ALIGN = 64
MIN_OUT_BYTES = 1 << 20
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def aligned(offset: int) -> int:
    """Round up to the alignment every tensor in the shared files starts at."""
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def choose_providers(device: str, available: list[str]) -> list[str]:
    """CUDA first when asked for or offered ('auto'), CPU always as the fallback."""
    if device == "cpu":
        return [CPU]
    if device == "cuda" and CUDA not in available:
        raise SystemExit("infer_worker: --device cuda, but onnxruntime offers no CUDAExecutionProvider")
    if CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class SharedFile:
    """A file on a RAM-backed file system, mapped read-write; remapped when it has grown."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR)
        self.map: mmap.mmap | None = None
        self.size = 0
        self.remap()

    def remap(self) -> None:
        """Map the file at its current size (old views keep the old mapping alive until they are dropped)."""
        size = os.fstat(self._fd).st_size
        if size and size != self.size:
            self.map = mmap.mmap(self._fd, size)
            self.size = size

    def ensure(self, size: int) -> mmap.mmap:
        """The mapping, covering at least `size` bytes (the other side grew the file)."""
        if size > self.size:
            self.remap()
        if self.map is None or size > self.size:
            raise RuntimeError(f"shared file {self.path} is {self.size} bytes, {size} needed")
        return self.map

    def grow(self, size: int) -> mmap.mmap:
        """Make the file at least `size` bytes (doubling, to grow rarely) and map it.

        Pages are reserved up front (OSError when the RAM file system has no room even for `size`).
        """
        if size > self.size:
            reserve(self._fd, [max(size, 2 * self.size, MIN_OUT_BYTES), size], self.size)
            self.remap()
        assert self.map is not None
        return self.map


class ClientFiles:
    """Clients' shared-memory files, mapped on first use and kept open (the most recently used few)."""

    def __init__(self, limit: int = 16) -> None:
        self._limit = limit
        self._open: OrderedDict[str, tuple[tuple[int, int], int, mmap.mmap]] = OrderedDict()

    def buffer(self, path: str, identity: list[int], end: int) -> mmap.mmap:
        """The mapping of `path`, which must be the file registered as `identity` and hold at least `end` bytes."""
        want = (int(identity[0]), int(identity[1]))
        # The name must still lead to the registered file: a client that replaced it would otherwise have this
        # worker read the old, unlinked file while it writes the new one.
        _check_identity(path, os.stat(path, follow_symlinks=False), want)
        found = self._open.get(path)
        if found is not None and found[0] != want:
            self._close(path)
            found = None
        if found is None:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
            stat = os.fstat(fd)
            try:
                _check_identity(path, stat, want)  # replaced between the check above and the open
            except InputError:
                os.close(fd)
                raise
            found = (want, fd, mmap.mmap(fd, stat.st_size))
            self._open[path] = found
            while len(self._open) > self._limit:
                self._close(next(iter(self._open)))
        self._open.move_to_end(path)
        _, fd, mapping = found
        # A client may have shrunk the file: touching pages beyond its end would kill this process (SIGBUS).
        size = os.fstat(fd).st_size
        if end > size:
            raise InputError(f"shared memory file {path} holds {size} bytes, {end} needed")
        if end > len(mapping):
            self._close(path)
            return self.buffer(path, identity, end)
        return mapping

    def forget(self, path: str) -> None:
        """Unmap a file no registered region names any more."""
        if path in self._open:
            self._close(path)

    def _close(self, path: str) -> None:
        _, fd, mapping = self._open.pop(path)
        with contextlib.suppress(BufferError):  # a view is still alive; the mapping goes with it
            mapping.close()
        os.close(fd)


class InputError(Exception):
    """A request named shared memory this worker cannot use."""


def _check_identity(path: str, stat: os.stat_result, want: tuple[int, int]) -> None:
    if (stat.st_dev, stat.st_ino) != want:
        raise InputError(f"shared memory file {path} was replaced since its region was registered")


class Worker:
    """Sessions by model path (least recently used closed first) and the run loop's state."""

    def __init__(self, *, in_file: str, out_file: str, threads: int, device: str, max_sessions: int) -> None:
        self.inputs = SharedFile(in_file)
        self.outputs = SharedFile(out_file)
        self.client_files = ClientFiles()
        self.threads = threads
        self.providers = choose_providers(device, ort.get_available_providers())
        self.max_sessions = max_sessions
        self.sessions: OrderedDict[str, ort.InferenceSession] = OrderedDict()
        self._lock = threading.Lock()
        self._running_id: int | None = None
        self._run_options: ort.RunOptions | None = None

    def session(self, path: str) -> ort.InferenceSession:
        """The open session for a model file, opening it on first use."""
        found = self.sessions.get(path)
        if found is not None:
            self.sessions.move_to_end(path)
            return found
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Workers share the host's cores with each other and the server: threads that spin while idle (onnxruntime's
        # default) would take cores from the next shard's worker (measured in bench/bench_inference.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(path, sess_options=options, providers=self.providers)
        self.sessions[path] = session
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)
        return session

    def cancel(self, run_id: int) -> None:
        """Stop the run with this id if it is the one in progress (called from the cancel thread)."""
        with self._lock:
            if self._running_id == run_id and self._run_options is not None:
                self._run_options.terminate = True

    def handle(self, message: dict[str, Any]) -> dict[str, Any]:
        """Answer one request."""
        run_id = int(message["id"])
        if "forget" in message:
            for path in message["forget"]:
                self.client_files.forget(path)
            return {"id": run_id, "ok": True}
        path = message.get("load") or message["model"]
        try:
            session = self.session(path)
        except Exception as exc:  # onnxruntime raises several classes for unreadable or unsupported models
            return {"id": run_id, "ok": False, "kind": "load", "error": str(exc)}
        if "load" in message:
            return {"id": run_id, "ok": True, "providers": session.get_providers()}
        return self.run(run_id, session, message)

    def run(self, run_id: int, session: ort.InferenceSession, message: dict[str, Any]) -> dict[str, Any]:
        """Read the inputs in place, run, write the outputs into the output file."""
        try:
            feeds = self.feeds(message)
        except (InputError, OSError) as exc:
            return {"id": run_id, "ok": False, "kind": "input", "error": str(exc)}
        options = ort.RunOptions()
        with self._lock:
            self._running_id, self._run_options = run_id, options
        try:
            results = session.run(None, feeds, options)
        except Exception as exc:
            kind = "cancelled" if options.terminate else "input"
            return {"id": run_id, "ok": False, "kind": kind, "error": str(exc)}
        finally:
            with self._lock:
                self._running_id, self._run_options = None, None
            del feeds
        names = [o.name for o in session.get_outputs()]
        places = {entry[0]: entry[1:] for entry in message.get("outputs_to", [])}
        layout = []
        offset = 0
        for name, value in zip(names, results, strict=True):
            if not isinstance(value, np.ndarray) or value.dtype.hasobject:
                return {"id": run_id, "ok": False, "kind": "error", "error": f"output {name!r} is not a numeric tensor"}
            if name in places and value.nbytes > int(places[name][3]):
                error = f"output {name!r} needs {value.nbytes} bytes, its shared memory gives {places[name][3]}"
                return {"id": run_id, "ok": False, "kind": "input", "error": error}
            if name not in places:
                layout.append((name, value, offset))
                offset = aligned(offset + value.nbytes)
        try:
            out = self.outputs.grow(offset)
        except OSError as exc:
            error = f"no room for {offset} bytes of outputs in {self.outputs.path}: {exc.strerror}"
            return {"id": run_id, "ok": False, "kind": "resources", "error": error}
        described = []
        for name, value, start in layout:
            np.ndarray(value.shape, dtype=value.dtype, buffer=out, offset=start)[...] = value
            described.append([name, value.dtype.str, list(value.shape), start])
        for name, value in zip(names, results, strict=True):
            if name in places:
                path, identity, start, _ = places[name]
                try:
                    target = self.client_files.buffer(path, identity, int(start) + value.nbytes)
                except (InputError, OSError) as exc:
                    return {"id": run_id, "ok": False, "kind": "input", "error": str(exc)}
                np.ndarray(value.shape, dtype=value.dtype, buffer=target, offset=int(start))[...] = value
                described.append([name, value.dtype.str, list(value.shape), int(start), 1])
        return {"id": run_id, "ok": True, "out_size": self.outputs.size, "outputs": described}

    def feeds(self, message: dict[str, Any]) -> dict[str, np.ndarray]:
        """The request's inputs as arrays over the shared input file or a client's shared-memory file."""
        feeds = {}
        for name, dtype, shape, offset, *place in message["inputs"]:
            dims = tuple(shape)
            kind = np.dtype(dtype)
            if place:
                end = int(offset) + int(np.prod(dims, dtype=np.int64)) * kind.itemsize
                buffer = self.client_files.buffer(place[0], place[1], end)
            else:
                buffer = self.inputs.ensure(int(message["in_size"]))
            feeds[name] = np.ndarray(dims, dtype=kind, buffer=buffer, offset=int(offset))
        return feeds


def _cancel_loop(worker: Worker, fd: int) -> None:
    with os.fdopen(fd, "rb", buffering=0) as stream:
        for line in stream:
            if line.strip():
                worker.cancel(int(line))


def _write(stream: IO[bytes], reply: dict[str, Any]) -> None:
    stream.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    """Serve requests until stdin closes."""
    parser = argparse.ArgumentParser(prog="python -m provider_runtime.infer_worker", description=__doc__)
    parser.add_argument("--in-file", required=True, help="shared file the caller writes inputs into")
    parser.add_argument("--out-file", required=True, help="shared file this worker writes outputs into")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--max-sessions", type=int, default=8, help="model sessions kept open")
    parser.add_argument("--cancel-fd", type=int, default=-1, help="read ids of runs to stop from this descriptor")
    args = parser.parse_args(argv)
    die_with_parent(signal.SIGTERM)

    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    worker = Worker(
        in_file=args.in_file,
        out_file=args.out_file,
        threads=args.threads,
        device=args.device,
        max_sessions=args.max_sessions,
    )
    if args.cancel_fd >= 0:
        threading.Thread(target=_cancel_loop, args=(worker, args.cancel_fd), daemon=True).start()
    _write(replies, {"ready": True, "pid": os.getpid(), "providers": worker.providers})
    requests = sys.stdin.buffer
    while line := requests.readline():
        try:
            message = json.loads(line)
        except ValueError:
            print(f"infer_worker: ignoring a malformed request: {line[:200]!r}", file=sys.stderr)
            continue
        try:
            reply = worker.handle(message)
        except Exception as exc:  # keep serving; the caller decides what an error means
            reply = {"id": message.get("id", -1), "ok": False, "kind": "error", "error": f"{type(exc).__name__}: {exc}"}
        _write(replies, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
