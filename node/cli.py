"""``ainode``: run the node, check its configuration, echo a destination, test routes against files,
analyse files offline."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node import logs
from node.config import ConfigError, Route, Settings, load_settings
from node.runtime.package import ModelRefused

if TYPE_CHECKING:
    from node.route import Subject  # imported where used: routing loads the handlers

log = logging.getLogger("ainode")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from node.dicom import tls
    from node.service import Node
    from node.web.app import create_app

    settings = _settings(args)
    tls.check(settings)  # before anything starts: no plain HTTP off the machine, every TLS file usable
    https = tls.server_context(settings.tls, client_certificates=False) if settings.tls.cert_file else None
    node = Node(settings)
    node.start()
    # uvicorn stops on SIGTERM, then raises it again: without a handler that would end the process
    # before the node stops (its jobs, its sends, its node.stopped audit event).
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        app = create_app(
            node.db,
            node.spool,
            settings,
            dicom_listening=lambda: node.running,
            dicom_load=node.receiver.load,
            complete_study=node.indexer.complete_study,
            ingest=node.ingest,
            job_ended=node.job_ended,
        )
        uvicorn.run(
            app,
            host=settings.node.http_host,
            port=settings.node.http_port,
            log_level="warning",
            ssl_context_factory=(lambda config, default: https) if https else None,
        )
    finally:
        node.stop()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """A distributed worker: runs the node's jobs for the model packages in its models_dir."""
    from node.jobs import worker

    settings = _settings(args)
    if not settings.jobs.distributed.resolved_secret():
        raise ConfigError("jobs.distributed: set secret or secret_file (the node's) to reach the node")
    settings.node.data_dir.mkdir(parents=True, exist_ok=True)
    return worker.serve(settings, args.name or "")


def cmd_check_config(args: argparse.Namespace) -> int:
    from node.dicom import tls
    from node.route import validate
    from node.runtime.package import select, verify_weights

    settings = _settings(args)
    tls.check(settings)  # what `serve` would refuse, check-config refuses too
    validate(settings.routes)
    for route in settings.routes:
        wanted = [(route.model, route.model_version), *((name, None) for name in route.models.values())]
        packages = [select(settings.node.models_dir, name, version) for name, version in wanted]
        for package in packages:
            verify_weights(package.path, package.manifest)
        models = " + ".join(f"{p.manifest.name} {p.manifest.version}" for p in packages)
        outputs = ", ".join(spec.writer for spec in route.outputs) or "no outputs"
        print(
            f"route {route.name}: {route.handler} with {models} ({outputs}) "
            f"→ {', '.join(route.destinations) or '-'}"
        )
    print(
        f"configuration OK: AE {settings.node.ae_title} on port {settings.node.dicom_port}, "
        f"{len(settings.routes)} route(s), {len(settings.destinations)} destination(s)"
    )
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from node.send import echo

    settings = _settings(args)
    destination = settings.destination(args.destination)
    status = echo(settings, destination)
    where = f"{destination.ae_title}@{destination.host}:{destination.port}"
    if status == 0:
        print(f"C-ECHO {where}: success")
        return 0
    print(f"C-ECHO {where}: " + ("no association" if status < 0 else f"status 0x{status:04X}"))
    return 1


def _files(paths: Sequence[str]) -> list[Path]:
    """The files named, and every file under the folders named."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        found += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return found


@dataclass
class _Series:
    header: Dataset  # its first file's: what routing looks at
    files: list[str] = field(default_factory=list)


def _series(paths: Sequence[str]) -> dict[str, _Series]:
    """The DICOM files among ``paths``, by series; other files are skipped."""
    by_uid: dict[str, _Series] = {}
    for file in _files(paths):
        try:
            header = dcmread(file, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        by_uid.setdefault(str(header.get("SeriesInstanceUID", "")), _Series(header)).files.append(str(file))
    return by_uid


def _subject(header: Dataset, settings: Settings, args: argparse.Namespace) -> Subject:
    """The header as routing sees it, arrived from ``--calling-ae`` at ``--called-ae`` (default: this
    node's AE title)."""
    from node.route import Subject

    return Subject(header, args.called_ae or settings.node.ae_title, args.calling_ae)


def _print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)


def _why_not(routes: Sequence[Route], subject: Subject, skip: Sequence[Route] = ()) -> list[str]:
    """For each route but ``skip``: its name and the conditions that ``subject`` fails."""
    from node.route import mismatches

    return [
        f"  {route.name}: " + "; ".join(str(m) for m in mismatches(route, subject))
        for route in routes
        if route not in skip
    ]


