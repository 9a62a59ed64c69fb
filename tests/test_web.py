"""`coevo serve` over a real DuckDB archive, through Starlette's test client: the token gate,
CSRF on every POST, generated code shown as text, the sealed SQL console, prompt edits with
validation, verdicts into the archive, and the self-contained HTML report. The real-browser
walk through a real session is in test_web_browser.py."""

from __future__ import annotations

import html
import re
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient
from test_archive import SESSION, algorithm, fill

from agents.prompts import (
    DEFAULT_PROMPTS_DIR,
    PromptError,
    check_template,
    load_prompt,
    save_template,
)
from archive_store import Archive
from coevo.web import plots
from coevo.web.app import ReviewApp
from coevo.web.auth import csrf_value
from coevo.web.report import write_html_report

TOKEN = "t0ken-for-tests"
HOSTILE = 'def merge(task_vectors, *, name, base):\n    """</pre><script>alert("pwned")</script>"""\n    return task_vectors[0]\n'


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    with Archive.open(tmp_path / "archive.duckdb") as archive:
        fill(archive)
        archive.add_algorithms([algorithm("x1", 1, 9, code=HOSTILE)])
    return tmp_path


@pytest.fixture
def client(workdir: Path) -> TestClient:
    client = TestClient(ReviewApp(workdir, TOKEN).build())
    assert client.get(f"/?token={TOKEN}").status_code == 200  # sets the cookie
    return client


def test_every_page_needs_the_token(workdir: Path) -> None:
    anonymous = TestClient(ReviewApp(workdir, TOKEN).build())
    for path in ("/", f"/session/{SESSION}", "/algorithm/a1", "/prompts", "/sql?q=select+1", "/static/htmx.min.js"):
        assert anonymous.get(path).status_code == 403, path
    assert anonymous.get("/?token=wrong").status_code == 403
    assert anonymous.post("/review", data={"algorithm_id": "a1", "verdict": "approve"}).status_code == 403
    # The token in the URL becomes an HttpOnly, SameSite=Strict cookie and leaves the address bar.
    first = anonymous.get(f"/sql?q=select+1&token={TOKEN}", follow_redirects=False)
    assert first.status_code == 303 and first.headers["location"] == "/sql?q=select+1"
    cookie = first.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert anonymous.get("/").status_code == 200
    script = TestClient(ReviewApp(workdir, TOKEN).build())
    assert script.get("/", headers={"Authorization": f"token {TOKEN}"}).status_code == 200


def test_state_changing_requests_need_csrf_and_the_same_origin(client: TestClient, workdir: Path) -> None:
    form = {"algorithm_id": "a1", "verdict": "approve", "note": "ok"}
    assert client.post("/review", data=form).status_code == 403
    assert client.post("/review", data={**form, "csrf": "forged"}).status_code == 403
    refused = client.post("/review", data={**form, "csrf": csrf_value(TOKEN)}, headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403 and "cross-origin" in refused.text
    assert client.post("/prompts/judge", data={"text": "x"}).status_code == 403
    assert client.post("/sql/save", data={"name": "n", "q": "select 1"}).status_code == 403
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        assert archive.scalar("select count(*) from reviews") == 0


def test_a_verdict_from_the_page_lands_in_the_archive(client: TestClient, workdir: Path) -> None:
    page = client.get("/algorithm/b1")
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text).group(1)  # type: ignore[union-attr]
    done = client.post("/review", data={"algorithm_id": "b1", "verdict": "reject", "note": "<b>no</b>", "csrf": csrf})
    assert done.status_code == 200 and "reject recorded" in done.text
    assert "&lt;b&gt;no&lt;/b&gt;" in done.text  # the note is text too
    bad = client.post("/review", data={"algorithm_id": "b1", "verdict": "love", "csrf": csrf})
    assert bad.status_code == 400 and "unknown verdict" in bad.text
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        assert archive.query("select algorithm_id, verdict, note from reviews")[1] == [("b1", "reject", "<b>no</b>")]


def test_generated_code_is_shown_as_text(client: TestClient) -> None:
    page = client.get("/algorithm/x1")
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "</pre><script>" not in page.text
    shown = html.unescape(re.sub(r"<[^>]+>", "", page.text.split('id="code"', 1)[1].split("</table>", 1)[0]))
    assert '</pre><script>alert("pwned")</script>' in shown  # what the reader sees: the program's text
    assert page.text.count("<script") == 1  # htmx, served by the app itself


