"""Judge role: how answers are scored, and AC/DC's gibberish filter for broken merged models.

The resident model that produces the answers is `agents.answerer.Answerer`.

- `exact_scores` scores answers against a task set's reference answers (exact match).
- `score_with_checker` scores answers with task-checker code, only ever inside the sandbox;
  `score_answers` scores a population's answers family by family (checkers or an LLM judge).
- `LLMJudge` grades free-form answers with an LLM (`prompts/judge.md`).
- `BestOfNPicker` (`pick_best_of_n` for one call) lets an LLM pick the best of several
  candidate answers (`prompts/best_of_n.md`).
- `GibberishFilter`s decide whether a merged child is broken from a few of its answers:
  `LLMGibberishFilter` is AC/DC's (an LLM reads 3 answers, `prompts/gibberish.md`);
  `HeuristicGibberishFilter` is the embedded default when no LLM judge is configured.

LLM replies are parsed by marker lines (`VERDICT: ...`, `SCORE: ...`, `BEST: ...`); the last
marker in a reply counts. Replies without one are counted as unparsable on the object (or, for
the `pick_best_of_n` function, in `UNPARSABLE_REPLIES`) and resolved the documented way.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agents.answer_text import extract_answer
from agents.console import one_line, say
from agents.prompts import PromptDirs, load_prompt
from agents.task_format import same_answer
from agents.tasks import Task, TaskFamily
from sandbox.jobs import CheckJob, Runner

if TYPE_CHECKING:  # only for annotations: this module need not import torch
    from agents.backends import LLMBackend

log = logging.getLogger("coevo.judging")

# Answers per child the gibberish filters are meant to read (AC/DC reads 3).
GIBBERISH_SAMPLES = 3
# Longest answer / candidate shown to an LLM judge; the rest is cut with a marker.
MAX_SHOWN_CHARS = 2000

# Unparsable replies of `pick_best_of_n` (a function, so it cannot count on itself), by role.
UNPARSABLE_REPLIES: Counter[str] = Counter()
# An active task of a population: (task id, prompt, family, instance).
FamilyTask = tuple[str, str, TaskFamily, dict[str, Any]]


# --------------------------------------------------------------------------- exact match


@dataclass(frozen=True)
class Scored:
    task_id: str
    answer: str
    score: float


def exact_match(answer: str, expected: str) -> float:
    return 1.0 if answer.strip() == expected.strip() else 0.0


def mean_score(scored: Sequence[Scored]) -> float:
    """Percentage of points over the scored answers."""
    return 100.0 * sum(s.score for s in scored) / max(1, len(scored))


def exact_scores(tasks: Sequence[Task], answers: Sequence[str]) -> list[Scored]:
    """Each (extracted) answer scored by exact match against its task's reference answer; as
    numbers when the task set's format says so."""
    return [Scored(t.task_id, a, 1.0 if same_answer(a, t.answer, t.fmt) else 0.0)
            for t, a in zip(tasks, answers, strict=True)]


# --------------------------------------------------------------------------- checkers


def score_with_checker(
    runner: Runner, checker: str, cases: list[dict]
) -> tuple[list[float], str | None]:
    """Scores of (answer, instance) cases from generated checker code, run only in the sandbox.

    Verdict `ok` gives the checker's scores (a case whose `check` raised scores 0). Any other
    verdict gives all zeros and a one-line reason `checker <verdict>: <reason>`; the checker's
    behaviour never raises. Malformed cases (the caller's bug) raise `ValueError`. Empty cases
    give `([], None)` without starting a job.
    """
    if not cases:
        return [], None
    job = CheckJob(checker, cases)
    job.validate()
    result = runner.run_check(job)
    verdict, reason = result.verdict, result.reason
    if verdict == "ok":
        if result.scores is not None and len(result.scores) == len(cases):
            return [float(score) for score in result.scores], None
        got = "no" if result.scores is None else len(result.scores)
        verdict, reason = "sandbox_error", f"verdict ok with {got} scores for {len(cases)} cases"
    return [0.0] * len(cases), one_line(f"checker {verdict}: {reason}")


