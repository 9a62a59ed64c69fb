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
from typing import Any

from RestrictedPython.Guards import full_write_guard

from sandbox.jobs import CHECK_KIND, one_line
from sandbox.policy import CHECKER_POLICY, ProgramPolicy, check_checker
from sandbox.restricted import BoundedPrint, classify, load_function, restricted_globals

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


def run_check_job(job: dict[str, Any]) -> dict[str, Any]:
    """Score every case of a check job; runs inside the sandbox process, never raises for the
    checker. Returns `{"verdict", "reason", "scores", "errors"}`."""
    try:
        if job.get("kind", CHECK_KIND) != CHECK_KIND:
            raise ValueError(f"kind is {job.get('kind')!r}, not {CHECK_KIND!r}")
        limits = job.get("limits") or {}
        if not isinstance(limits, dict):
            raise ValueError(f"limits must be a dict, got {type(limits).__name__}")
        if "max_log_bytes" in limits:
            # The harness sets this too; the checker can also run without it (tests, tools).
            BoundedPrint.budget = int(limits["max_log_bytes"])
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
        return _result(*classify(err))

    scores: list[float] = []
    errors: list[str | None] = []
    for index, (answer, encoded) in enumerate(zip(answers, instances, strict=True)):
        instance = json.loads(encoded)  # a fresh copy: a checker may mutate its instance
        try:
            value = check(answer, instance)
        except BaseException as err:  # all the checker's, SystemExit included
            name, reason = classify(err)
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
    return load_function(source, checker_globals(), CHECKER_POLICY.contract.function, "checker")


def checker_globals(policy: ProgramPolicy = CHECKER_POLICY) -> dict[str, Any]:
    """The harness's restricted globals with `policy`'s guards and a torch-free write guard."""
    return restricted_globals(policy, checker_write, "checker")


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
        return one_line(_REPR.repr(value), 100)
    except Exception:  # e.g. an int too long to print
        return f"<{type(value).__name__}>"


def _describe(err: BaseException, limit: int) -> str:
    try:
        message = str(err)
    except Exception:
        message = "<unprintable message>"
    return one_line(f"{type(err).__name__}: {message}" if message else type(err).__name__, limit)


def _result(verdict: str, reason: str) -> dict[str, Any]:
    return {"verdict": verdict, "reason": one_line(reason), "scores": None, "errors": None}