def test_algorithm_page_shows_what_is_known(client: TestClient) -> None:
    page = client.get("/algorithm/b4").text
    assert "RuntimeError: shape mismatch" in page  # stderr tail
    assert "Diff against a1" in page or "Diff against a0" in page  # its exemplars are its relatives
    policy = client.get("/algorithm/a2").text
    assert "no_io" in policy and "open()" in policy
    missing = client.get("/algorithm/nope")
    assert missing.status_code == 404 and "no algorithm" in missing.text


def test_session_page_draws_the_papers_plots(client: TestClient) -> None:
    page = client.get(f"/session/{SESSION}")
    assert page.status_code == 200
    labels = set(re.findall(r'aria-label="([^"]+)"', page.text))
    assert {"dev-score distribution per iteration", "program outcomes and executable rate per iteration",
            "leaderboard against the baselines"} <= labels
    assert 'hx-trigger="every' in page.text  # a running session's page refreshes itself
    assert 'id="timings"' not in page.text  # the hand-made archive has no graph steps
    assert client.get("/session/nope").status_code == 404


def test_sql_console_is_read_only_and_sealed_off(client: TestClient, workdir: Path) -> None:
    (workdir / "secret.txt").write_text("do not read")
    for sql in (f"select * from read_text('{workdir / 'secret.txt'}')", f"copy (select 1) to '{workdir / 'x.csv'}'",
                "set enable_external_access = true", f"attach '{workdir / 'y.duckdb'}' as y", "delete from reviews"):
        page = client.get(f"/sql?q={quote(sql)}")
        assert page.status_code == 400 and 'id="error"' in page.text, sql
        assert "do not read" not in page.text
    assert not (workdir / "x.csv").exists() and not (workdir / "y.duckdb").exists()
    page = client.get("/sql?q=" + quote("select algorithm_id, outcome from algorithm_scores order by 1"))
    assert page.status_code == 200 and page.text.count("<tr>") == 12  # header + 11 programs
    csv = client.get("/sql.csv?q=" + quote("select algorithm_id from algorithms order by 1 limit 2"))
    assert csv.headers["content-type"].startswith("text/csv") and csv.text.splitlines() == ["algorithm_id", "a0", "a1"]
    saved = client.post("/sql/save", data={"name": "my first", "q": "select 42", "csrf": csrf_value(TOKEN)})
    assert saved.status_code == 200 and (workdir / "queries" / "my first.sql").read_text() == "select 42"
    assert client.post("/sql/save", data={"name": "../../etc/x", "q": "select 1", "csrf": csrf_value(TOKEN)}).status_code == 400


def test_prompt_edits_are_validated_and_saved_in_the_workdir(client: TestClient, workdir: Path) -> None:
    shipped = (DEFAULT_PROMPTS_DIR / "judge.md").read_text()
    csrf = csrf_value(TOKEN)
    unknown = client.post("/prompts/judge", data={"text": shipped + "\n$rubric\n", "csrf": csrf})
    assert unknown.status_code == 400 and "unknown placeholder(s) $rubric" in unknown.text
    missing = client.post("/prompts/judge", data={"text": shipped.replace("$reference", "the reference"), "csrf": csrf})
    assert missing.status_code == 400 and "lacks placeholder(s) $reference" in missing.text
    assert not (workdir / "prompts").exists()
    edited = shipped + "\nBe strict about units.\n"
    ok = client.post("/prompts/judge", data={"text": edited, "csrf": csrf})
    assert ok.status_code == 200 and 'id="saved"' in ok.text
    assert (workdir / "prompts" / "judge.md").read_text() == edited
    assert (DEFAULT_PROMPTS_DIR / "judge.md").read_text() == shipped  # never the installed copy
    listing = client.get("/prompts").text
    assert "edited" in listing and load_prompt("judge", [workdir / "prompts", DEFAULT_PROMPTS_DIR]).hash in listing
    assert client.get("/prompts/nope").status_code == 404


def test_template_checks() -> None:
    judge = (DEFAULT_PROMPTS_DIR / "judge.md").read_text()
    assert check_template("judge", judge).startswith("You are grading")
    with pytest.raises(PromptError, match="lone"):
        check_template("judge", judge + "\ncosts 5$ each")
    check_template("judge", judge + "\ncosts $$5 each")
    with pytest.raises(PromptError, match="unknown prompt"):
        check_template("jugde", judge)
    with pytest.raises(PromptError, match="empty"):
        check_template("judge", "<!-- only a header -->\n")


