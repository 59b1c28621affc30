"""Inference worker: keeps onnxruntime sessions open and runs the shards a gateway hands it.

Started as `python -m provider_runtime.infer_worker --in-file A --out-file B`. Control messages are JSON lines:
requests on stdin, replies on the stdout the process was started with (fd 1 itself is pointed at stderr, so a stray
print cannot corrupt the protocol). Tensors never travel through the pipes: the caller writes inputs into the
shared input file (on /dev/shm) and names their offsets; the worker reads them in place, runs the session and
writes the outputs into the shared output file, growing it when they do not fit, and replies with their offsets.

The messages are provider_runtime.contract's LoadRequest, ForgetRequest and RunRequest, answered by a
WorkerReply with the same id (its `kind` says why a request was refused: "load" when the model cannot be opened,
"input" when onnxruntime rejected the inputs, "resources" when there is no room for the outputs in shared
memory, "cancelled" or "error"). An input may instead live in a client's shared-memory file (InputTensor.file)
and be read in place there; an OutputTarget asks for an output to be written into such a file. A file whose
(dev, inode) differs from the request's was replaced since its region was registered: refused.
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
from pathlib import Path
from typing import IO

import numpy as np
import onnxruntime as ort

from provider_runtime.contract import (
    ClientFile,
    ForgetRequest,
    LoadRequest,
    OutputTensor,
    RunRequest,
    SharedFile,
    WorkerHello,
    WorkerReply,
    WorkerRequest,
    aligned,
    claim_stdout,
    parse_worker_request,
)
from provider_runtime.lifeline import die_with_parent

MIN_OUT_BYTES = 1 << 20
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def choose_providers(device: str, available: list[str]) -> list[str]:
    """CUDA first when asked for or offered ('auto'), CPU always as the fallback."""
    if device == "cpu":
        return [CPU]
    if device == "cuda" and CUDA not in available:
        raise SystemExit("infer_worker: --device cuda, but onnxruntime offers no CUDAExecutionProvider")
    if CUDA in available:
        return [CUDA, CPU]
    return [CPU]


class ClientFiles:
    """Clients' shared-memory files, mapped on first use and kept open (the most recently used few)."""

    def __init__(self, limit: int = 16) -> None:
        self._limit = limit
        self._open: OrderedDict[str, tuple[tuple[int, int], int, mmap.mmap]] = OrderedDict()

    def buffer(self, place: ClientFile, end: int) -> mmap.mmap:
        """The mapping of the client's file, which must still be the one registered and hold at least `end` bytes."""
        path, want = place.path, place.identity
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
            return self.buffer(place, end)
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
        self.inputs = SharedFile.open(Path(in_file))
        self.outputs = SharedFile.open(Path(out_file))
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

    def handle(self, message: WorkerRequest) -> WorkerReply:
        """Answer one request."""
        if isinstance(message, ForgetRequest):
            for path in message.paths:
                self.client_files.forget(path)
            return WorkerReply(id=message.id, ok=True)
        try:
            session = self.session(message.model)
        except Exception as exc:  # onnxruntime raises several classes for unreadable or unsupported models
            return WorkerReply.failed(message.id, "load", str(exc))
        if isinstance(message, LoadRequest):
            return WorkerReply(id=message.id, ok=True, providers=tuple(session.get_providers()))
        return self.run(session, message)

    def run(self, session: ort.InferenceSession, message: RunRequest) -> WorkerReply:
        """Read the inputs in place, run, write the outputs into the output file."""
        run_id = message.id
        try:
            feeds = self.feeds(message)
        except (InputError, OSError) as exc:
            return WorkerReply.failed(run_id, "input", str(exc))
        options = ort.RunOptions()
        with self._lock:
            self._running_id, self._run_options = run_id, options
        try:
            results = session.run(None, feeds, options)
        except Exception as exc:
            return WorkerReply.failed(run_id, "cancelled" if options.terminate else "input", str(exc))
        finally:
            with self._lock:
                self._running_id, self._run_options = None, None
            del feeds
        names = [o.name for o in session.get_outputs()]
        places = {target.name: target for target in message.outputs_to}
        layout = []
        offset = 0
        for name, value in zip(names, results, strict=True):
            if not isinstance(value, np.ndarray) or value.dtype.hasobject:
                return WorkerReply.failed(run_id, "error", f"output {name!r} is not a numeric tensor")
            target = places.get(name)
            if target is not None and value.nbytes > target.capacity:
                error = f"output {name!r} needs {value.nbytes} bytes, its shared memory gives {target.capacity}"
                return WorkerReply.failed(run_id, "input", error)
            if target is None:
                layout.append((name, value, offset))
                offset = aligned(offset + value.nbytes)
        try:
            out = self.outputs.grow(offset, floor=MIN_OUT_BYTES) if offset else self.outputs.map
        except OSError as exc:
            error = f"no room for {offset} bytes of outputs in {self.outputs.path}: {exc.strerror or exc}"
            return WorkerReply.failed(run_id, "resources", error)
        described = []
        for name, value, start in layout:
            np.ndarray(value.shape, dtype=value.dtype, buffer=out, offset=start)[...] = value
            described.append(OutputTensor(name, value.dtype.str, tuple(value.shape), start))
        for name, value in zip(names, results, strict=True):
            target = places.get(name)
            if target is not None:
                try:
                    buffer = self.client_files.buffer(target.file, target.offset + value.nbytes)
                except (InputError, OSError) as exc:
                    return WorkerReply.failed(run_id, "input", str(exc))
                np.ndarray(value.shape, dtype=value.dtype, buffer=buffer, offset=target.offset)[...] = value
                described.append(OutputTensor(name, value.dtype.str, tuple(value.shape), target.offset, True))
        return WorkerReply(id=run_id, ok=True, out_size=self.outputs.size, outputs=tuple(described))

    def feeds(self, message: RunRequest) -> dict[str, np.ndarray]:
        """The request's inputs as arrays over the shared input file or a client's shared-memory file."""
        feeds = {}
        for tensor in message.inputs:
            kind = np.dtype(tensor.dtype)
            if tensor.file is not None:
                end = tensor.offset + int(np.prod(tensor.shape, dtype=np.int64)) * kind.itemsize
                buffer = self.client_files.buffer(tensor.file, end)
            else:
                buffer = self.inputs.ensure(message.in_size)
            feeds[tensor.name] = np.ndarray(tensor.shape, dtype=kind, buffer=buffer, offset=tensor.offset)
        return feeds


