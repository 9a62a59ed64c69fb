"""`coevo report --html OUT`: one self-contained HTML file (inline CSS and SVG plots, no
script, no link that needs the server) with a session's plots, tables, leaderboard and the
code of its best algorithms, to attach to a paper or a chat."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pygments.lexers import PythonLexer

from archive_store import Archive, ArchiveError, pages
from archive_store.shell import write_atomic
from coevo.web.render import environment, highlighted, session_values

CSS = Path(__file__).parent / "static" / "style.css"
BEST_CODE = 3


def html_report(archive_path: Path, session_id: str | None = None) -> tuple[str, str]:
    """(session id, the report's HTML) for `session_id` (default: the latest session)."""
    with Archive.open(archive_path, read_only=True) as archive:
        if session_id is None:
            latest = archive.latest_session()
            if latest is None:
                raise ArchiveError(f"{archive_path} holds no session yet")
            session_id = str(latest["session_id"])
        values = session_values(archive, session_id)
        best = []
        if "top" in values:
            for row in values["top"][:BEST_CODE]:
                if row["dev_score"] is not None:
                    a = pages.algorithm(archive, row["algorithm_id"])
                    best.append((a, highlighted(a["code"], PythonLexer())))
    html = environment().get_template("report.html").render(
        report=True, css=CSS.read_text(), best_code=best,
        written=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), **values,
    )
    return session_id, html


def write_html_report(archive_path: Path, out: Path, session_id: str | None = None) -> str:
    """Write the report to `out` (whole, then renamed into place); returns the session id."""
    session_id, html = html_report(archive_path, session_id)
    write_atomic(Path(out), html)
    return session_id