def test_workdir_templates_override_and_invalid_ones_are_not_saved(tmp_path: Path) -> None:
    generator = (DEFAULT_PROMPTS_DIR / "generator.md").read_text()
    dirs = [tmp_path / "prompts", DEFAULT_PROMPTS_DIR]
    assert load_prompt("generator", dirs).path == DEFAULT_PROMPTS_DIR / "generator.md"
    saved = save_template("generator", generator + "\nPrefer sparse updates.\n", tmp_path / "prompts")
    assert load_prompt("generator", dirs).hash == saved.hash != load_prompt("generator").hash
    with pytest.raises(PromptError):
        save_template("generator", "no placeholders", tmp_path / "prompts")
    assert load_prompt("generator", dirs).hash == saved.hash


def test_html_report_is_one_self_contained_file(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "report.html"
    assert write_html_report(workdir / "archive.duckdb", out) == SESSION
    text = out.read_text()
    assert "<script" not in text and "src=" not in text and "@import" not in text
    assert not re.search(r'href="(?!#)', text)  # no link that needs the server or the network
    assert text.count('class="plot"') >= 3 and "Leaderboard" in text and "Code of " in text


def test_plots_of_the_population_modes() -> None:
    metrics = [{"generation": g, "population_coverage": 0.5 + g / 10, "team_coverage": 0.4 + g / 10,
                "best_of_n": 0.3 + g / 10} for g in range(3)]
    assert 'aria-label="coverage per generation"' in (plots.coverage(metrics) or "")
    assert 'aria-label="greedy team coverage curve"' in (plots.team_curve([0.4, 0.6, 0.7], 2) or "")
    cells = [{"slot": f"{i},{j}", "fitness": (i + j) / 8} for i in range(3) for j in range(4) if (i + j) % 2]
    grid = plots.elite_grid("add", cells) or ""
    assert 'aria-label="MAP-Elites grid add"' in grid and grid.startswith("<svg")
    assert plots.coverage([]) is None and plots.elite_grid("x", []) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_refuses_a_taken_port_and_a_missing_workdir_in_one_line(workdir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "coevo", "serve", "--workdir", str(workdir), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run([sys.executable, "-m", "coevo", "serve", "--workdir", str(tmp_path / "nope"),
                           "--port", str(_free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no workdir" in done.stderr and "Traceback" not in done.stderr


def test_report_command_writes_html_and_names_a_missing_session(workdir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r" / "report.html"
    done = subprocess.run([sys.executable, "-m", "coevo", "report", "--workdir", str(workdir), "--html", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"wrote the report of session {SESSION}" in done.stdout, done.stderr
    assert out.read_text().startswith("<!doctype html>")
    done = subprocess.run([sys.executable, "-m", "coevo", "report", "--workdir", str(workdir), "--session", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"error: no session 'nope' in {workdir / 'archive.duckdb'}"
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([sys.executable, "-m", "coevo", "report", "--workdir", str(workdir), "--html",
                           str(tmp_path / "a-file" / "report.html")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: cannot write") and "Traceback" not in done.stderr


def test_a_verdict_given_while_a_session_runs_waits_in_the_inbox(client: TestClient, workdir: Path) -> None:
    from archive_store.reviews import INBOX
    from coevo.workdir import workdir_lock

    with workdir_lock(workdir):  # as a running session holds it
        done = client.post("/review", data={"algorithm_id": "a1", "verdict": "approve", "csrf": csrf_value(TOKEN)})
    assert done.status_code == 200 and "approve queued: the running session records it" in done.text
    assert len(list((workdir / INBOX).glob("*.json"))) == 1
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        assert archive.scalar("select count(*) from reviews") == 0


def test_program_listing_filters_and_a_model_shows_its_lineage(client: TestClient) -> None:
    listing = client.get(f"/session/{SESSION}/algorithms?outcome=ok").text
    shown = set(re.findall(r'href="/algorithm/([^"]+)"', listing))
    assert shown and "a2" not in shown and "a4" not in shown  # rejected by policy, timed out
    assert "rejected_by_policy" in client.get(f"/session/{SESSION}/algorithms").text
    lineage = client.get("/model/m-b1")
    assert lineage.status_code == 200 and 'id="lineage"' in lineage.text
    assert 'href="/model/e0"' in lineage.text and 'href="/model/e1"' in lineage.text  # its parents
    assert client.get("/model/nope").status_code == 404
