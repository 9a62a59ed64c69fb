"""Synthetic skills of the embedded zoo: deterministic task generators with exact-match answers.

Each skill is a family of short prompts (`rev hbdc=`) whose answer is a pure function of the
prompt, so a tiny character-level model can learn it and exact match can score it. The base
model only learns the *format* (copying); each expert learns one transformation.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from agents.tasks import Task

LETTERS = "abcdefghij"


def _word(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _upper(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"up {w}=", w.upper()


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng)
    return f"rev {w}=", w[::-1]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 59), rng.randint(0, 9)
    return f"add {a} {b}=", str(a + b)


def _copy(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 2, 6)
    return f"say {w}=", w


# Skill name -> generator. Names are what users see in `coevo zoo info` and in the archive.
SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "upper": _upper,
    "reverse": _reverse,
    "add": _add,
}

# Base pre-training sees every skill on a narrow slice of its domain only (3-letter words,
# small addends) plus plain copying, so the base knows the formats and part of each skill;
# experts extend one skill to its full domain. Fine-tunes then stay small perturbations of
# the base, which is the regime where merging works (as with real pretrained LMs).
def _narrow(skill: str, rng: random.Random) -> tuple[str, str]:
    while True:
        prompt, answer = SKILLS[skill](rng)
        operand = prompt.split(" ", 1)[1].rstrip("=")
        if skill == "add" and int(operand.split()[1]) <= 3:
            return prompt, answer
        if skill != "add" and len(operand) == 3:
            return prompt, answer


def base_example(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.3:
        return _copy(rng)
    return _narrow(rng.choice(list(SKILLS)), rng)


def make_split(skill: str, *, seed: int, n: int, exclude: set[str]) -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs of a skill, avoiding prompts in `exclude`."""
    rng = random.Random(f"{skill}:{seed}")
    seen: dict[str, str] = {}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"skill {skill!r} cannot produce {n} distinct tasks")
        prompt, answer = SKILLS[skill](rng)
        if prompt not in exclude and prompt not in seen:
            seen[prompt] = answer
    return list(seen.items())


def make_tasks(*, seed: int, n_dev: int, n_test: int) -> list[Task]:
    """Dev and test tasks of every skill; disjoint from each other."""
    tasks: list[Task] = []
    for skill in SKILLS:
        pairs = make_split(skill, seed=seed, n=n_dev + n_test, exclude=set())
        for i, (prompt, answer) in enumerate(pairs):
            split = "dev" if i < n_dev else "test"
            index = i if split == "dev" else i - n_dev
            tasks.append(Task(f"{skill}/{split}/{index:04d}", skill, split, prompt, answer))
    return tasks
