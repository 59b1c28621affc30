"""deml-client: train, watch and manage jobs and models on a DeML server."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from tqdm import tqdm

from deml.v1 import models_pb2, training_pb2
from deml_client.baseline import BaselineComparison
from deml_client.channel import open_channel
from deml_client.cli_security import add_security_flags, security_of
from deml_client.client import DEFAULT_SERVER, DemlClient, DemlClientError, parse_model_ref, read_spec_file

_TERMINAL = {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}


def state_name(state: int) -> str:
    """JOB_STATE_SUCCEEDED -> SUCCEEDED."""
    return training_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def job_to_dict(job: training_pb2.Job, comparison: BaselineComparison | None = None) -> dict[str, Any]:
    """The JSON shape every command prints for a job (with the baseline comparison when given one)."""
    rounds: list[dict[str, Any]] = [
        {
            "round": r.round,
            "metrics": dict(r.metrics),
            "wall_seconds": r.wall_seconds,
            "workers_ok": r.workers_ok,
            "sampled": list(r.sampled_partitions),
            "late": list(r.late_partitions),
        }
        for r in job.rounds
    ]
    final = dict(job.latest_round.metrics) if job.HasField("latest_round") else {}
    return {
        "job_id": job.id,
        "name": job.spec.name,
        "state": state_name(job.state),
        "rounds": job.spec.rounds,
        "rounds_committed": job.rounds_committed,
        "per_round": rounds,
        "final_accuracy": final.get("accuracy"),
        "baseline_accuracy": job.baseline_accuracy if job.HasField("baseline_accuracy") else None,
        "baseline_curve": [
            {"round": p.round, "epochs": p.epochs, "steps": p.steps, "metrics": dict(p.metrics)}
            for p in job.baseline_curve
        ],
        "rounds_to_accuracy": job.rounds_to_accuracy if job.HasField("rounds_to_accuracy") else None,
        **({"baseline_comparison": comparison.to_dict()} if comparison is not None else {}),
        "model_name": job.model_name or None,
        "model_version": job.model_version or None,
        "error": job.error,
        "failure_cause": _cause_name(job.failure_cause),
        "spec": MessageToDict(job.spec, preserving_proto_field_name=True),
    }


def _cause_name(cause: int) -> str | None:
    """USER_CODE, DISK, ... for a failed job's cause; None when unset."""
    if cause == training_pb2.FAILURE_CAUSE_UNSPECIFIED:
        return None
    return training_pb2.FailureCause.Name(cause).removeprefix("FAILURE_CAUSE_")  # type: ignore[arg-type]


