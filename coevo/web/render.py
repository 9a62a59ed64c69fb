"""What both the review app and `coevo report --html` render: the Jinja2 environment, a
session's values (rows, tables and plots), highlighted code."""

from __future__ import annotations

import difflib
import json
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import DiffLexer

from archive_store import pages, queries
from archive_store.reader import ArchiveReader
from coevo.web import plots

POPULATION_MODES = ("acdc", "cycleqd")


def environment() -> Environment:
    """Templates autoescape: anything from the archive (code, answers, notes) is text."""
    env = Environment(loader=PackageLoader("coevo.web", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = _pct
    env.filters["seconds"] = _seconds
    env.filters["q"] = lambda value: quote(str(value), safe="/")
    env.globals["pygments_css"] = Markup(HtmlFormatter().get_style_defs(".hl"))
    return env


def session_values(archive: ArchiveReader, session_id: str) -> dict[str, Any]:
    """Everything a session's page (and the HTML report) shows: its row, tables and plots."""
    session = pages.session_detail(archive, session_id)
    steps, timings = pages.step_timings(archive, session_id)
    values: dict[str, Any] = {"session": session, "config_json": json.dumps(session["config"], indent=2),
                              "steps": steps, "timings": timings}
    if session["mode"] not in POPULATION_MODES:
        board = queries.session_leaderboard(archive, session_id)
        dpo = pages.dpo_history(archive, session_id)
        values.update(
            stats=queries.iteration_stats(archive, session_id),
            leaderboard=board,
            dpo=dpo,
            top=pages.algorithms_page(archive, session_id, limit=15),
            figures=[f for f in (
                ("Dev scores of executable programs per iteration", plots.dev_score_distribution(pages.dev_scores_by_iteration(archive, session_id))),
                ("Outcomes, executable rate and human verdicts per iteration", plots.outcomes(
                    pages.outcomes_by_iteration(archive, session_id), pages.reviews_by_iteration(archive, session_id))),
                ("Leaderboard against the baselines", plots.leaderboard(board)),
                ("DPO history", plots.dpo_history(dpo)),
            ) if f[1] is not None],
        )
    else:
        metrics = pages.generation_metrics(archive, session_id)
        generation, grids = pages.elite_grids(archive, session_id)
        figures = [("Coverage per generation", plots.coverage(metrics))]
        team: list[dict[str, Any]] = []
        if metrics:
            last = metrics[-1]
            figures.append(("Greedy team coverage curve", plots.team_curve(last["coverage_curve"], last["generation"])))
            names = queries.model_names(archive, last["team"])
            team = [{"model_id": m, "name": names.get(m, m), "coverage": c}
                    for m, c in zip(last["team"], last["coverage_curve"], strict=False)]
        for grid, cells in grids.items():
            figures.append((f"MAP-Elites grid {grid} (generation {generation})", plots.elite_grid(grid, cells)))
        elites = [cell for cells in grids.values() for cell in cells]
        names = queries.model_names(archive, [c["model_id"] for c in elites])
        elites = [{**c, "name": names.get(c["model_id"], c["model_id"])} for c in elites]
        values.update(metrics=metrics, team=team, members=pages.population_members(archive, session_id), elites=elites,
                      figures=[f for f in figures if f[1] is not None])
    values["figures"] = [(title, Markup(svg)) for title, svg in values["figures"]]
    return values


def diff_html(old: str, new: str, old_label: str, new_label: str) -> Markup:
    """A unified diff of two texts, highlighted ("(identical)" when they are)."""
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), old_label, new_label, lineterm="")
    return highlighted("\n".join(lines) or "(identical)", DiffLexer())


def highlighted(code: str, lexer: Any) -> Markup:
    # Pygments escapes the source: `<script>` in a program is shown, never run.
    return Markup(highlight(code, lexer, HtmlFormatter(cssclass="hl", linenos="table")))


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}"


def _seconds(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    return f"{value:.2f} s" if value < 60 else f"{int(value // 60)} min {int(value % 60)} s"


