"""Task checkers: generated code that scores a model's answer to one task instance.

A task (AC/DC style) has instructions, instances and a checker written by a task-writer LLM.
The checker is a program defining a top-level

    def check(answer, instance):

where `answer` is the model's answer (a `str`) and `instance` the task instance (a dict of JSON
values); it returns a bool or a number in [0, 1] (True counts 1.0, False 0.0). Top-level code is
limited as for merge programs (imports, function definitions, constant assignments, docstrings),
and the static policy is `sandbox.policy.check_checker`.

Checkers run in the same sandbox as merge programs (no weights mounted): the harness calls
`run_check_job(job)` inside the confined process, with

    job = {"kind": "check", "source": str,
           "cases": [{"answer": str, "instance": dict}, ...], "limits": {...}}

and gets `{"verdict", "reason", "scores", "errors"}` back. The program runs under
RestrictedPython with the merge harness's builtins and hooks, but its own import and attribute
guards (the checker allow-list, `CHECKER_ALLOWED_MODULES`) and a write guard without torch.

Verdicts: `ok` (every case scored; a case whose `check` raised scores 0.0 and keeps its
one-line message in `errors`, since a checker crashing on a gibberish answer is normal),
`rejected_by_policy`, `runtime_error` (the top level fails, or defines no callable `check`),
`output_invalid` (a case returned something other than a bool or a number in [0, 1]),
`memory_exceeded`, and `sandbox_error` for a malformed job.
"""

from __future__ import annotations

import collections
import json
import math
import reprlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from RestrictedPython.Guards import (
    full_write_guard,
)

# Attribute access at call time only: the harness may import this module while it is itself
# being imported, and under `python -m sandbox.harness` it is `__main__`, not `sandbox.harness`.
import sandbox.harness as harness
from sandbox.policy import CHECKER_POLICY, ProgramPolicy, check_checker

KIND = "check"
# Per-case error messages are kept shorter than reasons: a job may have many cases.
MAX_ERROR_CHARS = 240
DEFAULT_MAX_BYTES = 16_000

# Containers a checker may assign items into (`counts[word] = 1`). RestrictedPython's
# `full_write_guard` lets only exact dicts and lists through; these add no reachable state.
_WRITABLE_TYPES = frozenset(
    {
        dict,
        list,
        collections.Counter,
        collections.OrderedDict,
        collections.defaultdict,
        collections.deque,
    }
)

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60


@dataclass
class CheckJob:
    """A checker and the (answer, instance) cases to score with it."""

    source: str
    cases: list[dict[str, Any]]

    def validate(self) -> None:
        """Raise `ValueError` (one-line message) unless every case is a str answer and a dict
        instance of JSON values that survives a JSON round trip unchanged (no tuples, no
        non-str keys, no NaN / infinity)."""
        if not isinstance(self.source, str):
            raise ValueError(f"source must be a str, got {type(self.source).__name__}")
        if not isinstance(self.cases, list):
            raise ValueError(f"cases must be a list, got {type(self.cases).__name__}")
        for index, case in enumerate(self.cases):
            if not isinstance(case, dict):
                raise ValueError(f"case {index}: must be a dict, got {type(case).__name__}")
            missing = sorted({"answer", "instance"} - case.keys())
            if missing:
                raise ValueError(f"case {index}: missing {', '.join(missing)}")
            answer, instance = case["answer"], case["instance"]
            if not isinstance(answer, str):
                raise ValueError(f"case {index}: answer must be a str, got {type(answer).__name__}")
            if not isinstance(instance, dict):
                raise ValueError(
                    f"case {index}: instance must be a dict, got {type(instance).__name__}"
                )
            try:
                encoded = json.dumps(instance, allow_nan=False)
            except (TypeError, ValueError, RecursionError) as err:
                raise ValueError(
                    f"case {index}: instance is not JSON-serialisable: {_one_line(str(err))}"
                ) from None
            if json.loads(encoded) != instance:
                raise ValueError(
                    f"case {index}: instance changes in a JSON round trip "
                    "(tuples, non-str keys?); use plain JSON values"
                )

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready values, without `limits` (the runner adds them)."""
        return {
            "kind": KIND,
            "source": self.source,
            "cases": [
                {"answer": case["answer"], "instance": case["instance"]} for case in self.cases
            ],
        }


@dataclass
class CheckResult:
    """What happened to one check job: a verdict from `sandbox.runner.VERDICTS`, why, the
    per-case scores and error messages (both None unless the verdict is `ok`), and the cost."""

    verdict: str
    reason: str
    duration_s: float
    peak_memory_mb: float
    scores: list[float] | None = None
    errors: list[str | None] | None = None
    stdout: str = ""
    stderr: str = ""
    runner: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return asdict(self)


def run_check_job(job: dict[str, Any]) -> dict[str, Any]:
    """Score every case of a check job; runs inside the sandbox process, never raises for the
    checker. Returns `{"verdict", "reason", "scores", "errors"}`."""
    try:
        if job.get("kind", KIND) != KIND:
            raise ValueError(f"kind is {job.get('kind')!r}, not {KIND!r}")
        limits = job.get("limits") or {}
        if not isinstance(limits, dict):
            raise ValueError(f"limits must be a dict, got {type(limits).__name__}")
        if "max_log_bytes" in limits:
            # The harness sets this too, but on its own class when it runs as `__main__`.
            harness.BoundedPrint.budget = int(limits["max_log_bytes"])
        max_bytes = int(job.get("max_bytes") or DEFAULT_MAX_BYTES)
        source, answers, instances = _parse_job(job)
    except (TypeError, ValueError) as err:
        return _result("sandbox_error", f"bad check job: {err}")

    verdict = check_checker(source, max_bytes=max_bytes)
    if not verdict.ok:
        return _result("rejected_by_policy", f"{verdict.rule}: {verdict.reason}")
    try:
        check = load_checker(source)
    except BaseException as err:  # the checker's top level ran and failed, SystemExit included
        return _result(*harness._classify(err))

    scores: list[float] = []
    errors: list[str | None] = []
    for index, (answer, encoded) in enumerate(zip(answers, instances, strict=True)):
        instance = json.loads(encoded)  # a fresh copy: a checker may mutate its instance
        try:
            value = check(answer, instance)
        except BaseException as err:  # all the checker's, SystemExit included
            name, reason = harness._classify(err)
            if name == "memory_exceeded":
                return _result(name, f"in check(case {index}): {reason}")
            scores.append(0.0)
            errors.append(_describe(err, MAX_ERROR_CHARS))
            continue
        score = _score(value)
        if isinstance(score, str):
            return _result("output_invalid", f"case {index}: {score}")
        scores.append(score)
        errors.append(None)
    return {"verdict": "ok", "reason": "ok", "scores": scores, "errors": errors}


def load_checker(source: str) -> Callable[..., Any]:
    """Execute the checker's top level under RestrictedPython and return its `check`."""
    return harness.load_function(source, checker_globals(), "check", "checker")


