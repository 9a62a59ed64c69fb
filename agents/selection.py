"""Survivor and parent selection for coevo's population modes: AC/DC's DNS and CycleQD's grids.

A skill vector is one score in [0, 1] per task (0/1 for AC/DC's solved/unsolved). Everything
here is a pure function of its inputs (plus an explicit `random.Random`), so a resumed session
rebuilds the same state from the archive's rows.

Dominated Novelty Search (Bahlous-Boldi et al., 2025, as AC/DC uses it). With n models and
scores s_i(t):

    w_t          = (n - sum_i s_i(t) + 1) / (n + 1)      task difficulty, see `task_weights`
    fitness(i)   = sum_t w_t s_i(t) / sum_t w_t
    distance(i,j)= sum_t w_t max(0, s_i(t) - s_j(t)) / sum_t w_t
    score(i)     = mean of distance(i, j) over the k fitter j with the smallest distance
                   (+inf when no model is fitter)

and the models with the highest scores survive.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MEAN = "mean"  # quality name of the fixed-quality grid: the mean over all tasks


# --- Dominated Novelty Search --------------------------------------------------------------


def _skill_vectors(skills: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """The skill vectors as lists, checked: equal lengths, every score in [0, 1]."""
    vectors = {model: [float(s) for s in scores] for model, scores in skills.items()}
    lengths = {len(v) for v in vectors.values()}
    if len(lengths) > 1:
        raise ValueError(
            f"skill vectors have different lengths {sorted(lengths)}: "
            "score every model on the same tasks, in the same order"
        )
    for model, vector in vectors.items():
        for t, s in enumerate(vector):
            if not 0.0 <= s <= 1.0:
                raise ValueError(
                    f"model '{model}' has score {s} on task {t}: skill scores must lie in [0, 1]"
                )
    return vectors


def task_weights(skills: Mapping[str, Sequence[float]]) -> list[float]:
    """Difficulty weight per task: w_t = (n - sum_i s_i(t) + 1) / (n + 1) over n models.

    For binary skills that is (models failing t + 1) / (n + 1): AC/DC's failure rate, smoothed
    so a task every model solves still weighs 1 / (n + 1) instead of 0 and a task nobody solves
    weighs 1. With no models every task would weigh 1, but an empty mapping has no tasks, so
    the result is [].
    """
    vectors = _skill_vectors(skills)
    if not vectors:
        return []
    n = len(vectors)
    columns = zip(*vectors.values(), strict=True)
    return [(n - math.fsum(column) + 1.0) / (n + 1.0) for column in columns]


def _checked_weights(
    vectors: Mapping[str, list[float]], weights: Sequence[float] | None
) -> list[float]:
    if weights is None:
        return task_weights(vectors)
    chosen = [float(w) for w in weights]
    n_tasks = len(next(iter(vectors.values()))) if vectors else len(chosen)
    if len(chosen) != n_tasks:
        raise ValueError(
            f"{len(chosen)} task weights for skill vectors of length {n_tasks}: "
            "give one weight per task"
        )
    if any(not w >= 0.0 for w in chosen):
        raise ValueError("task weights must be >= 0: pass difficulty weights, e.g. task_weights()")
    if chosen and math.fsum(chosen) == 0.0:
        raise ValueError("task weights sum to 0: at least one task must carry weight")
    return chosen


def _share(values: Sequence[float], weights: Sequence[float], total: float) -> float:
    # fsum is exactly rounded, so identical skill vectors get bit-identical fitness and
    # distances regardless of where they sit in the population.
    if total == 0.0:  # no tasks at all: nothing tells the models apart
        return 0.0
    return math.fsum(w * v for w, v in zip(weights, values, strict=True)) / total


def dns_fitness(
    skills: Mapping[str, Sequence[float]], *, weights: Sequence[float] | None = None
) -> dict[str, float]:
    """Difficulty-weighted share of the tasks each model solves (0..1)."""
    vectors = _skill_vectors(skills)
    w = _checked_weights(vectors, weights)
    total = math.fsum(w)
    return {model: _share(v, w, total) for model, v in vectors.items()}


def dns_scores(
    skills: Mapping[str, Sequence[float]],
    *,
    k: int = 3,
    weights: Sequence[float] | None = None,
) -> dict[str, float]:
    """DNS competition score per model: mean distance to its k nearest fitter models.

    distance(i, j) is the difficulty-weighted share of all tasks that i solves and j fails
    (AC/DC's `skill_ratio_to_full` default); a duplicate of a fitter model scores 0. Models are
    ranked by (fitness desc, model id asc) and "fitter" means "earlier in that ranking", so equal
    fitness is broken by id: exactly one model, the fittest, has no fitter model and scores +inf,
    and two identical models do not both escape competition. Fewer than k fitter models: the
    mean is over all of them.
    """
    if k < 1:
        raise ValueError(f"k={k}: DNS needs at least one nearest fitter neighbour (k >= 1)")
    vectors = _skill_vectors(skills)
    w = _checked_weights(vectors, weights)
    total = math.fsum(w)
    fitness = {model: _share(v, w, total) for model, v in vectors.items()}
    ranking = sorted(vectors, key=lambda m: (-fitness[m], m))
    scores: dict[str, float] = {}
    for position, model in enumerate(ranking):
        if position == 0:
            scores[model] = math.inf
            continue
        mine = vectors[model]
        distances = sorted(
            _share([max(0.0, a - b) for a, b in zip(mine, vectors[fitter], strict=True)], w, total)
            for fitter in ranking[:position]
        )
        nearest = distances[:k]
        scores[model] = math.fsum(nearest) / len(nearest)
    return scores


def dns_select(
    skills: Mapping[str, Sequence[float]],
    size: int,
    *,
    k: int = 3,
    weights: Sequence[float] | None = None,
) -> list[str]:
    """Dominated Novelty Search survivors: the `size` highest competition scores, in rank order.

    Ties in score are broken by fitness (higher first), then model id. The fittest model always
    survives (its score is +inf). With `size` >= the population, every model survives, ranked.
    """
    if size < 0:
        raise ValueError(f"size={size}: the number of survivors must be >= 0")
    scores = dns_scores(skills, k=k, weights=weights)
    fitness = dns_fitness(skills, weights=weights)
    ranked = sorted(scores, key=lambda m: (-scores[m], -fitness[m], m))
    return ranked[:size]


def random_select(ids: Sequence[str], size: int, rng: random.Random) -> list[str]:
    """Control for DNS: `size` survivors drawn uniformly without replacement (all when fewer)."""
    if size < 0:
        raise ValueError(f"size={size}: the number of survivors must be >= 0")
    return rng.sample(list(ids), min(size, len(ids)))


# --- CycleQD's MAP-Elites grids ------------------------------------------------------------


def quality_of(scores: Mapping[str, float], quality: str) -> float:
    """A model's quality for one grid: the mean over all its task scores for "mean", else one score."""
    if quality == MEAN:
        if not scores:
            raise ValueError("no task scores: evaluate the model before inserting it")
        return math.fsum(scores.values()) / len(scores)
    if quality not in scores:
        raise ValueError(
            f"scores lack the quality task '{quality}': evaluate every model on every task"
        )
    return float(scores[quality])


@dataclass(frozen=True)
class Elite:
    """The best model found so far in one grid cell."""

    model_id: str
    quality: float
    scores: dict[str, float]


@dataclass
class MapElites:
    """One MAP-Elites grid: quality = one task's score (or "mean"), behaviour axes = other tasks.

    Each axis is cut into `bins` equal bins over [0, 1] (CycleQD: 15); a score of exactly 1.0
    goes in the last bin. A cell keeps one elite, replaced only by strictly better quality.
    """

    quality: str
    axes: tuple[str, ...]
    bins: int = 15
    cells: dict[tuple[int, ...], Elite] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.axes = tuple(self.axes)
        if self.bins < 1:
            raise ValueError(f"bins={self.bins}: a grid axis needs at least one bin")
        if len(set(self.axes)) != len(self.axes):
            raise ValueError(f"behaviour axes {list(self.axes)} repeat a task: name each once")

    def cell_of(self, scores: Mapping[str, float]) -> tuple[int, ...]:
        """Bin index per behaviour axis: floor(score * bins), with 1.0 in the last bin."""
        cell = []
        for axis in self.axes:
            if axis not in scores:
                raise ValueError(
                    f"scores lack behaviour axis '{axis}': evaluate every model on every task"
                )
            s = float(scores[axis])
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"score {s} on axis '{axis}': behaviour scores must lie in [0, 1]")
            cell.append(min(int(s * self.bins), self.bins - 1))
        return tuple(cell)

    def insert(self, model_id: str, scores: Mapping[str, float]) -> bool:
        """Put the model in its cell if the cell is empty or its quality is strictly higher."""
        cell = self.cell_of(scores)
        q = quality_of(scores, self.quality)
        current = self.cells.get(cell)
        if current is not None and q <= current.quality:
            return False
        self.cells[cell] = Elite(model_id, q, {t: float(s) for t, s in scores.items()})
        return True

    def elites(self) -> list[Elite]:
        """The elites in cell order (a fixed order, so sampling is reproducible)."""
        return [self.cells[cell] for cell in sorted(self.cells)]

    def sampling_weights(self, *, elite_sampling: bool = True) -> list[float]:
        """Parent-selection probability of each elite, aligned with `elites()`.

        CycleQD's elite sampling: P ∝ Π over the quality and behaviour axes of (0.5 + 0.3 x),
        x the elite's score min-max normalised over this grid's elites (the paper's constants;
        the released code normalises bin indices instead of scores). An axis where all elites
        agree contributes a factor 1. Uniform when `elite_sampling` is False.
        """
        elites = self.elites()
        if not elites:
            return []
        if not elite_sampling:
            return [1.0 / len(elites)] * len(elites)
        columns = [[e.quality for e in elites]]
        columns += [[e.scores[axis] for e in elites] for axis in self.axes]
        weights = [1.0] * len(elites)
        for column in columns:
            low, high = min(column), max(column)
            if high == low:
                continue
            for i, value in enumerate(column):
                weights[i] *= 0.5 + 0.3 * (value - low) / (high - low)
        total = math.fsum(weights)
        return [w / total for w in weights]

    def sample_parents(
        self, n: int, rng: random.Random, *, elite_sampling: bool = True
    ) -> list[str]:
        """n parent model ids: without replacement when the grid has >= n elites, else with.

        Without replacement, each draw picks among the elites left with probability proportional
        to `sampling_weights()`.
        """
        elites = self.elites()
        if n <= 0:
            return []
        if not elites:
            raise ValueError(f"grid '{self.quality}' is empty: insert models before sampling")
        ids = [e.model_id for e in elites]
        weights = self.sampling_weights(elite_sampling=elite_sampling)
        if len(elites) < n:
            return rng.choices(ids, weights=weights, k=n)
        chosen: list[str] = []
        for _ in range(n):
            index = _weighted_index(weights, rng)
            chosen.append(ids.pop(index))
            weights.pop(index)
        return chosen

    def to_rows(self) -> list[dict[str, Any]]:
        """One JSON-able row per occupied cell, in cell order."""
        return [
            {
                "quality": self.quality,
                "cell": list(cell),
                "model_id": elite.model_id,
                "quality_score": elite.quality,
                "scores": dict(elite.scores),
            }
            for cell, elite in sorted(self.cells.items())
        ]

    @classmethod
    def from_rows(
        cls, quality: str, axes: Sequence[str], bins: int, rows: Sequence[Mapping[str, Any]]
    ) -> MapElites:
        """Rebuild a grid from `to_rows()` output, checking each row still fits this grid."""
        grid = cls(quality, tuple(axes), bins)
        for row in rows:
            if row["quality"] != quality:
                raise ValueError(
                    f"row for model '{row['model_id']}' belongs to grid '{row['quality']}', "
                    f"not '{quality}': pass each grid its own rows"
                )
            cell = tuple(int(i) for i in row["cell"])
            scores = {t: float(s) for t, s in row["scores"].items()}
            if grid.cell_of(scores) != cell:
                raise ValueError(
                    f"model '{row['model_id']}' is stored in cell {list(cell)} but its scores fall "
                    f"in {list(grid.cell_of(scores))}: rebuild with the bins the rows were made with"
                )
            if cell in grid.cells:
                raise ValueError(f"two rows for cell {list(cell)} of grid '{quality}': keep one")
            grid.cells[cell] = Elite(str(row["model_id"]), float(row["quality_score"]), scores)
        return grid