def score_answers(
    runner: Runner, answers: dict[str, list[str]], tasks: Sequence[FamilyTask], llm_judge: LLMJudge | None = None
) -> list[dict[str, Any]]:
    """Evaluation rows of every model's answers to `tasks`: one sandboxed checker job per
    family over all models' answers, or the LLM judge when one is given."""
    if not answers:
        return []
    rows = []
    if llm_judge is not None:
        for model_id, model_answers in answers.items():
            items = [{"question": prompt, "answer": a, "reference": str(instance.get("solution", "")),
                      "instructions": family.instructions}
                     for (_, prompt, family, instance), a in zip(tasks, model_answers, strict=True)]
            for (task_id, *_), a, s in zip(tasks, model_answers, llm_judge.score(items), strict=True):
                rows.append({"model_id": model_id, "task_id": task_id, "judge": llm_judge.name, "answer": a, "score": s})
        return rows
    by_family: dict[str, list[int]] = {}
    for index, (_, _, family, _) in enumerate(tasks):
        by_family.setdefault(family.family_id, []).append(index)
    model_ids = list(answers)
    for family_id, indices in by_family.items():
        family = tasks[indices[0]][2]
        cases = [{"answer": answers[m][i], "instance": tasks[i][3]} for m in model_ids for i in indices]
        scores, problem = score_with_checker(runner, family.checker, cases)
        if problem:
            say(f"  {family_id}: {problem}")
        position = 0
        for model_id in model_ids:
            for i in indices:
                rows.append({"model_id": model_id, "task_id": tasks[i][0], "judge": "checker",
                             "answer": answers[model_id][i], "score": scores[position]})
                position += 1
    return rows


# --------------------------------------------------------------------------- LLM judge

_VERDICT = re.compile(r"\bVERDICT\s*[:=]\s*[*_]*\s*(INCORRECT|CORRECT)\b", re.I)
_SCORE = re.compile(r"\bSCORE\s*[:=]\s*[*_]*\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)", re.I)


def parse_verdict(reply: str) -> float | None:
    """The score in a judge's reply: the last `VERDICT: CORRECT|INCORRECT` (1 / 0) or
    `SCORE: x` with x in [0, 1]; None when there is none or the score is out of range."""
    markers = [*_VERDICT.finditer(reply), *_SCORE.finditer(reply)]
    if not markers:
        return None
    last = max(markers, key=lambda m: m.start())
    if last.re is _VERDICT:
        return 1.0 if last.group(1).upper() == "CORRECT" else 0.0
    score = float(last.group(1))
    return score if 0.0 <= score <= 1.0 else None


class LLMJudge:
    """LLM-as-judge (`prompts/judge.md`): grades each answer against the question, the
    grading instructions and the reference, greedily. Unparsable replies score 0 and are
    counted in `.unparsable` (over the judge's lifetime)."""

    def __init__(
        self,
        backend: LLMBackend,
        *,
        prompts_dir: PromptDirs = None,
        max_new_tokens: int = 256,
        seed: int = 0,
    ) -> None:
        self.backend = backend
        self.prompt = load_prompt("judge", prompts_dir)
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.name = f"llm:{backend.name}"
        self.unparsable = 0

    def score(self, items: list[dict]) -> list[float]:
        """Scores in [0, 1] of items `{"question", "answer", "reference", "instructions"}`
        (reference and instructions may be "" or absent), from one batched generate call."""
        if not items:
            return []
        prompts = []
        for index, item in enumerate(items):
            missing = sorted({"question", "answer"} - item.keys())
            if missing:
                raise ValueError(f"judge item {index} lacks {', '.join(missing)}")
            prompts.append(
                self.prompt.render(
                    question=item["question"],
                    instructions=item.get("instructions") or "(none)",
                    reference=item.get("reference") or "(none)",
                    answer=_shown(extract_answer(item["answer"])),
                )
            )
        replies = self.backend.generate(
            prompts, n=1, temperature=0.0, max_new_tokens=self.max_new_tokens, seed=self.seed
        )
        scores = []
        for reply in replies:
            score = parse_verdict(reply[0])
            if score is None:
                self.unparsable += 1
                log.warning("judge reply without a verdict, scored 0: %s", one_line(reply[0]))
                score = 0.0
            scores.append(score)
        return scores


_BEST = re.compile(r"\bBEST\s*[:=]\s*[*_]*\s*\[?\s*([0-9]+)", re.I)