def checker_globals(policy: ProgramPolicy = CHECKER_POLICY) -> dict[str, Any]:
    """The harness's restricted globals with `policy`'s guards and a torch-free write guard."""
    return harness.restricted_globals(policy, checker_write, "checker")


def checker_write(obj: Any) -> Any:
    """RestrictedPython's `full_write_guard`, letting the collections checkers fill through."""
    if type(obj) in _WRITABLE_TYPES:
        return obj
    return full_write_guard(obj)


def _parse_job(job: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """The job's source, answers (plain `str`) and instances (JSON text, decoded per case)."""
    source, cases = job.get("source"), job.get("cases")
    if not isinstance(source, str):
        raise ValueError(f"source must be a str, got {type(source).__name__}")
    if not isinstance(cases, list):
        raise ValueError(f"cases must be a list, got {type(cases).__name__}")
    answers: list[str] = []
    instances: list[str] = []
    for index, case in enumerate(cases):
        if not isinstance(case, dict):
            raise ValueError(f"case {index} is a {type(case).__name__}, not a dict")
        answer, instance = case.get("answer"), case.get("instance")
        if not isinstance(answer, str):
            raise ValueError(f"case {index}: answer is a {type(answer).__name__}, not a str")
        if not isinstance(instance, dict):
            raise ValueError(f"case {index}: instance is a {type(instance).__name__}, not a dict")
        try:
            instances.append(json.dumps(instance))
        except (TypeError, ValueError, RecursionError) as err:
            raise ValueError(f"case {index}: instance is not JSON: {err}") from None
        answers.append(str.__str__(answer))  # a plain str even for a str subclass
    return source, answers, instances


def _score(value: Any) -> float | str:
    """`value` as a score in [0, 1], or why it is not one."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int):
        if not 0 <= value <= 1:
            return f"check returned {_short_repr(value)}, outside [0, 1]"
        return float(int(value))
    if isinstance(value, float):
        number = float(value)
        if math.isnan(number):
            return "check returned NaN, expected a bool or a number in [0, 1]"
        if not 0.0 <= number <= 1.0:
            return f"check returned {_short_repr(number)}, outside [0, 1]"
        return number + 0.0  # -0.0 -> 0.0
    return (
        f"check returned {type(value).__name__} {_short_repr(value)}, "
        "expected a bool or a number in [0, 1]"
    )


def _short_repr(value: Any) -> str:
    try:
        return _one_line(_REPR.repr(value), 100)
    except Exception:  # e.g. an int too long to print
        return f"<{type(value).__name__}>"


def _describe(err: BaseException, limit: int) -> str:
    try:
        message = str(err)
    except Exception:
        message = "<unprintable message>"
    return _one_line(f"{type(err).__name__}: {message}" if message else type(err).__name__, limit)


def _one_line(text: str, limit: int = harness.MAX_REASON_CHARS) -> str:
    """`text` on one line (all whitespace runs, `\\r` and `\\u2028` too, become one space),
    at most `limit` characters."""
    line = " ".join(text[: limit * 4].split())  # bounded work for an enormous message
    if len(text) > limit * 4 and len(line) <= limit:
        return line[: limit - 15] + "... [truncated]"  # harness._truncate's marker
    return harness._truncate(line, limit)


def _result(verdict: str, reason: str) -> dict[str, Any]:
    return {"verdict": verdict, "reason": _one_line(reason), "scores": None, "errors": None}
