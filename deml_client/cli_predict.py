"""`deml-client predict MODEL[:VERSION] --input X.npy --output Y.npy [--batch-size B]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deml_client.channel import open_channel
from deml_client.cli_security import security_of
from deml_client.inference import InferenceClient
from deml_client.shm import is_local_target


def add_predict_command(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the predict command; its handler takes the parsed arguments (with args.server = HOST:PORT)."""
    predict = subparsers.add_parser(
        "predict",
        help="run a .npy file through a registered model",
        description="Run the rows of a .npy file (or the named arrays of an .npz file) through a model and save the"
        " outputs: a .npy file for a single output, an .npz file for several.",
    )
    predict.add_argument("model", help="NAME[:VERSION] (default: the latest version)")
    predict.add_argument("--input", required=True, help=".npy array for the model's only input, or .npz by name")
    predict.add_argument("--output", required=True, help=".npy (single output) or .npz (outputs by name)")
    predict.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="rows per message (default: about 1 MiB of input per message, 32 MiB per request through shared memory)",
    )
    predict.add_argument(
        "--shared-memory",
        choices=["auto", "on", "off"],
        default="auto",
        help="send tensors through system shared memory instead of gRPC messages (the server must run on this"
        " host); auto: for large inputs when the server address is a loopback one (default)",
    )
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(handler=cmd_predict)


def _load_inputs(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    array: np.ndarray = np.load(path, allow_pickle=False)
    return array


def _save_outputs(path: Path, outputs: np.ndarray | dict[str, np.ndarray]) -> None:
    if isinstance(outputs, np.ndarray) and path.suffix != ".npz":
        np.save(path, outputs)
        return
    named = outputs if isinstance(outputs, dict) else {"output": outputs}
    if path.suffix != ".npz":
        raise ValueError(f"the model has {len(named)} outputs ({', '.join(named)}); write them to an .npz file")
    np.savez(path, allow_pickle=False, **named)


def cmd_predict(args: argparse.Namespace) -> int:
    """Load, predict with a progress bar, save."""
    if args.batch_size < 0:
        raise ValueError("--batch-size must be positive")
    inputs = _load_inputs(Path(args.input))
    first = inputs if isinstance(inputs, np.ndarray) else next(iter(inputs.values()), np.empty(0))
    rows = int(first.shape[0]) if first.ndim else 0
    with (
        open_channel(args.server, security_of(args)) as channel,
        tqdm(
            total=rows,
            unit="row",
            unit_scale=True,
            desc=args.model,
            disable=args.quiet or rows < 10_000 or None,
            file=sys.stderr,
        ) as bar,
    ):
        client = InferenceClient(channel, same_host=is_local_target(args.server))
        try:
            outputs = client.predict(
                args.model,
                inputs,
                batch_size=args.batch_size,
                progress=bar.update,
                shared_memory={"auto": None, "on": True, "off": False}[args.shared_memory],
            )
        finally:
            client.close()
    _save_outputs(Path(args.output), outputs)
    shapes = outputs.shape if isinstance(outputs, np.ndarray) else {k: v.shape for k, v in outputs.items()}
    print(f"wrote {args.output}: {shapes}", file=sys.stderr)
    return 0