class BestOfNPicker:
    """An LLM picks the best of several candidate answers (`prompts/best_of_n.md`, greedy).

    The last `BEST: <index>` of the reply counts. An unparsable or out-of-range reply falls
    back to index 0 (the caller's first candidate, e.g. the greedy answer), is logged and
    counted in `UNPARSABLE_REPLIES["best_of_n"]`. A single candidate needs no LLM call.
    """

    def __init__(
        self,
        backend: LLMBackend,
        *,
        prompts_dir: PromptDirs = None,
        seed: int = 0,
        max_new_tokens: int = 256,
    ) -> None:
        self.backend = backend
        self.prompt = load_prompt("best_of_n", prompts_dir)
        self.seed = seed
        self.max_new_tokens = max_new_tokens

    def __call__(self, question: str, candidates: list[str]) -> int:
        """Index of the candidate the LLM judges best."""
        if not candidates:
            raise ValueError("pick_best_of_n needs at least one candidate")
        if len(candidates) == 1:
            return 0
        shown = "\n\n".join(f"[{i}]\n{_shown(c)}" for i, c in enumerate(candidates))
        prompt = self.prompt.render(question=question, candidates=shown)
        reply = self.backend.generate(
            [prompt], n=1, temperature=0.0, max_new_tokens=self.max_new_tokens, seed=self.seed
        )[0][0]
        picks = _BEST.findall(reply)
        if picks and int(picks[-1]) < len(candidates):
            return int(picks[-1])
        UNPARSABLE_REPLIES["best_of_n"] += 1
        log.warning("best-of-n reply without a valid BEST index, picked 0: %s", one_line(reply))
        return 0


def pick_best_of_n(
    backend: LLMBackend,
    question: str,
    candidates: list[str],
    *,
    prompts_dir: PromptDirs = None,
    seed: int = 0,
    max_new_tokens: int = 256,
) -> int:
    """Index of the candidate answer an LLM judges best, for one question (see `BestOfNPicker`)."""
    picker = BestOfNPicker(backend, prompts_dir=prompts_dir, seed=seed, max_new_tokens=max_new_tokens)
    return picker(question, candidates)


# --------------------------------------------------------------------------- gibberish


@dataclass(frozen=True)
class GibberishVerdict:
    broken: bool
    reason: str


@runtime_checkable
class GibberishFilter(Protocol):
    """Decides from a few answers of a merged child (to different prompts) whether it is broken."""

    name: str

    def check(self, answers: list[str]) -> GibberishVerdict:
        """Whether the model that gave these answers is broken, and why, in one line."""
        ...


# A child is broken when more than this share of its answers is degenerate (2 of 3): one odd
# answer (a legitimately repetitive "1000000") must not discard a model.
MAX_DEGENERATE_SHARE = 0.5
# More than this share of characters not printable (control bytes, U+FFFD from bad decoding).
MAX_NONPRINTABLE_SHARE = 0.5
# Repetition rules only apply from this many non-space characters: "11" or "57" are answers.
MIN_REPEAT_CHARS = 6
# One character making up at least this share of the non-space characters ("!!!!!!!!").
MAX_CHAR_SHARE = 0.8
# One whitespace token making up at least this share of at least MIN_REPEAT_TOKENS tokens
# ("the the the the").
MIN_REPEAT_TOKENS = 4
MAX_TOKEN_SHARE = 0.75
# A unit of at most MAX_REPEAT_UNIT characters repeated at least MIN_UNIT_REPEATS times, the
# last one possibly cut ("abababa").
MAX_REPEAT_UNIT = 4
MIN_UNIT_REPEATS = 3


def degenerate(answer: str) -> str | None:
    """Why one answer is degenerate (empty, non-printable, one repeated character, token or
    short unit), or None when it looks like an attempt."""
    text = answer.strip()
    if not text:
        return "empty"
    bad = sum(1 for ch in text if ch == "\ufffd" or not (ch.isprintable() or ch.isspace()))
    if bad / len(text) > MAX_NONPRINTABLE_SHARE:
        return f"{bad} of {len(text)} characters not printable"
    tokens = text.split()
    if len(tokens) >= MIN_REPEAT_TOKENS:
        token, count = Counter(tokens).most_common(1)[0]
        if count / len(tokens) >= MAX_TOKEN_SHARE:
            return f"one token repeated ({token[:20]!r} x{count})"
    dense = "".join(tokens)
    if len(dense) >= MIN_REPEAT_CHARS:
        char, count = Counter(dense).most_common(1)[0]
        if count / len(dense) >= MAX_CHAR_SHARE:
            return f"one character repeated ({char!r} x{count})"
        for unit in range(2, MAX_REPEAT_UNIT + 1):
            if len(dense) >= unit * MIN_UNIT_REPEATS and all(
                dense[i] == dense[i % unit] for i in range(len(dense))
            ):
                return f"{dense[:unit]!r} repeated"
    return None


