"""DNS survivor selection and CycleQD's MAP-Elites grids, on hand-checkable populations."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest

from agents.selection import (
    Elite,
    MapElites,
    cycleqd_quality,
    dns_fitness,
    dns_scores,
    dns_select,
    insert_everywhere,
    make_grids,
    quality_of,
    random_select,
    task_weights,
)

# t3 is solved only by the specialist; "dup" is an exact copy of "best".
POPULATION = {
    "best": [1, 1, 1, 0],
    "dup": [1, 1, 1, 0],
    "mid": [1, 1, 0, 0],
    "spec": [0, 0, 0, 1],
}


# --- DNS -----------------------------------------------------------------------------------


def test_task_weights_follow_smoothed_failure_rate() -> None:
    # n = 4: t0, t1 fail 1 -> 2/5; t2 fails 2 -> 3/5; t3 fails 3 -> 4/5.
    assert task_weights(POPULATION) == pytest.approx([0.4, 0.4, 0.6, 0.8])
    # A task everyone solves still counts a little; one nobody solves weighs 1.
    assert task_weights({"a": [1, 0], "b": [1, 0]}) == pytest.approx([1 / 3, 1.0])
    assert task_weights({}) == []


def test_specialist_beats_dominated_duplicate_of_the_best() -> None:
    scores = dns_scores(POPULATION)
    assert scores["best"] == math.inf
    assert scores["dup"] == 0.0  # identical to a fitter model
    assert scores["mid"] == 0.0  # solves a subset of what "best" solves
    assert scores["spec"] == pytest.approx(0.8 / 2.2)  # t3 alone, over total weight 2.2
    assert dns_select(POPULATION, 2) == ["best", "spec"]


def test_fitness_is_difficulty_weighted_share() -> None:
    fitness = dns_fitness(POPULATION)
    assert fitness["best"] == pytest.approx(1.4 / 2.2)
    assert fitness["mid"] == pytest.approx(0.8 / 2.2)
    assert fitness["spec"] == pytest.approx(0.8 / 2.2)


def test_equal_fitness_ties_broken_by_id_so_one_model_is_unbeaten() -> None:
    # Two identical champions: only the smaller id escapes competition.
    scores = dns_scores({"b": [1, 0], "a": [1, 0]})
    assert scores == {"a": math.inf, "b": 0.0}


def test_k_nearest_fitter_and_k_beyond_the_fitter_count() -> None:
    skills = {"A": [1, 1, 1, 1, 0], "B": [1, 1, 1, 0, 0], "X": [0, 0, 0, 1, 1]}
    uniform = [1.0] * 5
    # d(X, A) = 1/5 (t4), d(X, B) = 2/5 (t3, t4); B ⊂ A so d(B, A) = 0.
    assert dns_scores(skills, k=1, weights=uniform)["X"] == pytest.approx(0.2)
    assert dns_scores(skills, k=2, weights=uniform)["X"] == pytest.approx(0.3)
    # k = 5 with only two fitter models: the mean is over those two.
    assert dns_scores(skills, k=5, weights=uniform) == pytest.approx(
        {"A": math.inf, "B": 0.0, "X": 0.3}
    )


def test_fractional_duplicates_have_distance_zero() -> None:
    scores = dns_scores({"a": [0.5, 0.7], "b": [0.5, 0.7], "c": [0.9, 0.1]})
    assert scores["b"] == 0.0
    # c beats a on task 0 by 0.4: weights n=3: t0 (3 - 1.9 + 1)/4, t1 (3 - 1.5 + 1)/4.
    w0, w1 = 2.1 / 4, 2.5 / 4
    assert scores["c"] == pytest.approx(w0 * 0.4 / (w0 + w1))


def test_fittest_always_survives_random_populations() -> None:
    rng = random.Random(0)
    for _ in range(50):
        skills = {
            f"m{i}": [float(rng.random() < 0.4) for _ in range(12)]
            for i in range(rng.randint(2, 10))
        }
        fitness = dns_fitness(skills)
        fittest = min(skills, key=lambda m: (-fitness[m], m))
        for size in (1, 3):
            survivors = dns_select(skills, size, k=3)
            assert survivors[0] == fittest
            assert len(survivors) == min(size, len(skills))


def test_size_at_least_population_returns_everyone_ranked() -> None:
    ranked = dns_select(POPULATION, 10)
    assert ranked == ["best", "spec", "dup", "mid"]  # score ties (0.0) go to the fitter
    assert dns_select(POPULATION, 4) == ranked
    assert dns_select(POPULATION, 0) == []
    assert dns_select({}, 3) == []


def test_dns_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="different lengths"):
        dns_scores({"a": [1, 0], "b": [1]})
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        dns_scores({"a": [1.5]})
    with pytest.raises(ValueError, match="k >= 1"):
        dns_scores(POPULATION, k=0)
    with pytest.raises(ValueError, match="one weight per task"):
        dns_scores(POPULATION, weights=[1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        dns_scores(POPULATION, weights=[0.0] * 4)


def test_random_select_is_reproducible_and_uniform_subset() -> None:
    ids = [f"m{i}" for i in range(10)]
    first = random_select(ids, 4, random.Random(7))
    assert first == random_select(ids, 4, random.Random(7))
    assert len(set(first)) == 4 and set(first) <= set(ids)
    assert sorted(random_select(ids, 20, random.Random(1))) == ids
    counts = Counter(m for seed in range(2000) for m in random_select(ids, 1, random.Random(seed)))
    assert all(abs(c / 2000 - 0.1) < 0.03 for c in counts.values())


# --- MAP-Elites ----------------------------------------------------------------------------


def test_cell_boundaries_at_zero_one_and_bin_edges() -> None:
    grid = MapElites("q", ("a",), bins=4)
    assert grid.cell_of({"a": 0.0}) == (0,)
    assert grid.cell_of({"a": 0.2499}) == (0,)
    assert grid.cell_of({"a": 0.25}) == (1,)
    assert grid.cell_of({"a": 0.75}) == (3,)
    assert grid.cell_of({"a": 1.0}) == (3,)  # 1.0 goes in the last bin, not past it
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        grid.cell_of({"a": 1.01})
    with pytest.raises(ValueError, match="lack behaviour axis 'a'"):
        grid.cell_of({"q": 0.5})


def test_insert_replaces_only_on_strictly_better_quality() -> None:
    grid = MapElites("q", ("a",), bins=4)
    assert grid.insert("m1", {"q": 0.5, "a": 0.1})
    assert not grid.insert("m2", {"q": 0.4, "a": 0.2})  # same cell, worse
    assert not grid.insert("m3", {"q": 0.5, "a": 0.0})  # same cell, equal: incumbent stays
    assert grid.cells[(0,)].model_id == "m1"
    assert grid.insert("m4", {"q": 0.6, "a": 0.24})  # same cell, better
    assert grid.insert("m5", {"q": 0.1, "a": 0.9})  # new cell
    assert [e.model_id for e in grid.elites()] == ["m4", "m5"]
    assert grid.elites()[0] == Elite("m4", 0.6, {"q": 0.6, "a": 0.24})


def test_mean_quality() -> None:
    assert quality_of({"a": 0.2, "b": 0.6}, "mean") == pytest.approx(0.4)
    assert quality_of({"a": 0.2, "b": 0.6}, "b") == 0.6
    grid = MapElites("mean", ("a",), bins=2)
    grid.insert("x", {"a": 0.0, "b": 1.0})
    assert not grid.insert("y", {"a": 0.1, "b": 0.8})  # mean 0.45 < 0.5
    assert grid.elites()[0].quality == pytest.approx(0.5)


def _three_elite_grid() -> MapElites:
    grid = MapElites("q", ("a", "b"), bins=4)
    grid.insert("e1", {"q": 0.2, "a": 0.0, "b": 0.0})
    grid.insert("e2", {"q": 0.6, "a": 0.5, "b": 1.0})
    grid.insert("e3", {"q": 1.0, "a": 1.0, "b": 0.5})
    return grid


# Normalised (q, a, b): e1 (0, 0, 0), e2 (0.5, 0.5, 1), e3 (1, 1, 0.5); factor 0.5 + 0.3 x.
RAW = [0.5 * 0.5 * 0.5, 0.65 * 0.65 * 0.8, 0.8 * 0.8 * 0.65]
EXPECTED = [w / sum(RAW) for w in RAW]


def test_sampling_weights_match_the_formula() -> None:
    grid = _three_elite_grid()
    assert [e.model_id for e in grid.elites()] == ["e1", "e2", "e3"]
    assert grid.sampling_weights() == pytest.approx(EXPECTED)
    assert grid.sampling_weights(elite_sampling=False) == pytest.approx([1 / 3] * 3)
    # An axis where all elites agree (b) is neutral: weights (0.5 * 0.5, 0.8 * 0.8).
    flat = MapElites("q", ("a", "b"), bins=4)
    flat.insert("lo", {"q": 0.0, "a": 0.0, "b": 0.5})
    flat.insert("hi", {"q": 1.0, "a": 1.0, "b": 0.5})
    assert flat.sampling_weights() == pytest.approx([0.25 / 0.89, 0.64 / 0.89])


def test_sampling_frequencies_match_the_weights() -> None:
    grid = _three_elite_grid()
    with_replacement = Counter(grid.sample_parents(30000, random.Random(0)))
    firsts = Counter(grid.sample_parents(1, random.Random(seed))[0] for seed in range(6000))
    for counts, draws in ((with_replacement, 30000), (firsts, 6000)):
        freqs = [counts[m] / draws for m in ("e1", "e2", "e3")]
        assert freqs == pytest.approx(EXPECTED, abs=0.02)
    uniform = Counter(grid.sample_parents(30000, random.Random(1), elite_sampling=False))
    assert all(abs(c / 30000 - 1 / 3) < 0.02 for c in uniform.values())


def test_sample_parents_replacement_rule_and_reproducibility() -> None:
    grid = _three_elite_grid()
    for seed in range(50):
        pair = grid.sample_parents(3, random.Random(seed))
        assert sorted(pair) == ["e1", "e2", "e3"]  # >= n elites: no repeats
    assert grid.sample_parents(2, random.Random(3)) == grid.sample_parents(2, random.Random(3))
    assert len(grid.sample_parents(5, random.Random(0))) == 5  # fewer elites: with replacement
    assert grid.sample_parents(0, random.Random(0)) == []
    with pytest.raises(ValueError, match="is empty"):
        MapElites("q", ("a",)).sample_parents(2, random.Random(0))


def test_rows_round_trip_through_json() -> None:
    grid = _three_elite_grid()
    rows = json.loads(json.dumps(grid.to_rows()))
    assert rows[1] == {
        "quality": "q",
        "cell": [2, 3],
        "model_id": "e2",
        "quality_score": 0.6,
        "scores": {"q": 0.6, "a": 0.5, "b": 1.0},
    }
    rebuilt = MapElites.from_rows("q", ["a", "b"], 4, rows)
    assert rebuilt == grid
    assert rebuilt.sample_parents(2, random.Random(9)) == grid.sample_parents(2, random.Random(9))
    with pytest.raises(ValueError, match="rebuild with the bins"):
        MapElites.from_rows("q", ["a", "b"], 15, rows)
    with pytest.raises(ValueError, match="belongs to grid 'q'"):
        MapElites.from_rows("a", ["q", "b"], 4, rows)


def test_make_grids_and_quality_rotation() -> None:
    tasks = ["code", "os", "db"]
    grids = make_grids(tasks, bins=15, cyclic=True)
    assert {name: g.axes for name, g in grids.items()} == {
        "code": ("os", "db"),
        "os": ("code", "db"),
        "db": ("code", "os"),
    }
    fixed = make_grids(tasks + ["math"], cyclic=False)
    assert list(fixed) == ["mean"] and fixed["mean"].axes == ("code", "os")
    child = {"code": 0.3, "os": 1.0, "db": 0.0}
    assert insert_everywhere(grids, "c1", child) == ["code", "os", "db"]
    assert insert_everywhere(grids, "c2", {"code": 0.3, "os": 1.0, "db": 0.01}) == ["db"]
    assert [cycleqd_quality(g, tasks, cyclic=True) for g in range(4)] == [
        "code",
        "os",
        "db",
        "code",
    ]
    assert cycleqd_quality(5, tasks, cyclic=False) == "mean"
    with pytest.raises(ValueError, match="repeat"):
        make_grids(["a", "a"])
