"""`vpt`: the command line of vpt-client.

Exit status: 0 on success, 1 on an error (printed as `error: <code>: <message>`, then one indented
line per entry the error's details name, e.g. a dataset's offending files; a training job that
failed or was cancelled counts as one), 2 on a usage error, 130 when interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vpt_client import _cli_format as fmt
from vpt_client._client import Client, JobHandle
from vpt_client._constants import DEFAULT_BASE_URL, ENV_API_KEY, ENV_BASE_URL, __version__
from vpt_client._train_options import FIELDS
from vpt_client.errors import APIConnectionError, JobFailedError, VPTError
from vpt_client.models import Job

Handler = Callable[[Client, argparse.Namespace], int]


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _emit(args: argparse.Namespace, value: Any, text: Callable[[], str]) -> None:
    _out(fmt.to_json(value) if args.json else text())


def cmd_train(client: Client, args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in FIELDS}
    upload = fmt.UploadProgress(sys.stderr, Path(args.dataset).name, enabled=not args.json)
    handle = client.train(args.task, args.dataset, on_upload=upload, **options)
    upload.finish()
    if args.no_wait:
        _emit(args, handle.job, lambda: f"job {handle.job_id} {handle.state} (task {args.task})")
        return 0
    if not args.json:
        sys.stderr.write(f"job {handle.job_id} {handle.state}\n")
    try:
        job = _follow(handle, fmt.TrainingBar(sys.stderr, enabled=not args.json))
    except KeyboardInterrupt:
        sys.stderr.write(f"\nstopped following; job {handle.job_id} goes on "
                         f"(see `vpt job {handle.job_id}`, stop it with `vpt cancel {handle.job_id}`)\n")
        return 130
    _emit(args, job, lambda: _job_summary(job))
    if not job.succeeded:
        raise JobFailedError(job)
    return 0


def _follow(handle: JobHandle, bar: fmt.TrainingBar) -> Job:
    """Follow the job's event stream; fall back to polling if the stream is unavailable."""
    bar.update(handle.job)
    try:
        for job in handle.events():
            bar.update(job)
    except APIConnectionError:
        pass
    job = handle.job if handle.job.done else handle.wait(on_progress=bar.update, check=False)
    bar.finish()
    return job


def _job_summary(job: Job) -> str:
    if job.succeeded:
        metrics = f"  {fmt.short_metrics(job.metrics)}" if job.metrics else ""
        return f"task {job.task_id}: version {job.version} trained{metrics}"
    return f"task {job.task_id}: job {job.job_id} {job.state}"


def cmd_predict(client: Client, args: argparse.Namespace) -> int:
    pred = client.predict(args.task, list(args.images), top_k=args.top_k)
    names = {i: str(p) for i, p in enumerate(args.images)}
    rows = []
    for r in pred.results:
        for rank, top in enumerate(r.top_k, start=1):
            name = names.get(r.image, r.filename) if rank == 1 else ""
            rows.append((name, rank, top.label, f"{top.score:.4f}"))
    _emit(args, pred, lambda: fmt.table(("IMAGE", "RANK", "LABEL", "SCORE"), rows))
    return 0


def cmd_tasks(client: Client, args: argparse.Namespace) -> int:
    if args.task:
        t = client.tasks.get(args.task)
        pairs = [("task", t.task_id), ("version", t.current_version), ("versions", t.num_versions),
                 ("method", t.method), ("prompts", t.num_prompts), ("classes", t.classes),
                 ("backbone", t.backbone), ("fingerprint", t.backbone_fingerprint),
                 ("size", fmt.human_bytes(t.size_bytes)), ("created", t.created_at),
                 ("updated", t.updated_at), ("metrics", fmt.short_metrics(t.metrics))]
        _emit(args, t, lambda: fmt.details(pairs))
        return 0
    tasks = client.tasks.list()
    if not tasks and not args.json:
        _out("no tasks yet: train one with `vpt train TASK DATASET` or import a file with `vpt import TASK FILE`")
        return 0
    rows = [(t.task_id, t.current_version, t.num_versions, t.method, t.num_prompts, t.class_count,
             fmt.human_bytes(t.size_bytes), t.updated_at) for t in tasks]
    _emit(args, tasks, lambda: fmt.table(
        ("TASK", "VERSION", "VERSIONS", "METHOD", "PROMPTS", "CLASSES", "SIZE", "UPDATED"), rows))
    return 0


