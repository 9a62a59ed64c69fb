"""`coevo` command line: launch sessions, build the zoo, run the sandbox, query, review, prompts,
serve the review web app, write reports."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

DEFAULT_WORKDIR = Path("coevo_work")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by bad input: reported in one line, never with a stack trace."""
    from agents.backends import BackendError
    from agents.loop import SessionStopped
    from agents.population import PopulationError
    from agents.prompts import PromptError
    from agents.tasks import TaskFileError
    from archive_store import ArchiveError
    from coevo.config import ConfigError
    from coevo.workdir import SessionError
    from merging.check import IncompatibleModels
    from merging.io import ModelDirError
    from sandbox.jobs import SandboxUnavailable

    return (ArchiveError, BackendError, ConfigError, IncompatibleModels, ModelDirError,
            PopulationError, PromptError, SandboxUnavailable, SessionError, SessionStopped, TaskFileError)


# ----------------------------------------------------------------------------- commands


def cmd_launch(args: argparse.Namespace) -> int:
    from agents.config import switch_mode
    from coevo.config import load_config, parse_config
    from coevo.session import run_session

    if args.resume and args.config:
        raise SystemExit("error: --resume continues a session with its own config; drop CONFIG")
    notes: list[str] = []
    config = load_config(args.config, notes=notes)
    overrides = config.model_dump()
    if args.mode is not None and args.mode != config.mode:
        overrides = switch_mode(overrides, args.mode)
    if args.generations is not None:
        overrides["population"]["generations"] = args.generations
    if args.iterations is not None:
        overrides["session"]["iterations"] = args.iterations
    if args.programs is not None:
        overrides["generator"]["programs_per_iteration"] = args.programs
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.runner is not None:
        overrides["sandbox"]["runner"] = args.runner
    config = parse_config(overrides, str(args.config or "command line"))
    if args.print_config:
        import json

        for note in notes:
            print(f"[config] {note}", file=sys.stderr)
        print(json.dumps(config.model_dump(), indent=2))
        return 0
    run_session(None if args.resume else config, args.workdir, resume=args.resume, config_notes=notes)
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from coevo.zoo.build import build_zoo, format_zoo_info

    manifest = build_zoo(args.out, seed=args.seed, runner_kind=args.runner)
    print(format_zoo_info(args.out, manifest))
    return 0


def cmd_zoo_info(args: argparse.Namespace) -> int:
    from coevo.zoo.build import format_zoo_info, zoo_manifest

    manifest = zoo_manifest(args.dir)
    if manifest is None:
        from coevo.config import ConfigError

        raise ConfigError(f"{args.dir} is not a coevo zoo of this version (build one: coevo zoo build --out {args.dir})")
    print(format_zoo_info(args.dir, manifest))
    return 0


def cmd_tasks_show(args: argparse.Namespace) -> int:
    from collections import Counter

    from agents.tasks import load_tasks

    tasks = load_tasks(args.dir)
    counts = Counter((t.skill, t.split) for t in tasks)
    for (skill, split), n in sorted(counts.items()):
        print(f"{skill} {split}: {n} tasks")
    fmt = tasks[0].fmt
    print(f"format: {fmt.shots}-shot, chat {'on' if fmt.chat else 'off'}, stop {list(fmt.stop)}, "
          f"max {fmt.max_new_tokens} new tokens, extract {fmt.extract}, numeric {'yes' if fmt.numeric else 'no'}")
    for task in [t for t in tasks if t.split == args.split][: args.n]:
        print(f"\n--- {task.task_id} (reference answer: {task.answer!r})\n{task.prompt}")
    return 0


def _archive_path(args: argparse.Namespace) -> Path:
    from archive_store import ArchiveError

    path = Path(args.archive) if args.archive else Path(args.workdir) / "archive.duckdb"
    if not path.is_file():
        raise ArchiveError(f"no archive at {path} (run `coevo launch` first, or pass --workdir / --archive)")
    return path


def cmd_sql(args: argparse.Namespace) -> int:
    from archive_store import run_sql
    from archive_store.shell import repl

    path = _archive_path(args)
    out = Path(args.out) if args.out else None
    if args.command is not None or args.file is not None:
        sql = args.command if args.command is not None else _read_sql_file(args.file)
        print(run_sql(path, sql, fmt=args.format, write=args.write, out=out))
        return 0
    return repl(path, fmt=args.format, write=args.write, out=out)