def _fixed_route(settings: Settings, args: argparse.Namespace) -> Route | None:
    """The route ``--route`` names, or one made of ``--handler``/``--model``; None: match the routes."""
    if args.model and not args.handler:
        raise ConfigError("--model goes with --handler; a route names its own model")
    if args.handler:
        model = args.model or args.handler.replace("_", "-")
        return Route(name=args.handler, handler=args.handler, model=model)
    if args.route:
        for route in settings.routes:
            if route.name == args.route:
                return route
        raise ConfigError(f"no route named {args.route!r}; known: {[r.name for r in settings.routes]}")
    return None


def cmd_infer(args: argparse.Namespace) -> int:
    """Each series goes where the service would send it: every route it matches (one job per series,
    or per study for a route with group = "study"), unless --route or --handler says where."""
    from node.jobs.run import JobSpec, Task, run_job
    from node.route import choose, validate

    settings = _settings(args)
    fixed = _fixed_route(settings, args)
    validate([*settings.routes, *([fixed] if fixed else [])])
    found = _series(args.paths)
    if not found:
        print(f"no DICOM files in {' '.join(args.paths)}", file=sys.stderr)
        return 1
    runs: dict[tuple[str, str], tuple[Route, list[str]]] = {}  # (route, study or series UID) → files
    unrouted = 0
    for series_uid, series in sorted(found.items()):
        subject = _subject(series.header, settings, args)
        routes = [fixed] if fixed else choose(settings.routes, subject)
        if not routes:
            unrouted += 1
            print(f"series {series_uid}: no route matched" + ("" if settings.routes else " (no routes)"))
            _print_lines(_why_not(settings.routes, subject))
            continue
        for route in routes:
            scope = str(series.header.get("StudyInstanceUID", "")) if route.group == "study" else series_uid
            runs.setdefault((route.name, scope), (route, []))[1].extend(series.files)
    for n, ((name, scope), (route, files)) in enumerate(runs.items()):
        spec = JobSpec(
            0, route.handler, route.model, route.model_version, route.models, route.options, route.outputs
        )
        output = run_job(
            Task(spec, files, str(Path(args.out) / f"{n:02d}-{name}"), str(settings.node.models_dir))
        )
        reason = output.outcome.get("not_analysed_reason")
        print(
            f"route {name}, {route.group} {scope} ({len(files)} file{'s' * (len(files) != 1)}), "
            f"{output.model.name} {output.model.version}: "
            + (f"not analysed: {reason}" if reason else output.summary)
        )
        for result in output.results:
            print(f"  {result.kind} {result.path}")
    return 1 if unrouted else 0


def cmd_routes_test(args: argparse.Namespace) -> int:
    """Which routes each file takes, and for every other route the conditions it fails."""
    from node.route import choose, validate

    settings = _settings(args)
    validate(settings.routes)
    unrouted = 0
    for path in _files(args.paths):
        try:
            header = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            print(f"{path}: not a DICOM file ({exc})")
            unrouted += 1
            continue
        subject = _subject(header, settings, args)
        taken = choose(settings.routes, subject)
        print(f"{path}: " + (f"takes {', '.join(r.name for r in taken)}" if taken else "no route"))
        _print_lines(_why_not(settings.routes, subject, skip=taken))
        unrouted += not taken
    return 1 if unrouted else 0


def cmd_demo_study(args: argparse.Namespace) -> int:
    from training.ct_phantom import write_head_ct_series

    paths = write_head_ct_series(
        Path(args.out), n_slices=args.slices, hemorrhage=not args.normal, seed=args.seed
    )
    print(
        f"wrote {len(paths)} synthetic head-CT slices ({'normal' if args.normal else 'with a bleed'}) "
        f"to {args.out}"
    )
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from node.runtime.package import discover

    settings = _settings(args)
    packages = discover(settings.node.models_dir)
    for package in packages:
        m = package.manifest
        print(
            f"{m.name:24s} {m.version:10s} {m.framework:6s} {m.handler:20s} {m.sha256[:12]}  {package.path}"
        )
    if not packages:
        print(f"no model packages in {settings.node.models_dir}")
    return 0


def cmd_models_validate(args: argparse.Namespace) -> int:
    from node.runtime.validate import ValidationFailed, validate_package

    try:
        for check in validate_package(args.path):
            print(f"ok   {check.name}: {check.detail}")
    except ValidationFailed as exc:
        print(f"FAIL {exc}")
        return 1
    print(f"{args.path}: ready to deploy")
    return 0


def cmd_models_export(args: argparse.Namespace) -> int:
    from node.runtime.export import export_package

    package = export_package(args.path, args.to, args.out)
    manifest = package.manifest
    print(f"wrote {package.path}: {manifest.framework} {manifest.weights} {manifest.sha256[:12]}")
    return 0