def cmd_versions(client: Client, args: argparse.Namespace) -> int:
    versions = client.tasks.versions(args.task)
    rows = [(v.version, "*" if v.current else "", v.method, v.num_prompts, len(v.classes),
             fmt.human_bytes(v.size_bytes), v.created_at, fmt.short_metrics(v.metrics, 2)) for v in versions]
    _emit(args, versions, lambda: fmt.table(
        ("VERSION", "CURRENT", "METHOD", "PROMPTS", "CLASSES", "SIZE", "CREATED", "METRICS"), rows))
    return 0


def cmd_activate(client: Client, args: argparse.Namespace) -> int:
    task = client.tasks.activate(args.task, args.version)
    _emit(args, task, lambda: f"task {task.task_id}: version {task.current_version} is current")
    return 0


def cmd_delete(client: Client, args: argparse.Namespace) -> int:
    client.tasks.delete(args.task)
    _emit(args, {"deleted": args.task}, lambda: f"deleted task {args.task}")
    return 0


def cmd_jobs(client: Client, args: argparse.Namespace) -> int:
    jobs = client.jobs.list(task=args.task, state=args.state)
    rows = [(j.job_id, j.task_id, j.state, f"{fmt.job_fraction(j) * 100:.0f}%", j.version, j.created_at)
            for j in jobs]
    _emit(args, jobs, lambda: fmt.table(("JOB", "TASK", "STATE", "PROGRESS", "VERSION", "CREATED"), rows))
    return 0


def cmd_job(client: Client, args: argparse.Namespace) -> int:
    j = client.jobs.get(args.job_id)
    err = f"{j.error.code}: {j.error.message}" if j.error else None
    pairs = [("job", j.job_id), ("task", j.task_id), ("state", j.state), ("progress", fmt.job_line(j)),
             ("options", j.options), ("version", j.version), ("metrics", fmt.short_metrics(j.metrics)),
             ("error", err),
             ("created", j.created_at), ("started", j.started_at), ("finished", j.finished_at)]
    _emit(args, j, lambda: fmt.details(pairs))
    return 0


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.jobs.cancel(args.job_id)
    _emit(args, job, lambda: f"job {job.job_id} {job.state}" if job.done
          else f"job {job.job_id}: cancel requested (it stops at its next training step)")
    return 0


def cmd_export(client: Client, args: argparse.Namespace) -> int:
    path = client.tasks.export(args.task, args.output, version=args.version)
    size = Path(path).stat().st_size
    _emit(args, {"task": args.task, "path": str(path), "size_bytes": size},
          lambda: f"wrote {path} ({fmt.human_bytes(size)})")
    return 0


def cmd_import(client: Client, args: argparse.Namespace) -> int:
    task = client.tasks.import_(args.task, args.file)
    _emit(args, task, lambda: f"task {task.task_id}: imported as version {task.current_version}")
    return 0


def cmd_backbone(client: Client, args: argparse.Namespace) -> int:
    b = client.backbone()
    pairs = [(k, getattr(b, k)) for k in ("name", "fingerprint", "embed_dim", "depth", "num_heads", "patch_size",
                                           "input_size", "mean", "std", "interpolation", "crop_pct",
                                           "device", "dtype")]
    _emit(args, b, lambda: fmt.details(pairs))
    return 0