class HeuristicGibberishFilter:
    """The embedded default (no LLM judge): a child is broken when more than half of its
    answers (`GIBBERISH_SAMPLES` by default) are degenerate (`degenerate`), or when all of
    them are the same text. The answers must come from prompts with different answers."""

    name = "heuristic"

    def check(self, answers: list[str]) -> GibberishVerdict:
        if not answers:
            raise ValueError("a gibberish check needs at least one answer")
        problems = [(i + 1, degenerate(a)) for i, a in enumerate(answers)]
        bad = [f"answer {i} {why}" for i, why in problems if why is not None]
        if len(bad) / len(answers) > MAX_DEGENERATE_SHARE:
            return GibberishVerdict(
                True, one_line(f"{len(bad)} of {len(answers)}: " + "; ".join(bad))
            )
        normalised = {" ".join(a.split()).casefold() for a in answers}
        if len(answers) > 1 and len(normalised) == 1:
            same = one_line(repr(answers[0].strip()), 60)
            return GibberishVerdict(True, f"the same answer {same} to all {len(answers)} prompts")
        return GibberishVerdict(
            False, f"{len(answers) - len(bad)} of {len(answers)} answers look like attempts"
        )


_HEALTH = re.compile(r"\bVERDICT\s*[:=]\s*[*_]*\s*(OK|BROKEN)\b", re.I)
_REASON = re.compile(r"\bREASON\s*:\s*(.+)", re.I)


class LLMGibberishFilter:
    """AC/DC's gibberish filter: an LLM reads a child's answers (`prompts/gibberish.md`) and
    replies `VERDICT: OK` or `VERDICT: BROKEN` with a reason. An unparsable reply keeps the
    model (never discard a model on a parse failure) and is counted in `.unparsable`."""

    def __init__(
        self,
        backend: LLMBackend,
        *,
        prompts_dir: PromptDirs = None,
        max_new_tokens: int = 128,
        seed: int = 0,
    ) -> None:
        self.backend = backend
        self.prompt = load_prompt("gibberish", prompts_dir)
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.name = f"llm:{backend.name}"
        self.unparsable = 0

    def check(self, answers: list[str]) -> GibberishVerdict:
        if not answers:
            raise ValueError("a gibberish check needs at least one answer")
        shown = "\n\n".join(
            f"### Answer {i}\n{_shown(a) if a.strip() else '(empty)'}"
            for i, a in enumerate(answers, 1)
        )
        prompt = self.prompt.render(answers=shown)
        reply = self.backend.generate(
            [prompt], n=1, temperature=0.0, max_new_tokens=self.max_new_tokens, seed=self.seed
        )[0][0]
        verdicts = list(_HEALTH.finditer(reply))
        if not verdicts:
            self.unparsable += 1
            log.warning("gibberish reply without a verdict, model kept: %s", one_line(reply))
            return GibberishVerdict(False, one_line(f"unparsable judge reply, kept: {reply!r}"))
        last = verdicts[-1]
        labelled = _REASON.findall(reply)
        # The prompt ends at "REASON:", so the reason is usually the text before the verdict.
        reason = labelled[-1] if labelled else reply[: last.start()]
        return GibberishVerdict(
            last.group(1).upper() == "BROKEN", one_line(reason) or last.group(0)
        )


# --------------------------------------------------------------------------- helpers


def _shown(text: str) -> str:
    """`text` as shown to an LLM judge: at most MAX_SHOWN_CHARS characters."""
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return text[:MAX_SHOWN_CHARS] + " ... [truncated]"


def make_gibberish_filter(kind: str, backend: LLMBackend | None = None, *, prompts_dir: PromptDirs = None) -> GibberishFilter | None:
    """The filter for `population.gibberish`: "heuristic", "llm" (needs the judge LLM) or "off"."""
    if kind == "off":
        return None
    if kind == "llm":
        if backend is None:
            raise ValueError("gibberish = 'llm' needs the judge LLM (judge.llm)")
        return LLMGibberishFilter(backend, prompts_dir=prompts_dir)
    return HeuristicGibberishFilter()


def gibberish_sample(tasks: Sequence[FamilyTask], answers: list[str]) -> list[str]:
    """Answers to GIBBERISH_SAMPLES tasks of different families (AC/DC reads 3)."""
    picked, seen = [], set()
    for (_, _, family, _), answer in zip(tasks, answers, strict=True):
        if family.family_id not in seen:
            seen.add(family.family_id)
            picked.append(answer)
        if len(picked) == GIBBERISH_SAMPLES:
            break
    return picked