def _cancel_loop(worker: Worker, fd: int) -> None:
    with os.fdopen(fd, "rb", buffering=0) as stream:
        for line in stream:
            if line.strip():
                worker.cancel(int(line))


def _write(stream: IO[bytes], reply: WorkerReply | WorkerHello) -> None:
    stream.write(json.dumps(reply.to_dict(), separators=(",", ":")).encode() + b"\n")


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

    replies = claim_stdout()
    worker = Worker(
        in_file=args.in_file,
        out_file=args.out_file,
        threads=args.threads,
        device=args.device,
        max_sessions=args.max_sessions,
    )
    if args.cancel_fd >= 0:
        threading.Thread(target=_cancel_loop, args=(worker, args.cancel_fd), daemon=True).start()
    _write(replies, WorkerHello(pid=os.getpid(), providers=tuple(worker.providers)))
    requests = sys.stdin.buffer
    while line := requests.readline():
        try:
            message = parse_worker_request(json.loads(line))
        except ValueError as exc:  # not JSON, or not a request (ContractError)
            print(f"infer_worker: ignoring a malformed request ({exc}): {line[:200]!r}", file=sys.stderr)
            continue
        try:
            reply = worker.handle(message)
        except Exception as exc:  # keep serving; the caller decides what an error means
            reply = WorkerReply.failed(message.id, "error", f"{type(exc).__name__}: {exc}")
        _write(replies, reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