def cmd_models_train_demo(args: argparse.Namespace) -> int:
    from training import train_demo  # the training code is imported only by this command

    out = ["--out", str(args.out or Path("models") / args.name)]
    train_demo(args.name, [*out, "--measure-only"] if args.measure_only else out)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from node.audit import check, key_path, read_key
    from node.db import open_database

    settings = _settings(args)
    path = key_path(settings)
    key = read_key(path) if path.exists() else None
    db = open_database(settings.node.resolved_database_url)
    try:
        state = check(db, key)
    finally:
        db.dispose()
    if state.broken is not None:
        print(f"audit chain broken at event {state.broken.event_id}: {state.broken.problem}")
        if state.intact_to is not None:
            print(f"intact from the start up to event {state.intact_to} ({state.events} events)")
        return 1
    if state.keyed_from is not None:
        print(f"audit chain intact: {state.events} events, keyed (HMAC-SHA256) from event {state.keyed_from}")
    else:
        print(
            f"audit chain intact: {state.events} events, none keyed (no key at {path}): whoever can "
            "write the database could have rewritten it"
        )
    return 0


def _cli_actor() -> str:
    """Who ran an account command, as the audit log records it: the operating-system user."""
    try:
        return f"cli:{getpass.getuser()}"
    except OSError:  # no user name in the environment or the password database
        return f"cli:uid {os.getuid()}"