def _weighted_index(weights: Sequence[float], rng: random.Random) -> int:
    """Index drawn with probability proportional to `weights` (one rng.random() call)."""
    target = rng.random() * math.fsum(weights)
    running = 0.0
    for index, w in enumerate(weights):
        running += w
        if target < running:
            return index
    return len(weights) - 1  # rounding left target at the very top


def make_grids(tasks: Sequence[str], bins: int = 15, cyclic: bool = True) -> dict[str, MapElites]:
    """All CycleQD grids, keyed by quality name.

    Cyclic: one grid per task, quality = that task, axes = the other tasks (CycleQD with K = 3
    has two axes per grid). Fixed (the ablation): one grid with quality "mean"; its axes are only
    the first two tasks, because a grid over every task has bins^K cells and almost every child
    would land in an empty one.
    """
    names = list(tasks)
    if not names:
        raise ValueError("no tasks: CycleQD needs at least one task to build a grid")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks {names} repeat a name: name each task once")
    if MEAN in names:
        raise ValueError(f"a task is named '{MEAN}', the fixed grid's quality: rename the task")
    if not cyclic:
        return {MEAN: MapElites(MEAN, tuple(names[:2]), bins)}
    return {t: MapElites(t, tuple(o for o in names if o != t), bins) for t in names}


def insert_everywhere(
    grids: Mapping[str, MapElites], model_id: str, scores: Mapping[str, float]
) -> list[str]:
    """Insert one child into every grid (as CycleQD does); the names of the grids it entered."""
    return [name for name, grid in grids.items() if grid.insert(model_id, scores)]


def cycleqd_quality(generation: int, tasks: Sequence[str], cyclic: bool) -> str:
    """The grid optimised this generation: tasks[generation % K] when cyclic, else "mean"."""
    if not cyclic:
        return MEAN
    if not tasks:
        raise ValueError("no tasks: CycleQD needs at least one task to cycle over")
    return tasks[generation % len(tasks)]
