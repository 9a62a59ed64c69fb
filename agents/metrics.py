"""Population metrics from AC/DC: coverage of a team of models, greedy teams, best-of-N answers.

Coverage (AC/DC) is the share of tasks that at least one of N models solves; the team of N is
picked greedily for coverage. Best-of-N turns a team back into one answer per task.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence


def solved_sets(
    evaluations: Iterable[tuple[str, str, float]], threshold: float = 1.0
) -> dict[str, set[str]]:
    """Tasks each model solves, from (model_id, task_id, score) rows: score >= threshold.

    Every model that appears gets an entry, even one that solves nothing. A task evaluated more
    than once counts as solved if any row reaches the threshold, so the result does not depend
    on row order.
    """
    solved: dict[str, set[str]] = {}
    for model_id, task_id, score in evaluations:
        tasks = solved.setdefault(model_id, set())
        if score >= threshold:
            tasks.add(task_id)
    return solved


def _solved_by(solved: Mapping[str, set[str]], model_id: str) -> set[str]:
    if model_id not in solved:
        raise ValueError(
            f"model '{model_id}' has no solved set: evaluate it first (solved_sets lists every "
            "evaluated model)"
        )
    return solved[model_id]


def coverage(solved: Mapping[str, set[str]], team: Sequence[str], tasks: Collection[str]) -> float:
    """Share of `tasks` solved by at least one team member (0..1); 0 for no tasks."""
    wanted = set(tasks)
    if not wanted:
        return 0.0
    covered: set[str] = set()
    for model_id in team:
        covered |= _solved_by(solved, model_id) & wanted
    return len(covered) / len(wanted)


def greedy_team(solved: Mapping[str, set[str]], n: int, tasks: Collection[str]) -> list[str]:
    """AC/DC's team of n: repeatedly add the model that covers the most tasks not yet covered.

    Ties go to the model solving more of `tasks` overall, then the smaller model id. Once no
    model adds coverage the same rule keeps filling the team (gain 0 for all, so the strongest
    remaining models by solved count), so the team has min(n, models) members. The team for n
    is a prefix of the team for n + 1.
    """
    if n < 0:
        raise ValueError(f"n={n}: a team needs n >= 0 members")
    wanted = set(tasks)
    useful = {model_id: solved[model_id] & wanted for model_id in solved}
    team: list[str] = []
    covered: set[str] = set()
    remaining = set(useful)
    while remaining and len(team) < n:
        best = min(remaining, key=lambda m: (-len(useful[m] - covered), -len(useful[m]), m))
        team.append(best)
        covered |= useful[best]
        remaining.discard(best)
    return team


def coverage_curve(
    solved: Mapping[str, set[str]], tasks: Collection[str], max_n: int
) -> list[tuple[int, float, list[str]]]:
    """(N, coverage, greedy team) for N = 1..max_n, stopping at the number of models."""
    team = greedy_team(solved, max_n, tasks)
    return [
        (size, coverage(solved, team[:size], tasks), team[:size])
        for size in range(1, len(team) + 1)
    ]


def _majority(candidates: Sequence[str]) -> int:
    """Index of the most common stripped answer; ties go to the answer seen first."""
    stripped = [c.strip() for c in candidates]
    counts = Counter(stripped)
    top = max(counts.values())
    return next(i for i, answer in enumerate(stripped) if counts[answer] == top)


def best_of_n(
    answers: Mapping[str, Mapping[str, str]],
    team: Sequence[str],
    pick: Callable[[str, list[str]], int] | None = None,
) -> dict[str, str]:
    """One answer per task from the team's answers (answers[model_id][task_id] = answer).

    Candidates for a task are the answers of the team members who answered it, in team order.
    `pick(task_id, candidates)` returns the chosen index (an LLM judge plugs in here); by default
    a majority vote over stripped answers, ties to the earliest team member's answer. The chosen
    answer is returned as that member wrote it.
    """
    for model_id in team:
        if model_id not in answers:
            raise ValueError(f"team member '{model_id}' has no answers: run it on the tasks first")
    task_ids = sorted({task_id for model_id in team for task_id in answers[model_id]})
    chosen: dict[str, str] = {}
    for task_id in task_ids:
        candidates = [answers[m][task_id] for m in team if task_id in answers[m]]
        index = _majority(candidates) if pick is None else pick(task_id, list(candidates))
        if not 0 <= index < len(candidates):
            raise ValueError(
                f"pick returned index {index} for task '{task_id}' with {len(candidates)} "
                "candidates: return an index into the candidate list"
            )
        chosen[task_id] = candidates[index]
    return chosen


def best_of_n_score(
    answers: Mapping[str, Mapping[str, str]],
    team: Sequence[str],
    scores: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str],
    pick: Callable[[str, list[str]], int] | None = None,
) -> float:
    """Mean score of the team's best-of-N answers over `tasks` (0..1): the picked answer scores
    what the team member who wrote it scored on the task (scores[model_id][task_id])."""
    chosen = best_of_n(answers, team, pick)
    best = [
        max((scores[m][t] for m in team if t in chosen and answers[m].get(t, "").strip() == chosen[t].strip()), default=0.0)
        for t in tasks
    ]
    return sum(best) / max(1, len(best))
