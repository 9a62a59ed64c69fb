"""`coevo serve`: a local web app over a workdir's archive, to read, judge and steer.

Server-rendered (Starlette + Jinja2, htmx for the live parts; everything it loads is served
by itself, so it works offline). Every request opens the archive's published snapshot, so the
app never waits on, or stalls, a running session; a running session's page polls for new
steps. Generated code is only ever shown as escaped text (Pygments' HTML formatter escapes it;
templates autoescape). Pages: sessions, a session (the papers' plots), an algorithm (code, diff
with its closest relative, policy, sandbox, per-task answers, provenance, verdict buttons), a
model's lineage, the prompt templates (edit, history, diff) and a read-only SQL console.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pygments.lexers import PythonLexer
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from agents.prompts import (
    DEFAULT_PROMPTS_DIR,
    REQUIRED,
    WORKDIR_PROMPTS,
    PromptError,
    list_prompts,
    load_prompt,
    save_template,
    template_path,
)
from archive_store import Archive, ArchiveError, pages, queries
from archive_store.reviews import VERDICTS
from archive_store.shell import console_query, csv_text
from coevo.verdicts import give_verdict
from coevo.web.auth import TokenGate, check_csrf, csrf_value
from coevo.web.render import diff_html, environment, highlighted, session_values

STATIC = Path(__file__).parent / "static"
SQL_ROWS = 1000
PAGE = 100
QUERY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")

# The SQL console's examples: what researchers ask first.
EXAMPLE_QUERIES = [
    ("Best algorithms", "SELECT rank, algorithm_id, iteration, dev_score, test_score\nFROM leaderboard\nLIMIT 20"),
    ("Per iteration", "SELECT * FROM iteration_stats"),
    ("Why programs failed", "SELECT iteration, verdict, n FROM verdict_breakdown WHERE verdict <> 'ok'"),
    ("DPO updates", "SELECT iteration, base_version, new_version, num_pairs, final_loss,\n       mean_dev_before, mean_dev_after\nFROM dpo_history"),
    ("Human verdicts", "SELECT r.created_at, r.reviewer, r.verdict, r.note, a.algorithm_id\nFROM reviews r JOIN algorithms a USING (algorithm_id)\nORDER BY r.created_at DESC"),
    ("Hardest tasks", "SELECT task_id, skill, split, n_models, pass_rate\nFROM task_stats ORDER BY pass_rate LIMIT 20"),
    ("Prompt versions", "SELECT name, prompt_hash, first_used, n_artifacts FROM prompt_versions"),
    ("Coverage (population modes)", "SELECT * FROM coverage"),
    ("Lineage (population modes)", "SELECT model_id, depth, ancestor_id, ancestor_kind, mutation\nFROM lineage LIMIT 50"),
]


class ReviewApp:
    """The pages of one workdir; `build()` makes the ASGI app behind the token gate."""

    def __init__(self, workdir: Path, token: str, *, poll_s: float = 5.0) -> None:
        self.workdir = Path(workdir)
        self.archive_path = self.workdir / "archive.duckdb"
        self.token = token
        self.poll_s = poll_s
        self.env = environment()
        self.env.globals["csrf"] = csrf_value(token)

    # ----------------------------------------------------------------- plumbing

    def build(self) -> Any:
        routes = [
            Route("/", self.sessions),
            Route("/session/{session_id}", self.session),
            Route("/session/{session_id}/live", self.session_live),
            Route("/session/{session_id}/algorithms", self.algorithms),
            Route("/algorithm/{algorithm_id:path}", self.algorithm),
            Route("/review", self.review, methods=["POST"]),
            Route("/model/{model_id:path}", self.model),
            Route("/prompts", self.prompts),
            Route("/prompts/{name}", self.prompt, methods=["GET", "POST"]),
            Route("/prompts/{name}/diff", self.prompt_diff),
            Route("/sql", self.sql),
            Route("/sql.csv", self.sql_csv),
            Route("/sql/save", self.sql_save, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        app = Starlette(routes=routes, exception_handlers={ArchiveError: self._archive_error, HTTPException: self._http_error})
        return TokenGate(app, self.token)

    def render(self, template: str, status: int = 200, **values: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(workdir=str(self.workdir), poll_s=self.poll_s, **values)
        return HTMLResponse(html, status_code=status)

    @contextmanager
    def archive(self) -> Iterator[Archive]:
        if not self.archive_path.is_file():
            raise ArchiveError(f"no archive in {self.workdir} yet: start a session with `coevo launch --workdir {self.workdir}`")
        with Archive.open(self.archive_path, read_only=True) as archive:
            yield archive

    async def _archive_error(self, request: Request, exc: Exception) -> Response:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        status = 404 if message.startswith("no ") else 400
        return self.render("error.html", status=status, message=message)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.render("error.html", status=exc.status_code, message=exc.detail)

    def _prompt_dirs(self) -> list[Path]:
        """Where the next iteration reads templates: the workdir's edits, then the latest
        session's prompts_dir (or the shipped templates)."""
        configured = ""
        if self.archive_path.is_file():
            with self.archive() as archive:
                latest = archive.latest_session()
            if latest:
                configured = json.loads(latest["config_json"]).get("prompts_dir", "")
        return [self.workdir / WORKDIR_PROMPTS, Path(configured) if configured else DEFAULT_PROMPTS_DIR]

    # ----------------------------------------------------------------- sessions

    def sessions(self, request: Request) -> Response:
        rows = []
        if self.archive_path.is_file():
            with self.archive() as archive:
                rows = pages.sessions(archive)
        return self.render("sessions.html", sessions=rows)

    def session(self, request: Request) -> Response:
        with self.archive() as archive:
            values = session_values(archive, request.path_params["session_id"])
        return self.render("session.html", **values)

    def session_live(self, request: Request) -> Response:
        with self.archive() as archive:
            values = session_values(archive, request.path_params["session_id"])
        return self.render("_session_body.html", **values)

    def algorithms(self, request: Request) -> Response:
        sid = request.path_params["session_id"]
        outcome = request.query_params.get("outcome") or None
        page = _int(request.query_params.get("page"), 0)
        with self.archive() as archive:
            session = pages.session_detail(archive, sid)
            rows = pages.algorithms_page(archive, sid, outcome=outcome, limit=PAGE + 1, offset=page * PAGE)
            kinds = sorted({kind for row in pages.outcomes_by_iteration(archive, sid).values() for kind in row})
        return self.render("algorithms.html", session=session, rows=rows[:PAGE], more=len(rows) > PAGE,
                           page=page, outcome=outcome or "", outcomes=kinds)

    # ----------------------------------------------------------------- one algorithm

    def algorithm(self, request: Request) -> Response:
        algorithm_id = request.path_params["algorithm_id"]
        with self.archive() as archive:
            algorithm_id = queries.resolve_algorithm_id(archive, algorithm_id)
            row = pages.algorithm(archive, algorithm_id)
            relative = pages.closest_relative(archive, row)
            results = pages.task_results(archive, algorithm_id)
            history = queries.review_history(archive, algorithm_id)
            model_id = archive.scalar("SELECT model_id FROM models WHERE algorithm_id = ? AND kind = 'merged' LIMIT 1", [algorithm_id])
        diff = None
        if relative is not None:
            other, why = relative
            diff = {"id": other["algorithm_id"], "why": why,
                    "html": diff_html(other["code"], row["code"], other["algorithm_id"], algorithm_id)}
        by_split: dict[str, list[dict[str, Any]]] = {}
        for result in results:
            by_split.setdefault(result["split"], []).append(result)
        notice = request.query_params.get("notice", "")
        return self.render(
            "algorithm.html", a=row, code=highlighted(row["code"], PythonLexer()), diff=diff, results=by_split,
            history=history, verdicts=VERDICTS, model_id=model_id, notice=notice[:200],
        )

    async def review(self, request: Request) -> Response:
        refused = await check_csrf(request, self.token)
        if refused:
            return PlainTextResponse(f"403: {refused}", status_code=403)
        form = await request.form()
        algorithm_id, verdict, note = (str(form.get(k, "")) for k in ("algorithm_id", "verdict", "note"))
        if verdict not in VERDICTS:
            raise HTTPException(400, f"unknown verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
        row, recorded = await run_in_threadpool(give_verdict, self.archive_path, algorithm_id, verdict, note)
        said = "recorded" if recorded else "queued: the running session records it before its next DPO update"
        notice = quote(f"{row['verdict']} {said}")
        return RedirectResponse(f"/algorithm/{quote(row['algorithm_id'], safe='/')}?notice={notice}", status_code=303)

    def model(self, request: Request) -> Response:
        with self.archive() as archive:
            row = pages.model(archive, request.path_params["model_id"])
            tree = pages.lineage_tree(archive, row["model_id"])
        return self.render("model.html", m=row, tree=tree)

    # ----------------------------------------------------------------- prompts

    def prompts(self, request: Request) -> Response:
        dirs = self._prompt_dirs()
        templates = list_prompts(dirs)
        versions: dict[str, int] = {}
        if self.archive_path.is_file():
            with self.archive() as archive:
                for v in pages.prompt_versions(archive):
                    versions[v["name"]] = versions.get(v["name"], 0) + 1
        rows = [{"name": p.name, "hash": p.hash, "path": str(p.path), "edited": p.path.parent == dirs[0],
                 "placeholders": sorted(REQUIRED.get(p.name, p.placeholders)), "versions": versions.get(p.name, 0)}
                for p in templates]
        return self.render("prompts.html", prompts=rows, edit_dir=str(dirs[0]))

    async def prompt(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in REQUIRED:
            raise HTTPException(404, f"no prompt {name!r} (known: {', '.join(sorted(REQUIRED))})")
        dirs = await run_in_threadpool(self._prompt_dirs)
        error, saved, status = "", "", 200
        if request.method == "POST":
            refused = await check_csrf(request, self.token)
            if refused:
                return PlainTextResponse(f"403: {refused}", status_code=403)
            raw = str((await request.form()).get("text", "")).replace("\r\n", "\n")
            try:
                prompt = save_template(name, raw, dirs[0])
                saved = f"saved as {prompt.path} (hash {prompt.hash}); sessions use it from their next iteration"
            except PromptError as err:
                error, status = str(err), 400
        else:
            raw = ""
        path = template_path(name, dirs)
        if not raw or saved:
            raw = path.read_text(encoding="utf-8")
        history = await run_in_threadpool(self._prompt_history, name)
        return self.render("prompt.html", status=status, name=name, text=raw, path=str(path), error=error,
                           saved=saved, placeholders=sorted(REQUIRED[name]), history=history,
                           edited=path.parent == dirs[0])

    def _prompt_history(self, name: str) -> list[dict[str, Any]]:
        if not self.archive_path.is_file():
            return []
        with self.archive() as archive:
            rows = pages.prompt_versions(archive, name)
        for row in rows:  # what this version produced, as a query in the console
            row["artifacts_sql"] = artifacts_query(name, row["prompt_hash"])
        return rows

    def prompt_diff(self, request: Request) -> Response:
        name = request.path_params["name"]
        a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
        texts: dict[str, str] = {}
        with self.archive() as archive:
            for digest in (a, b):
                if digest == "current":
                    texts[digest] = load_prompt(name, self._prompt_dirs()).text
                else:
                    text = pages.prompt_text(archive, digest)
                    if text is None:
                        raise ArchiveError(f"no prompt version {digest!r} in the archive")
                    texts[digest] = text
        return self.render("prompt_diff.html", name=name, a=a, b=b, diff=diff_html(texts[a], texts[b], a, b))

    # ----------------------------------------------------------------- SQL

    def _saved_queries(self) -> list[tuple[str, str]]:
        directory = self.workdir / "queries"
        return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.sql"))] if directory.is_dir() else []

    def sql(self, request: Request) -> Response:
        sql = request.query_params.get("q", "")
        columns: list[str] = []
        rows: list[tuple] = []
        cut, error = False, ""
        if sql.strip():
            try:
                columns, rows, cut = console_query(self.archive_path, sql, max_rows=SQL_ROWS)
            except ArchiveError as err:
                error = str(err)
        return self.render("sql.html", status=400 if error else 200, sql=sql, columns=columns,
                           rows=[[_cell(v) for v in r] for r in rows], cut=cut, error=error, max_rows=SQL_ROWS,
                           examples=EXAMPLE_QUERIES, saved=self._saved_queries(), query_q=quote(sql))

    def sql_csv(self, request: Request) -> Response:
        columns, rows, _ = console_query(self.archive_path, request.query_params.get("q", ""), max_rows=1_000_000)
        return Response(csv_text(columns, rows), media_type="text/csv",
                        headers={"content-disposition": 'attachment; filename="coevo-query.csv"'})

    async def sql_save(self, request: Request) -> Response:
        refused = await check_csrf(request, self.token)
        if refused:
            return PlainTextResponse(f"403: {refused}", status_code=403)
        form = await request.form()
        name, sql = str(form.get("name", "")).strip(), str(form.get("q", ""))
        if not QUERY_NAME.match(name):
            raise HTTPException(400, "a query name is 1-64 letters, digits, spaces, '_', '.' or '-'")
        if not sql.strip():
            raise HTTPException(400, "nothing to save: the query is empty")
        directory = self.workdir / "queries"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.sql").write_text(sql, encoding="utf-8")
        return RedirectResponse(f"/sql?q={quote(sql)}", status_code=303)


def artifacts_query(name: str, digest: str) -> str:
    """SQL listing what template version `digest` of `name` produced (for the console)."""
    if name == "generator":
        return ("SELECT a.algorithm_id, a.iteration, s.outcome, s.dev_score, s.test_score\n"
                "FROM algorithms a JOIN algorithm_scores s USING (algorithm_id)\n"
                f"WHERE a.template_hash = '{digest}'\nORDER BY s.dev_score DESC NULLS LAST")
    if name.startswith("task_writer"):
        return ("SELECT family_id, name, action, generation, status\nFROM task_families\n"
                f"WHERE prompt_hash = '{digest}'\nORDER BY generation, family_id")
    return f"SELECT session_id, generation, created_at\nFROM prompt_uses\nWHERE prompt_hash = '{digest}'\nORDER BY session_id, generation"


def _int(text: str | None, default: int) -> int:
    try:
        return max(0, int(text or default))
    except ValueError:
        return default


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