def _read_sql_file(name: str) -> str:
    from archive_store import ArchiveError

    try:
        return Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ArchiveError(f"cannot read SQL file {name}: {err}") from None


def cmd_archive(args: argparse.Namespace) -> int:
    from archive_store import Archive, ArchiveError

    path = Path(args.archive) if args.archive else Path(args.workdir) / "archive.duckdb"
    if args.archive_command == "export":
        if not path.is_file():
            raise ArchiveError(f"no archive at {path} (pass --workdir / --archive)")
        with Archive.open(path, read_only=True) as archive:
            counts = archive.export_parquet(Path(args.dir))
        print(f"exported {sum(counts.values())} rows of {len(counts)} tables to {args.dir}")
        return 0
    with Archive.open(path) as archive:
        if args.archive_command == "import":
            added = archive.import_parquet(Path(args.dir))
            source = args.dir
        else:
            added = {}
            for other in args.others:
                for table, n in archive.merge_from(Path(other)).items():
                    added[table] = added.get(table, 0) + n
            source = ", ".join(args.others)
    detail = ", ".join(f"{table} {n}" for table, n in added.items() if n) or "nothing new"
    print(f"added from {source} into {path}: {detail}")
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    from agents.console import percent
    from archive_store import Archive, ArchiveError, pages, queries

    if args.action in VERDICT_ACTIONS:
        return _give_verdict(args)
    with Archive.open(_archive_path(args), read_only=True) as archive:
        session = args.session or (archive.latest_session() or {}).get("session_id")
        if args.action == "show":
            if not args.id:
                raise ArchiveError("coevo review show needs an algorithm id (see `coevo review`)")
            row = queries.review_algorithm(archive, args.id)
            print(f"algorithm  {row['algorithm_id']}")
            print(f"iteration  {row['iteration']}  generator v{row['generator_version']}  T={row['temperature']:.2f}")
            print(f"outcome    {row['outcome']}")
            reason = row["policy_reason"] if not row["policy_ok"] else row["reason"]
            if reason and row["outcome"] != "ok":
                print(f"reason     {reason}")
            if row["duplicate_of"]:
                print(f"duplicate  of {row['duplicate_of']}")
            if row["duration_s"] is not None:
                print(f"sandbox    {row['duration_s']:.2f}s, peak {row['peak_memory_mb'] or 0:.0f} MB")
            print(f"scores     dev {percent(row['dev_score'])}  test {percent(row['test_score'])}")
            for review in queries.review_history(archive, row["algorithm_id"]):
                note = f": {review['note']}" if review["note"] else ""
                print(f"verdict    {review['verdict']} by {review['reviewer']} at {review['created_at']:%Y-%m-%d %H:%M}{note}")
            print("\n" + row["code"])
            if row["stderr"]:
                print("stderr (tail):\n" + row["stderr"][-2000:])
            return 0
        if session is None:
            raise ArchiveError("the archive holds no session yet")
        listing = pages.algorithms_page(archive, session, outcome=args.outcome, limit=args.limit)
        print(f"session {session}: {len(listing)} algorithms (best first; `coevo review show ID` for one)")
        print(f"  {'algorithm':38} {'iter':>4} {'gen':>3} {'outcome':20} {'dev':>6} {'test':>6}  verdict")
        for a in listing:
            print(f"  {a['algorithm_id']:38} {a['iteration']:>4} {a['generator_version']:>3} {a['outcome'] or '-':20} "
                  f"{percent(a['dev_score']):>6} {percent(a['test_score']):>6}  {a['review'] or ''}".rstrip())
    return 0


VERDICT_ACTIONS = ("approve", "reject", "quarantine")  # archive_store.reviews.VERDICTS, without importing DuckDB


