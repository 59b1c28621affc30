"""`python -m provider_runtime <init|train|evaluate|export|infer> --input DIR --output DIR [--resident DIR --key K]`.

Or `serve` (a warm local worker) or `resident` (the worker `--resident` starts on a provider's VM).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    """Run one action on a task bundle, or serve requests; 0 means result.json was written."""
    parser = argparse.ArgumentParser(prog="python -m provider_runtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for action, text in (
        ("init", "write the initial weights of model()"),
        ("train", "train the global weights on this worker's partition"),
        ("evaluate", "evaluate the weights on the test split"),
        ("export", "export the weights to ONNX and verify with onnxruntime"),
        ("infer", "run model.onnx on data/inputs.npz (an inference shard)"),
    ):
        sub = commands.add_parser(action, help=text)
        sub.add_argument("--input", required=True, type=Path, help="task bundle directory")
        sub.add_argument("--output", required=True, type=Path, help="result bundle directory")
        sub.add_argument("--resident", type=Path, help="hand the task to the resident worker in this directory")
        sub.add_argument("--key", default="job", help="the job's key: a resident worker serves one job")
    commands.add_parser("serve", help="warm worker: JSON requests on stdin, replies on stdout")
    resident = commands.add_parser("resident", help="the worker --resident starts (not run by hand)")
    resident.add_argument("--home", required=True, type=Path)
    resident.add_argument("--key", required=True)
    resident.add_argument("--idle", type=float, default=None, help="seconds idle before it ends")
    args = parser.parse_args(argv)

    # Imported after parsing so that --help answers without loading torch.
    if args.command == "serve":
        from provider_runtime.serve import serve

        return serve()
    if args.command == "resident":
        from provider_runtime import resident as worker

        return worker.resident(args.home, args.key, worker.IDLE_SECONDS if args.idle is None else args.idle)
    if args.resident is not None:
        from provider_runtime.resident import call

        return call(args.command, args.input, args.output, args.resident, args.key)

    from provider_runtime.runtime import BundleError, configure_threads, run_bundle

    configure_threads(default=None)
    try:
        result = run_bundle(args.input, args.output, args.command)
    except BundleError as exc:
        print(f"provider_runtime: bad task bundle: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"provider_runtime: cannot write the result bundle: {exc}", file=sys.stderr)
        return 1
    print(f"provider_runtime: {args.command} {result['status']} in {result['seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