def model_to_dict(model: models_pb2.Model) -> dict[str, Any]:
    """The JSON shape for a model version."""
    return MessageToDict(model, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def follow(client: DemlClient, job: training_pb2.Job, *, quiet: bool) -> training_pb2.Job:
    """Watch a job to its end, one progress bar per round (its worker tasks); return the final job."""
    bars: dict[int, tqdm[Any]] = {}

    def bar_for(server_round: int, total: int) -> tqdm[Any]:
        if server_round not in bars:
            bars[server_round] = tqdm(
                total=total, desc=f"round {server_round}/{job.spec.rounds}", unit="task", disable=quiet, file=sys.stderr
            )
        return bars[server_round]

    try:
        for event in client.watch_job(job.id):
            job = event.job
            if event.kind == training_pb2.EVENT_KIND_PROGRESS and event.HasField("progress"):
                bar = bar_for(event.progress.round, event.progress.total)
                bar.n = event.progress.done
                bar.refresh()
            elif event.kind == training_pb2.EVENT_KIND_ROUND_COMMITTED:
                bar = bar_for(event.round.round, max(event.round.workers_ok + event.round.workers_failed, 1))
                bar.n = bar.total
                acc = event.round.metrics.get("accuracy")
                bar.set_postfix_str(f"accuracy={acc:.4f}" if acc is not None else "")
                bar.close()
            elif event.kind == training_pb2.EVENT_KIND_PROGRESS and event.message and not quiet:
                tqdm.write(f"  {event.message}", file=sys.stderr)
    finally:
        for bar in bars.values():
            bar.close()
    return client.get_job(job.id)


def _summary(job: training_pb2.Job, comparison: BaselineComparison | None = None) -> str:
    info = job_to_dict(job)
    lines = [f"job {job.id}: {info['state']} after {job.rounds_committed}/{job.spec.rounds} rounds"]
    for r in info["per_round"]:
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(r["metrics"].items()))
        lines.append(f"  round {r['round']}: {metrics} ({r['wall_seconds']:.1f} s)")
    if info["final_accuracy"] is not None:
        lines.append(f"federated test accuracy: {info['final_accuracy']:.4f}")
    if info["baseline_accuracy"] is not None:
        lines.append(f"centralized baseline:    {info['baseline_accuracy']:.4f}")
    if comparison is not None:
        if comparison.rows:
            lines.append("federated against centralized at equal epochs (test accuracy):")
            lines.extend("  " + line for line in comparison.table())
        lines.append(comparison.verdict())
    if info["model_name"]:
        lines.append(f"model: {info['model_name']}:{info['model_version']}")
    if job.error:
        lines.append(f"error: {job.error}")
    if info["failure_cause"] is not None:
        resumable = job.failure_cause != training_pb2.FAILURE_CAUSE_USER_CODE
        hint = f" (resume it: deml-client jobs resume {job.id})" if resumable else " (fix the task and submit again)"
        lines.append(f"failure cause: {info['failure_cause']}{hint}")
    return "\n".join(lines)