def _give_verdict(args: argparse.Namespace) -> int:
    """`coevo review approve|reject|quarantine ID [--note]`: into the workdir's inbox, and into
    the archive at once unless a session is running (it records the inbox before its next
    DPO update)."""
    from archive_store import ArchiveError
    from coevo.verdicts import give_verdict

    if not args.id:
        raise ArchiveError(f"coevo review {args.action} needs an algorithm id (see `coevo review`)")
    row, recorded = give_verdict(_archive_path(args), args.id, args.action, args.note or "")
    if not recorded:
        print(f"{row['verdict']} {row['algorithm_id']}: queued; the running session records it before its next DPO update")
        return 0
    print(f"{row['verdict']} {row['algorithm_id']}: recorded (by {row['reviewer']})")
    return 0


def cmd_prompts(args: argparse.Namespace) -> int:
    from agents.prompts import DEFAULT_PROMPTS_DIR, WORKDIR_PROMPTS, list_prompts, load_prompt

    directory = Path(args.dir) if args.dir else DEFAULT_PROMPTS_DIR
    edits = Path(args.workdir) / WORKDIR_PROMPTS  # what `coevo serve` saved: a session there reads these first
    dirs = [edits, directory]
    if args.action == "path":
        print(directory)
    elif args.action == "show":
        if not args.name:
            raise SystemExit("error: coevo prompts show needs a NAME (see `coevo prompts list`)")
        print(load_prompt(args.name, dirs).text)
    else:
        for prompt in list_prompts(dirs):
            placeholders = ", ".join(f"${p}" for p in sorted(prompt.placeholders))
            edited = "  (edited in the workdir)" if prompt.path.parent == edits else ""
            print(f"{prompt.name:16} {prompt.hash}  {prompt.path}  [{placeholders}]{edited}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import socket

    from archive_store import ArchiveError
    from coevo.web.auth import new_token

    workdir = Path(args.workdir)
    if not workdir.is_dir():
        raise ArchiveError(f"no workdir {workdir} (run `coevo launch --workdir {workdir}` first, or pass --workdir)")
    token = os.environ.get("COEVO_SERVE_TOKEN") or new_token()
    try:  # a clear line instead of uvicorn's traceback-ish exit when the port is taken
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as err:
        raise ArchiveError(f"cannot listen on {args.host}:{args.port}: {err.strerror} (pick another --port)") from None
    import uvicorn

    from coevo.web.app import ReviewApp

    app = ReviewApp(workdir, token, poll_s=args.poll).build()
    shown = f"[{args.host}]" if ":" in args.host else args.host
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}, reachable from other machines; every request still needs the token",
              file=sys.stderr)
    print(f"coevo serve: {workdir.resolve()}", flush=True)
    print(f"  open http://{shown}:{args.port}/?token={token}", flush=True)
    print("  (Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from archive_store import Archive, ArchiveError, queries
    from coevo.report import format_report

    path = _archive_path(args)
    if args.html:
        from coevo.web.report import write_html_report

        session_id = write_html_report(path, Path(args.html), args.session)
        print(f"wrote the report of session {session_id} to {args.html}")
        return 0
    with Archive.open(path, read_only=True) as archive:
        row = queries.session(archive, args.session) if args.session else archive.latest_session()
        if row is None:
            raise ArchiveError(f"no session {args.session!r} in {path}" if args.session else f"{path} holds no session yet")
        print(format_report(archive, row["session_id"], row["mode"]))
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from sandbox.cli import add_sandbox_parser

    parser = argparse.ArgumentParser(prog="coevo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)

    def workdir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                       help="holds archive.duckdb, models, checkpoints (default ./coevo_work)")

    p = sub.add_parser("launch", help="run a discovery session (no CONFIG = embedded quickstart)")
    p.add_argument("config", nargs="?", type=Path, help="session config (TOML)")
    workdir(p)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="SESSION_ID",
                   help="continue an unfinished session in --workdir: SESSION_ID, or the latest unfinished one")
    p.add_argument("--mode", choices=["selfdev", "acdc", "cycleqd"], help="override mode")
    p.add_argument("--iterations", type=int, help="override session.iterations (selfdev)")
    p.add_argument("--generations", type=int, help="override population.generations (acdc, cycleqd)")
    p.add_argument("--programs", type=int, help="override generator.programs_per_iteration")
    p.add_argument("--seed", type=int, help="override seed")
    p.add_argument("--runner", choices=["auto", "docker", "process"], help="override sandbox.runner")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_launch)

    zoo = sub.add_parser("zoo", help="the embedded tiny zoo").add_subparsers(dest="zoo_cmd", required=True)
    p = zoo.add_parser("build", help="build the zoo (deterministic from --seed)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runner", choices=["auto", "docker", "process"], default="auto")
    p.set_defaults(func=cmd_zoo_build)
    p = zoo.add_parser("info", help="print a zoo's measured numbers")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_zoo_info)

    tasks = sub.add_parser("tasks", help="task sets").add_subparsers(dest="tasks_cmd", required=True)
    p = tasks.add_parser("show", help="load a task set (format.toml included): counts, format, rendered prompts")
    p.add_argument("dir", type=Path)
    p.add_argument("--split", choices=["dev", "test"], default="dev")
    p.add_argument("-n", type=int, default=1, help="how many rendered prompts to print")
    p.set_defaults(func=cmd_tasks_show)

    add_sandbox_parser(sub)

    p = sub.add_parser("sql", help="query the archive with SQL (interactive without -c/-f)")
    workdir(p)
    p.add_argument("--archive", help="an explicit archive.duckdb path")
    p.add_argument("-c", "--command", help="one SQL statement")
    p.add_argument("-f", "--file", help="a .sql file")
    p.add_argument("--format", choices=["table", "csv", "json", "markdown", "parquet"], default="table")
    p.add_argument("--out", help="write the result to this file (needed for parquet)")
    p.add_argument("--write", action="store_true", help="allow writes (no session may be running)")
    p.set_defaults(func=cmd_sql)

    archive = sub.add_parser("archive", help="export, import or merge archives")
    archive_sub = archive.add_subparsers(dest="archive_command", required=True)
    p = archive_sub.add_parser("export", help="write every table as Parquet (plus manifest.json) to DIR")
    p.add_argument("dir")
    p = archive_sub.add_parser("import", help="add the rows of an export DIR to the archive")
    p.add_argument("dir")
    p = archive_sub.add_parser("merge", help="add the rows of other archive files to the archive")
    p.add_argument("others", nargs="+", metavar="OTHER.duckdb")
    for p in archive_sub.choices.values():
        workdir(p)
        p.add_argument("--archive", help="an explicit archive.duckdb path")
        p.set_defaults(func=cmd_archive)

    p = sub.add_parser("review", help="review generated algorithms: list, `show ID`, or `approve|reject|quarantine ID`")
    p.add_argument("action", nargs="?", choices=["list", "show", *VERDICT_ACTIONS], default="list")
    p.add_argument("id", nargs="?")
    p.add_argument("--note", help="approve / reject / quarantine: why (kept with the verdict)")
    workdir(p)
    p.add_argument("--archive", help="an explicit archive.duckdb path")
    p.add_argument("--session", help="session id (default: the latest)")
    p.add_argument("--outcome", help="only this outcome (ok, timeout, rejected_by_policy, duplicate, ...)")
    p.add_argument("--limit", type=int, default=30)
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("serve", help="a local web app to review, judge and steer (sessions, code, prompts, SQL)")
    workdir(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--poll", type=float, default=5.0, help="seconds between refreshes of a running session's page")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("report", help="a session's report: text, or one self-contained HTML file (--html)")
    workdir(p)
    p.add_argument("--archive", help="an explicit archive.duckdb path")
    p.add_argument("--session", help="session id (default: the latest)")
    p.add_argument("--html", metavar="OUT", help="write a self-contained HTML report (plots, leaderboard, best code) to OUT")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("prompts", help="the editable prompt templates")
    p.add_argument("action", nargs="?", choices=["list", "show", "path"], default="list")
    p.add_argument("name", nargs="?")
    p.add_argument("--dir", help="prompts directory (default: the repository's prompts/)")
    workdir(p)
    p.set_defaults(func=cmd_prompts)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Before torch makes its first large tensor: huge pages, as in the sandbox (sandbox.jobs).
    from sandbox.jobs import TORCH_ENV

    for name, value in TORCH_ENV.items():
        os.environ.setdefault(name, value)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted: resume with `coevo launch --resume`", file=sys.stderr)
        return 130
    except _user_errors() as err:
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
