"""The end-of-session reports, read from the archive (`archive_store.queries`).

Self-Developing: the leaderboard (best algorithms against the base, the experts and the
reference merges, dev and test) and the per-iteration statistics. Population modes: coverage
per generation, the final team, and CycleQD's merged elites.
"""

from __future__ import annotations

import json

from agents.console import percent
from archive_store import queries
from archive_store.reader import ArchiveReader


def format_report(archive: ArchiveReader, session_id: str, mode: str) -> str:
    """The report of a session of `mode`."""
    if mode == "selfdev":
        return format_selfdev_report(archive, session_id)
    return format_population_report(archive, session_id)


def format_selfdev_report(archive: ArchiveReader, session_id: str) -> str:
    """Leaderboard (best algorithms vs baselines, dev and test) and per-iteration statistics."""
    lines = [f"Session {session_id}", "", "Leaderboard (exact match, %):"]
    lines.append(f"  {'model':42} {'kind':9} {'dev':>7} {'test':>7}")
    for name, kind, dev, test in queries.session_leaderboard(archive, session_id):
        lines.append(f"  {name:42} {kind:9} {percent(dev):>7} {percent(test):>7}")
    lines += ["", "Per iteration (dev scores of executable programs):"]
    lines.append(f"  {'iter':>4} {'gen':>3} {'programs':>8} {'executable':>10} {'rate':>6} {'mean':>6} {'median':>6} {'top-3':>17}")
    for row in queries.iteration_stats(archive, session_id):
        top3 = queries.top_dev_scores(archive, session_id, row["iteration"], 3)
        lines.append(
            f"  {row['iteration']:>4} {row['generator_version']:>3} {row['n_programs']:>8} {row['n_executable']:>10} "
            f"{100 * row['executable_rate']:>5.0f}% {percent(row['mean_dev']):>6} {percent(row['median_dev']):>6} "
            f"{', '.join(percent(s) for s in top3):>17}"
        )
    lines += ["", "Inspect: coevo review; coevo sql -c \"select * from leaderboard limit 10\""]
    return "\n".join(lines)


def format_population_report(archive: ArchiveReader, session_id: str) -> str:
    """Coverage per generation, the final team, and (CycleQD) the merged elites' score."""
    lines = [f"Session {session_id}", "", "Coverage per generation (share of active tasks solved):"]
    lines.append(f"  {'gen':>3} {'tasks':>5} {'models':>6} {'archive':>8} {'team':>6} {'best-of-N':>9} {'children ok':>11} {'tasks +/-/rej':>13}")
    metrics = queries.generation_metrics(archive, session_id)
    for m in metrics:
        lines.append(
            f"  {m['generation']:>3} {m['n_tasks']:>5} {m['n_models']:>6} {percent(m['population_coverage']):>8} "
            f"{percent(m['team_coverage']):>6} {percent(m['best_of_n']):>9} "
            f"{str(m['children_ok']) + '/' + str(m['children']):>11} "
            f"{str(m['tasks_added']) + '/' + str(m['tasks_removed']) + '/' + str(m['tasks_rejected']):>13}"
        )
    if metrics:
        last = metrics[-1]
        team = json.loads(last["team"])
        curve = json.loads(last["coverage_curve"])
        lines += ["", f"Final team (greedy for coverage, N = {last['team_size']}):"]
        names = queries.model_names(archive, team)
        for n, (model_id, value) in enumerate(zip(team, curve, strict=False), 1):
            lines.append(f"  {n}. {names.get(model_id, model_id):28} team coverage with it {percent(value)}  ({model_id})")
    score, n = queries.merged_elites_score(archive, session_id)
    if n:
        lines += ["", f"Merged elites (softmax of quality): mean score {percent(score)} over {n} tasks"]
    lines += ["", "Inspect: coevo sql -c \"select * from generation_metrics\"; \"select * from task_pool\"; \"select * from lineage\""]
    return "\n".join(lines)