def cmd_health(client: Client, args: argparse.Namespace) -> int:
    health, ready = client.health(), client.ready()
    _emit(args, {"health": health.model_dump(mode="json"), "ready": ready.model_dump(mode="json")},
          lambda: fmt.details([("health", health.status), ("ready", ready.status), ("checks", ready.checks)]))
    return 0 if ready.ready else 1


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the command (`vpt --json tasks` and `vpt tasks --json`)."""
    default = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--base-url", default=default,
                   help=f"server URL (default ${ENV_BASE_URL} or {DEFAULT_BASE_URL})")
    p.add_argument("--api-key", default=default, help=f"API key (default ${ENV_API_KEY})")
    p.add_argument("--timeout", type=float, default=default, help="seconds per request (default 60)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="print machine-readable JSON")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="log requests and retries")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vpt", parents=[_common_options(False)],
                                     description="Train and query a vpt-serve server.")
    parser.add_argument("--version", action="version", version=f"vpt-client {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options(True)

    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    _train_arguments(add("train", cmd_train, "upload a dataset (directory or .zip/.tar/.tar.gz) and train a task"))
    p = add("predict", cmd_predict, "classify images with a task")
    p.add_argument("task")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=5)

    p = add("tasks", cmd_tasks, "list tasks, or show one")
    p.add_argument("task", nargs="?")
    add("versions", cmd_versions, "list a task's versions").add_argument("task")
    p = add("activate", cmd_activate, "make version N the current one")
    p.add_argument("task")
    p.add_argument("version", type=int, metavar="N")
    add("delete", cmd_delete, "delete a task and all its versions").add_argument("task")
    p = add("jobs", cmd_jobs, "list training jobs")
    p.add_argument("--task")
    p.add_argument("--state", choices=("queued", "running", "succeeded", "failed", "cancelled"))
    add("job", cmd_job, "show a job").add_argument("job_id", metavar="JOB_ID")
    add("cancel", cmd_cancel, "cancel a job").add_argument("job_id", metavar="JOB_ID")
    p = add("export", cmd_export, "download a task file")
    p.add_argument("task")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.add_argument("--version", type=int, metavar="N", help="default: the current version")
    p = add("import", cmd_import, "upload a task file as a new version")
    p.add_argument("task")
    p.add_argument("file", metavar="FILE")
    add("backbone", cmd_backbone, "show the server's backbone")
    add("health", cmd_health, "show liveness and readiness (exit 1 when not ready)")
    return parser


_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "integer": int, "number": float, "string": str,
    "array": lambda v: [s.strip() for s in v.split(",") if s.strip()],   # comma-separated
}


def _train_arguments(p: argparse.ArgumentParser) -> None:
    """The dataset, then one flag per training option of the server's schema (`_train_options.FIELDS`)."""
    p.add_argument("task")
    p.add_argument("dataset", metavar="DIR_OR_ARCHIVE")
    g = p.add_argument_group("training options (left out: the server's defaults, shown)")
    for name, prop in FIELDS.items():
        default = f" (default {prop['default']})" if "default" in prop else ""
        kind = prop.get("type", "string")
        g.add_argument(f"--{prop['x-flag'].replace('_', '-')}", dest=name, choices=prop.get("enum"),
                       type=_FLAG_TYPES.get(kind, str), metavar=None if "enum" in prop else kind.upper(),
                       help=f"{prop.get('description', name)}{default}".replace("%", "%%"))
    p.add_argument("--no-wait", action="store_true", help="print the job and return at once")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        kwargs: dict[str, Any] = {} if args.timeout is None else {"timeout": args.timeout}
        with Client(args.base_url, args.api_key, **kwargs) as client:
            return args.handler(client, args)
    except VPTError as exc:
        sys.stdout.flush()
        sys.stderr.write(f"error: {exc.code}: {exc.message}\n")
        sys.stderr.writelines(f"  {line}\n" for line in fmt.error_details(exc))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