def cmd_train(client: DemlClient, args: argparse.Namespace) -> int:
    """Upload a task, follow it, print the outcome."""
    task_dir = Path(args.task_dir)
    settings = read_spec_file(task_dir)
    settings.setdefault("name", task_dir.resolve().name)
    overrides = {
        "rounds": args.rounds,
        "workers": args.workers,
        "local_epochs": args.local_epochs,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "strategy": args.strategy,
        "partitioning": args.partitioning,
        "dirichlet_alpha": args.alpha,
        "seed": args.seed,
        "name": args.name,
        "task_timeout_seconds": args.task_timeout,
        "compression": args.compression,
        "broadcast_dtype": args.broadcast_dtype,
        "fraction_fit": args.fraction_fit,
        "min_fit": args.min_fit,
        "min_fit_workers": args.min_fit_workers,
        "round_deadline_seconds": args.round_deadline,
        "lr_schedule": args.lr_schedule,
        "lr_warmup_rounds": args.lr_warmup_rounds,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if args.baseline:
        settings["baseline"] = True
    job = client.submit_job(
        task_dir,
        settings,
        data=Path(args.data) if args.data else None,
        test_data=Path(args.test_data) if args.test_data else None,
    )
    if not args.json:
        print(f"submitted job {job.id}", file=sys.stderr)
    job = client.get_job(job.id) if args.detach else follow(client, job, quiet=args.json)
    comparison = _comparison(client, job)
    if args.json:
        _print_json(job_to_dict(job, comparison))
    else:
        print(_summary(job, comparison))
    return 0 if job.state in (training_pb2.JOB_STATE_SUCCEEDED,) or args.detach else 1


def cmd_jobs(client: DemlClient, args: argparse.Namespace) -> int:
    """Jobs list|show|watch|cancel|resume."""
    if args.jobs_cmd == "list":
        jobs = client.list_jobs(limit=args.limit)
        if args.json:
            _print_json([job_to_dict(j) for j in jobs])
        else:
            for j in jobs:
                acc = job_to_dict(j)["final_accuracy"]
                acc_text = f"{acc:.4f}" if acc is not None else "-"
                print(
                    f"{j.id}  {state_name(j.state):<10} {j.rounds_committed}/{j.spec.rounds}  {acc_text}  {j.spec.name}"
                )
        return 0
    if args.jobs_cmd == "show":
        job, more = _show(client, args)
        comparison = _comparison(client, job)
        if args.json:
            _print_json(job_to_dict(job, comparison))
        else:
            print(_summary(job, comparison))
            if more:
                print(f"(more rounds: --from-round {more})")
        return 0
    elif args.jobs_cmd == "watch":
        job = follow(client, client.get_job(args.job_id), quiet=args.json)
    elif args.jobs_cmd == "resume":
        job = client.resume_job(args.job_id)
        if args.watch:
            job = follow(client, job, quiet=args.json)
    else:
        job = client.cancel_job(args.job_id)
    if args.json:
        _print_json(job_to_dict(job))
    else:
        print(_summary(job))
    return 0


def _comparison(client: DemlClient, job: training_pb2.Job) -> BaselineComparison | None:
    """The baseline comparison of a job that has a baseline (its rounds are read whole for it)."""
    return client.baseline_comparison(job.id) if job.HasField("baseline_accuracy") else None


def _show(client: DemlClient, args: argparse.Namespace) -> tuple[training_pb2.Job, int]:
    """The job with the rounds asked for: the latest --rounds, or --rounds from --from-round on (paging)."""
    if args.from_round is None:
        return client.get_job(args.job_id, rounds=args.rounds), 0
    job = client.get_job(args.job_id, rounds=0)
    rounds, more = client.list_rounds(args.job_id, start=args.from_round, limit=max(args.rounds, 0))
    job.rounds.extend(rounds)
    return job, more


def cmd_models(client: DemlClient, args: argparse.Namespace) -> int:
    """Models list|show|download|upload|delete."""
    if args.models_cmd == "list":
        models = client.list_models(args.name or "")
        if args.json:
            _print_json([model_to_dict(m) for m in models])
        else:
            for m in models:
                sig = ", ".join(f"{t.name}:{t.datatype}{list(t.shape)}" for t in m.inputs)
                print(f"{m.name}:{m.version}  {m.size_bytes} B  job={m.job_id or '-'}  inputs {sig}")
        return 0
    if args.models_cmd == "show":
        name, version = parse_model_ref(args.model)
        model = client.get_model(name, version)
    elif args.models_cmd == "download":
        name, version = parse_model_ref(args.model)
        model = client.download_model(name, version, Path(args.output))
        if not args.json:
            print(f"wrote {model.name}:{model.version} ({model.size_bytes} bytes) to {args.output}")
            return 0
    elif args.models_cmd == "upload":
        model = client.upload_model(Path(args.file), args.name)
    else:
        name, version = parse_model_ref(args.model)
        model = client.delete_model(name, version)
    if args.json:
        _print_json(model_to_dict(model))
    else:
        print(f"{model.name}:{model.version}")
        for label, tensors in (("input", model.inputs), ("output", model.outputs)):
            for t in tensors:
                print(f"  {label} {t.name}: {t.datatype} {list(t.shape)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    parser = argparse.ArgumentParser(prog="deml-client", description=__doc__)
    parser.add_argument(
        "--server", default=os.environ.get("DEML_SERVER", DEFAULT_SERVER), help="HOST:PORT (default %(default)s)"
    )
    add_security_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a task directory in federated rounds")
    train.add_argument("task_dir")
    train.add_argument("--rounds", type=int)
    train.add_argument("--workers", type=int)
    train.add_argument("--local-epochs", type=int)
    train.add_argument("--local-steps", type=int, help="minibatch steps a partition trains per round instead of epochs")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--learning-rate", "--lr", type=float)
    train.add_argument(
        "--lr-schedule", choices=["constant", "step", "cosine"], help="the rate across rounds (deml.toml: lr_*)"
    )
    train.add_argument("--lr-warmup-rounds", type=int, help="rounds of linear learning-rate warmup")
    train.add_argument("--strategy")
    train.add_argument("--partitioning", choices=["iid", "dirichlet"])
    train.add_argument("--alpha", type=float, help="Dirichlet concentration")
    train.add_argument("--seed", type=int)
    train.add_argument("--name", help="model name (default: the task directory's name)")
    train.add_argument("--task-timeout", type=float, help="seconds one worker task may take")
    train.add_argument(
        "--compression", choices=["none", "fp16", "bf16", "int8"], help="how workers send updates (default none)"
    )
    train.add_argument(
        "--broadcast-dtype",
        choices=["fp32", "fp16", "int8"],
        help="what the round's global weights are sent to workers as (default fp32; fp16 halves the bytes; int8 "
        "sends each round's change from the weights workers hold)",
    )
    train.add_argument("--fraction-fit", type=float, help="share of the partitions trained each round (Flower's)")
    train.add_argument("--min-fit", type=int, help="fewest partitions trained each round")
    train.add_argument("--min-fit-workers", type=int, help="quorum: fewest usable results a round needs")
    train.add_argument("--round-deadline", type=float, help="seconds a round waits; late tasks are then dropped")
    train.add_argument("--data", help=".npz with x, y: sharded across workers by the server")
    train.add_argument("--test-data", help=".npz with x, y used as the test split")
    train.add_argument("--baseline", action="store_true", help="also train centrally on one worker and compare")
    train.add_argument("--detach", action="store_true", help="submit and return without waiting")
    train.add_argument("--json", action="store_true", help="print one JSON object at the end")
    train.set_defaults(handler=cmd_train)

    jobs = sub.add_parser("jobs", help="list, show, watch, cancel or resume jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_cmd", required=True)
    jobs_list = jobs_sub.add_parser("list")
    jobs_list.add_argument("--limit", type=int, default=0)
    jobs_list.add_argument("--json", action="store_true")
    for name in ("show", "watch", "cancel", "resume"):
        p = jobs_sub.add_parser(name)
        p.add_argument("job_id")
        p.add_argument("--json", action="store_true")
        if name == "resume":
            p.add_argument("--watch", action="store_true", help="follow the resumed job until it ends")
        if name == "show":
            p.add_argument("--rounds", type=int, default=20, help="how many rounds to show (-1: all; default 20)")
            p.add_argument("--from-round", type=int, help="show --rounds rounds from this one on (to page)")
    jobs.set_defaults(handler=cmd_jobs)

    models = sub.add_parser("models", help="list, show, download, upload or delete models")
    models_sub = models.add_subparsers(dest="models_cmd", required=True)
    models_list = models_sub.add_parser("list")
    models_list.add_argument("--name")
    models_list.add_argument("--json", action="store_true")
    show = models_sub.add_parser("show")
    show.add_argument("model", help="NAME[:VERSION]")
    show.add_argument("--json", action="store_true")
    download = models_sub.add_parser("download")
    download.add_argument("model", help="NAME[:VERSION]")
    download.add_argument("-o", "--output", required=True)
    download.add_argument("--json", action="store_true")
    upload = models_sub.add_parser("upload")
    upload.add_argument("file", help="an .onnx file")
    upload.add_argument("--name", required=True)
    upload.add_argument("--json", action="store_true")
    delete = models_sub.add_parser("delete")
    delete.add_argument("model", help="NAME:VERSION")
    delete.add_argument("--json", action="store_true")
    models.set_defaults(handler=cmd_models)

    for extension in _extensions():
        extension(sub)
    return parser


def _extensions() -> list[Callable[[Any], None]]:
    try:
        from deml_client.cli_predict import add_predict_command  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return []
    return [add_predict_command]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `deml-client`."""
    args = build_parser().parse_args(argv)
    try:
        with DemlClient(args.server, channel=open_channel(args.server, security_of(args))) as client:
            code: int = args.handler(client, args) if args.command != "predict" else args.handler(args)
            return code
    except DemlClientError as exc:
        print(f"deml-client: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"deml-client: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
