"""Coverage, greedy teams and best-of-N answers, on hand-checkable examples."""

from __future__ import annotations

import pytest

from agents.metrics import (
    best_of_n,
    best_of_n_score,
    coverage,
    coverage_curve,
    greedy_team,
    solved_sets,
)

TASKS = {f"t{i}" for i in range(1, 9)}
# Two strong models that solve the same tasks, and a weaker one that solves the rest.
SOLVED = {
    "strong1": {"t1", "t2", "t3", "t4", "t5"},
    "strong2": {"t1", "t2", "t3", "t4"},
    "comp": {"t6", "t7", "t8"},
    "none": set(),
}


def test_solved_sets_threshold_and_models_that_solve_nothing() -> None:
    rows = [
        ("a", "t1", 1.0),
        ("a", "t2", 0.4),
        ("b", "t1", 0.0),
        ("a", "t2", 0.6),  # re-evaluated: any passing row counts
    ]
    assert solved_sets(rows) == {"a": {"t1"}, "b": set()}
    assert solved_sets(rows, threshold=0.5) == {"a": {"t1", "t2"}, "b": set()}


def test_coverage_hand_examples() -> None:
    assert coverage(SOLVED, ["strong1"], TASKS) == 5 / 8
    assert coverage(SOLVED, ["strong1", "strong2"], TASKS) == 5 / 8
    assert coverage(SOLVED, ["strong1", "comp"], TASKS) == 1.0
    assert coverage(SOLVED, ["comp"], {"t6", "t9"}) == 0.5  # solves outside `tasks` ignored
    assert coverage(SOLVED, [], TASKS) == 0.0
    assert coverage(SOLVED, ["strong1"], []) == 0.0
    with pytest.raises(ValueError, match="has no solved set"):
        coverage(SOLVED, ["ghost"], TASKS)


def test_greedy_team_prefers_complementary_models() -> None:
    assert greedy_team(SOLVED, 2, TASKS) == ["strong1", "comp"]
    # No model adds coverage after two: the rest fill in by solved count.
    assert greedy_team(SOLVED, 4, TASKS) == ["strong1", "comp", "strong2", "none"]
    assert greedy_team(SOLVED, 10, TASKS) == ["strong1", "comp", "strong2", "none"]
    assert greedy_team(SOLVED, 0, TASKS) == []


def test_greedy_team_tie_rules() -> None:
    solved = {
        "first": {"t1", "t2", "t3", "t7"},
        "broad": {"t1", "t2", "t4"},  # adds t4, solves 3 overall
        "narrow": {"t5"},  # adds t5, solves 1 overall
        "b_twin": {"t6"},
        "a_twin": {"t6"},
    }
    tasks = {f"t{i}" for i in range(1, 8)}
    assert greedy_team(solved, 2, tasks) == ["first", "broad"]
    assert greedy_team(solved, 4, tasks) == ["first", "broad", "a_twin", "narrow"]


def test_coverage_curve_is_prefixes_of_the_greedy_team() -> None:
    curve = coverage_curve(SOLVED, TASKS, 6)
    assert curve == [
        (1, 5 / 8, ["strong1"]),
        (2, 1.0, ["strong1", "comp"]),
        (3, 1.0, ["strong1", "comp", "strong2"]),
        (4, 1.0, ["strong1", "comp", "strong2", "none"]),
    ]


ANSWERS = {
    "m1": {"x": "4", "y": "a", "z": " 7\n", "w": "b"},
    "m2": {"x": " 4 ", "y": "b", "z": "7", "w": "a"},
    "m3": {"x": "5", "z": "8", "w": "a", "only3": "q"},
    "m4": {"w": "b"},
}


def test_best_of_n_majority_and_ties() -> None:
    chosen = best_of_n(ANSWERS, ["m1", "m2", "m3"])
    assert chosen == {
        "x": "4",  # "4" and " 4 " vote together
        "y": "a",  # 1-1 tie: the earliest member's answer
        "z": " 7\n",  # returned as the earliest majority member wrote it
        "w": "a",  # 2-1 majority even though m1 answered first
        "only3": "q",  # one member answered
    }
    # 2-2 tie on w: the earliest member's answer wins.
    assert best_of_n(ANSWERS, ["m1", "m2", "m3", "m4"])["w"] == "b"
    assert best_of_n(ANSWERS, ["m2"]) == ANSWERS["m2"]


def test_best_of_n_uses_pick_callback() -> None:
    calls: list[tuple[str, list[str]]] = []

    def last(task_id: str, candidates: list[str]) -> int:
        calls.append((task_id, candidates))
        return len(candidates) - 1

    chosen = best_of_n(ANSWERS, ["m1", "m3"], pick=last)
    assert chosen == {"x": "5", "y": "a", "z": "8", "w": "a", "only3": "q"}
    assert ("x", ["4", "5"]) in calls and ("y", ["a"]) in calls
    assert len(calls) == 5
    with pytest.raises(ValueError, match="pick returned index 2"):
        best_of_n(ANSWERS, ["m1", "m2"], pick=lambda task_id, candidates: 2)
    with pytest.raises(ValueError, match="has no answers"):
        best_of_n(ANSWERS, ["ghost"])


def test_best_of_n_score_credits_the_member_who_wrote_the_picked_answer() -> None:
    answers = {"a": {"t1": "4", "t2": "x"}, "b": {"t1": "5", "t2": "y"}, "c": {"t1": "4", "t2": "y "}}
    scores = {"a": {"t1": 1.0, "t2": 0.0}, "b": {"t1": 0.0, "t2": 1.0}, "c": {"t1": 0.5, "t2": 1.0}}
    # t1: majority "4" (a and c): the best of their scores, 1.0; t2: majority "y" (b, c): 1.0;
    # t3 (nobody answered it): 0.
    assert best_of_n_score(answers, ["a", "b", "c"], scores, ["t1", "t2", "t3"]) == pytest.approx(2 / 3)
    # An LLM picking the first candidate takes a's answers: 1.0 on t1, 0.0 on t2.
    assert best_of_n_score(answers, ["a", "b", "c"], scores, ["t1", "t2"], lambda t, c: 0) == 0.5