def _new_password(args: argparse.Namespace) -> str:
    """From standard input's first line (scripts), or asked twice without echo."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("password: ")
    if getpass.getpass("again: ") != password:
        raise ValueError("the two passwords differ")
    return password


def cmd_accounts(args: argparse.Namespace) -> int:
    """``users`` and ``tokens``: the change is made and audited in node.accounts."""
    from node import accounts, audit
    from node.db import open_database

    settings = _settings(args)
    db = open_database(settings.node.resolved_database_url)
    audit.configure(db, settings)  # the changes' events join the node's keyed chain
    actor = _cli_actor()
    try:
        match args.command, args.account_command:
            case "users", "add":
                accounts.add_user(db, args.name, args.role, _new_password(args), actor=actor)
                print(f"user {args.name} added as {args.role}")
            case "users", "passwd":
                accounts.set_password(db, args.name, _new_password(args), actor=actor)
                print(f"password of {args.name} set; their sessions are closed")
            case "users", "disable" | "enable":
                accounts.set_disabled(db, args.name, args.account_command == "disable", actor=actor)
                print(f"user {args.name} {args.account_command}d")
            case "users", "list":
                for user in accounts.users(db):
                    failed = f"{user.failed_logins} failed logins" if user.failed_logins else "active"
                    state = "disabled" if user.disabled else failed
                    last = f"{user.last_login_at:%Y-%m-%d %H:%M}" if user.last_login_at else "never"
                    print(f"{user.name:24s} {user.role:9s} {state:18s} last login {last}")
            case "tokens", "create":
                token = accounts.create_token(db, args.name, args.role, actor=actor)
                print(token)
                print(
                    f"token {args.name} ({args.role}): shown this once; the node keeps only its hash",
                    file=sys.stderr,
                )
            case "tokens", "revoke":
                accounts.revoke_token(db, args.name, actor=actor)
                print(f"token {args.name} revoked")
            case "tokens", "list":
                for listed in accounts.tokens(db):
                    state = f"revoked {listed.revoked_at:%Y-%m-%d %H:%M}" if listed.revoked_at else "active"
                    print(f"{listed.name:24s} {listed.role:9s} {state:24s} by {listed.created_by}")
    finally:
        audit.close(db)
        db.dispose()
    return 0


def _account_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from node.accounts import ROLES

    for group, help_text, commands in (
        (
            "users",
            "dashboard accounts",
            (
                ("add", "add a user (asks for the password)", ("name", "role", "password")),
                ("list", "the users, their roles and states", ()),
                ("disable", "stop a user logging in; ends their sessions", ("name",)),
                ("enable", "let a disabled user log in again", ("name",)),
                ("passwd", "set a user's password (asks for it); lifts a lockout", ("name", "password")),
            ),
        ),
        (
            "tokens",
            "API tokens",
            (
                ("create", "create an API token scoped to a role; prints it once", ("name", "role")),
                ("list", "the tokens and whether they are revoked", ()),
                ("revoke", "revoke a token", ("name",)),
            ),
        ),
    ):
        actions = sub.add_parser(group, help=help_text).add_subparsers(dest="account_command", required=True)
        for name, action_help, arguments in commands:
            p = actions.add_parser(name, help=action_help, description=action_help)
            p.add_argument(
                "--config", type=Path, default=None, help="TOML settings (default: built-in defaults)"
            )
            p.set_defaults(func=cmd_accounts)
            if "name" in arguments:
                p.add_argument("name")
            if "role" in arguments:
                p.add_argument("--role", required=True, choices=ROLES)
            if "password" in arguments:
                p.add_argument(
                    "--password-stdin", action="store_true", help="read the password from standard input"
                )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ainode", description=__doc__)
    top.add_argument("--log-level", default="INFO")
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", type=Path, default=None, help="TOML settings (default: built-in defaults)")
        p.set_defaults(func=func)
        return p

    command("serve", cmd_serve, "run the DICOM listener, the jobs, the sender and the HTTP API")
    run_jobs = command(
        "worker",
        cmd_worker,
        "run a node's jobs on this host (executor celery): its models_dir's models, node.workers at once",
    )
    run_jobs.add_argument(
        "--name", help="the worker's name (default: jobs.distributed.worker_name or ainode@host)"
    )
    command("check-config", cmd_check_config, "validate the settings, routes and model packages")
    command("echo", cmd_echo, "C-ECHO a configured destination").add_argument("destination")
    infer = command(
        "infer", cmd_infer, "analyse DICOM files offline as the routes say, and write the results to a folder"
    )
    infer.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders of them")
    infer.add_argument("--out", required=True)
    chosen = infer.add_mutually_exclusive_group()
    chosen.add_argument("--route", help="use this configured route, whatever the files' tags")
    chosen.add_argument("--handler", help="use this handler instead of the configured routes")
    infer.add_argument(
        "--model", help="with --handler: model package name (default: the handler's, with dashes)"
    )
    routes = sub.add_parser("routes", help="the configured routes").add_subparsers(
        dest="routes_command", required=True
    )
    tester = routes.add_parser(
        "test", help="which routes each file takes, and why each other route does not take it"
    )
    tester.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders of them")
    tester.add_argument(
        "--config", type=Path, default=None, help="TOML settings (default: built-in defaults)"
    )
    tester.set_defaults(func=cmd_routes_test)
    for p in (infer, tester):
        p.add_argument("--called-ae", help="the AE title the files are sent to (default: the node's)")
        p.add_argument("--calling-ae", default="", help="the AE title they come from (default: none)")
    demo = command("demo-study", cmd_demo_study, "write a synthetic head-CT study to send to the node")
    demo.add_argument("--out", required=True)
    demo.add_argument("--slices", type=int, default=30)
    demo.add_argument("--normal", action="store_true", help="no bleed")
    demo.add_argument("--seed", type=int, default=7)
    _account_commands(sub)
    audit = sub.add_parser("audit", help="the audit log").add_subparsers(dest="audit_command", required=True)
    audit_verify = audit.add_parser(
        "verify", help="check the audit log's keyed hash chain; name the first broken link"
    )
    audit_verify.add_argument(
        "--config", type=Path, default=None, help="TOML settings (default: built-in defaults)"
    )
    audit_verify.set_defaults(func=cmd_audit_verify)
    command("audit-verify", cmd_audit_verify, "the old name of `audit verify`")
    models = sub.add_parser("models", help="model packages").add_subparsers(
        dest="models_command", required=True
    )
    listing = models.add_parser("list", help="installed model packages")
    listing.add_argument("--config", type=Path, default=None)
    listing.set_defaults(func=cmd_models_list)
    check = models.add_parser("validate", help="load a package, run a smoke inference and Grad-CAM")
    check.add_argument("path", help="a model package folder")
    check.set_defaults(func=cmd_models_validate)
    export = models.add_parser(
        "export", help="write a torch package as TorchScript or ONNX, with Grad-CAM's features as an output"
    )
    export.add_argument("path", help="a torch state_dict package folder")
    export.add_argument("--to", choices=["onnx", "torchscript"], required=True)
    export.add_argument("--out", type=Path, required=True, help="the new package folder")
    export.set_defaults(func=cmd_models_export)
    train = models.add_parser(
        "train-demo", help="train a demonstration model on synthetic phantoms (reproducible, ≤ 10 min)"
    )
    train.add_argument("name", help="a demo model: the package name of a bundled model, e.g. ct-hemorrhage")
    train.add_argument("--out", type=Path, help="package folder to write (default: models/NAME)")
    train.add_argument(
        "--measure-only", action="store_true", help="re-measure the saved weights, no training"
    )
    train.set_defaults(func=cmd_models_train_demo)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_level.upper())
    try:
        return int(args.func(args))
    except (ConfigError, ModelRefused, ValueError, LookupError) as exc:
        print(f"ainode {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
