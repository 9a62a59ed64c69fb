"""Synthetic skills of the embedded zoo: deterministic task generators with exact-match answers.

Each skill is a family of short prompts (`rev hbdc=`) whose answer is a pure function of the
prompt, so a tiny character-level model can learn it and exact match can score it.

The zoo is a miniature of the papers' regime: one broadly pre-trained base, experts
fine-tuned from it. The base's pre-training mixture (`base_example`) holds

- every skill *latent*: its full domain in another notation (`REV(hbdcf)=`), as a real
  pretrained LM knows a task long before it follows the task's instruction format;
- every skill's *narrow slice* in the tested notation (3-letter words, addends <= 3);
- filler skills in the tested notation over their full domain (never tested, never an
  expert): the tested notation itself is familiar;
- plain copying.

An expert is then a small, targeted change: it learns to apply its skill's known operation to
the full tested domain. Such changes add up (BENCHMARKS.md shows the regimes that did not).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from agents.tasks import Task

LETTERS = "abcdefghij"


def _word(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _numbers(rng: random.Random) -> str:
    return f"{rng.randint(10, 59)} {rng.randint(0, 9)}"


SYMBOLS = "!#$%&*+?@^"  # `sym` writes letter i of LETTERS as symbol i


def _symbols(word: str) -> str:
    return "".join(SYMBOLS[LETTERS.index(c)] for c in word)


def _arith(op: Callable[[int, int], int]) -> Callable[[str], str]:
    def answer(operand: str) -> str:
        a, b = operand.split()
        return str(op(int(a), int(b)))

    return answer


def _short_word(operand: str) -> bool:
    return len(operand) == 3


def _small_addend(operand: str) -> bool:
    return int(operand.split()[1]) <= 3


@dataclass(frozen=True)
class Skill:
    name: str
    keyword: str  # the tested notation: "{keyword} {operand}="
    latent: str  # pre-training's other notation: "{latent}({operand})="
    draw: Callable[[random.Random], str]  # an operand from the skill's full domain
    answer: Callable[[str], str]
    narrow: Callable[[str], bool]  # whether an operand is in the base's narrow slice

    def example(self, rng: random.Random) -> tuple[str, str]:
        operand = self.draw(rng)
        return f"{self.keyword} {operand}=", self.answer(operand)

    def latent_example(self, rng: random.Random) -> tuple[str, str]:
        operand = self.draw(rng)
        return f"{self.latent}({operand})=", self.answer(operand)

    def narrow_example(self, rng: random.Random) -> tuple[str, str]:
        while True:
            operand = self.draw(rng)
            if self.narrow(operand):
                return f"{self.keyword} {operand}=", self.answer(operand)


_ALL = [
    Skill("upper", "up", "CAP", _word, str.upper, _short_word),
    Skill("reverse", "rev", "REV", _word, lambda w: w[::-1], _short_word),
    Skill("add", "add", "SUM", _numbers, _arith(lambda a, b: a + b), _small_addend),
    Skill("sym", "sym", "SYM", _word, _symbols, _short_word),
    Skill("sub", "sub", "DIFF", _numbers, _arith(lambda a, b: a - b), _small_addend),
    Skill("rotate", "rot", "ROT", _word, lambda w: w[1:] + w[0], _short_word),
]
SKILLS: dict[str, Skill] = {s.name: s for s in _ALL}
# What Self-Developing merges by default (the zoo's `experts/`), and the other experts of the
# paper's transfer experiment (`transfer/experts/`): algorithms found on the first set are
# applied unchanged to the second. Both sets hold one letter map into a vocabulary of its own
# (upper, sym), one arithmetic skill and one reordering of the word; two rewrites into the same
# lowercase letters (`shift` next to `rotate`) competed in the merge (BENCHMARKS.md).
DISCOVERY = ("upper", "reverse", "add")
TRANSFER = ("sym", "sub", "rotate")

# Pre-training only, over their full domain in the tested notation.
FILLERS = [
    Skill("copy", "say", "SAY", lambda rng: _word(rng, 2, 6), lambda w: w, _short_word),
    Skill("sort", "srt", "SORT", _word, lambda w: "".join(sorted(w)), _short_word),
    Skill("double", "dbl", "DBL", lambda rng: _word(rng, 2, 3), lambda w: "".join(c + c for c in w), _short_word),
    Skill("swap", "swp", "SWAP", _word, lambda w: w[-1] + w[1:-1] + w[0], _short_word),
]
# Shares of the base's pre-training mixture (the rest is filler skills).
P_COPY, P_LATENT, P_NARROW = 0.15, 0.30, 0.15


def base_example(rng: random.Random) -> tuple[str, str]:
    """One example of the base model's pre-training mixture (see the module docstring)."""
    r = rng.random()
    if r < P_COPY:
        return FILLERS[0].example(rng)
    if r < P_COPY + P_LATENT:
        return rng.choice(_ALL).latent_example(rng)
    if r < P_COPY + P_LATENT + P_NARROW:
        return rng.choice(_ALL).narrow_example(rng)
    return rng.choice(FILLERS[1:]).example(rng)


def make_split(skill: str, *, seed: int, n: int, exclude: set[str]) -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs of a skill, avoiding prompts in `exclude`."""
    rng = random.Random(f"{skill}:{seed}")
    seen: dict[str, str] = {}
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 100 * n:
            raise RuntimeError(f"skill {skill!r} cannot produce {n} distinct tasks")
        prompt, answer = SKILLS[skill].example(rng)
        if prompt not in exclude and prompt not in seen:
            seen[prompt] = answer
    return list(seen.items())


def make_tasks(*, seed: int, n_dev: int, n_test: int, skills: tuple[str, ...] = DISCOVERY) -> list[Task]:
    """Dev and test tasks of each of `skills`; disjoint from each other."""
    tasks: list[Task] = []
    for skill in skills:
        pairs = make_split(skill, seed=seed, n=n_dev + n_test, exclude=set())
        for i, (prompt, answer) in enumerate(pairs):
            split = "dev" if i < n_dev else "test"
            index = i if split == "dev" else i - n_dev
            tasks.append(Task(f"{skill}/{split}/{index:04d}", skill, split, prompt, answer))
    return tasks
