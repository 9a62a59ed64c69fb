"""Tests of task checkers: their static policy, and `run_check_job` (what runs in the sandbox)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from sandbox import harness
from sandbox.checker import MAX_ERROR_CHARS, load_checker, run_check_job
from sandbox.jobs import CheckJob, CheckResult
from sandbox.policy import check_checker, check_program

NUMBER_CHECKER = '''"""Score 1 when the last number in the answer is the instance's target."""
import re

NUMBER = re.compile(r"-?\\d+(?:\\.\\d+)?")


def last_number(text):
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def check(answer, instance):
    value = last_number(answer)
    return value is not None and abs(value - float(instance["target"])) < 1e-6
'''

JSON_CHECKER = """import json


def check(answer, instance):
    start, end = answer.find("{"), answer.rfind("}")
    if start < 0 or end < start:
        return 0.0
    try:
        parsed = json.loads(answer[start : end + 1])
    except ValueError:
        return 0.0
    expected = instance["expected"]
    keys = sorted(expected)
    hits = sum(1 for key in keys if parsed.get(key) == expected[key])
    canonical = json.dumps(parsed, sort_keys=True) == json.dumps(expected, sort_keys=True)
    return 1.0 if canonical else hits / max(len(keys), 1)
"""

NORMALISE_CHECKER = """import string
import unicodedata

TABLE = str.maketrans("", "", string.punctuation)


def normalise(text):
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return " ".join(text.lower().translate(TABLE).split())


def check(answer, instance):
    accepted = [normalise(a) for a in instance["answers"]]
    return normalise(answer) in accepted
"""

DIFFLIB_CHECKER = """import collections
import difflib
import itertools
import math


def check(answer, instance):
    ratio = difflib.SequenceMatcher(None, answer.lower(), instance["reference"].lower()).ratio()
    counts = collections.Counter(answer.split())
    seen = collections.defaultdict(int)
    for word, n in itertools.islice(counts.most_common(), 0, 5):
        seen[word] = n
    penalty = 0.1 if max(seen.values(), default=0) > 3 else 0.0
    return max(0.0, min(1.0, math.floor(ratio * 100) / 100 - penalty))
"""

REALISTIC = [NUMBER_CHECKER, JSON_CHECKER, NORMALISE_CHECKER, DIFFLIB_CHECKER]


def _checker(*body: str, header: str = "") -> str:
    return header + "def check(answer, instance):\n" + "".join(f"    {b}\n" for b in body)


def _job(source: str, cases: list[tuple[Any, Any]], **extra: Any) -> dict[str, Any]:
    job = {
        "kind": "check",
        "source": source,
        "cases": [{"answer": a, "instance": i} for a, i in cases],
        "limits": {},
    }
    job.update(extra)
    return job


# ---------------------------------------------------------------------------- policy


@pytest.mark.parametrize("source", REALISTIC)
def test_policy_accepts_realistic_checkers(source: str) -> None:
    verdict = check_checker(source)
    assert verdict.ok, verdict
    assert verdict.rule is None


def test_contract_parameter_names_are_free_but_shape_is_not() -> None:
    assert check_checker("def check(a, b, /):\n    return True\n").ok
    assert check_checker("def check(response, task):\n    return True\n").ok


CHECKER_REJECTED = [
    ("import", "import os\n" + _checker("return True")),
    ("import", "import sys\n" + _checker("return True")),
    ("import", "import io\n" + _checker("return True")),
    ("import", "import pathlib\n" + _checker("return True")),
    ("import", "import functools\n" + _checker("return True")),
    ("import", "import torch\n" + _checker("return True")),
    ("import", "from subprocess import run\n" + _checker("return True")),
    ("import", "import collections.abc\n" + _checker("return True")),
    ("import", _checker("import socket", "return True")),
    ("import", "from string import Formatter\n" + _checker("return True")),
    ("banned_name", _checker("return open('/etc/passwd').read() == answer")),
    ("banned_name", _checker("return eval(answer)")),
    ("banned_name", _checker("return type(answer) is str")),
    ("dunder", _checker("return ().__class__.__bases__")),
    ("dunder", _checker("return __import__('os').system('true')")),
    ("dunder", _checker("return __builtins__")),
    ("private", "import re\n" + _checker("return re._compiler")),
    ("computed_attr", _checker("return getattr(answer, 'up' + 'per')()")),
    ("computed_attr", _checker("return '{0.x}'.format(instance) == answer")),
    ("computed_attr", "import string\n" + _checker("return string.Formatter()")),
    ("banned_attr", "import json\n" + _checker("return json.load(answer)")),
    ("banned_attr", "import re\n" + _checker("r = re", "return r.compile('a')")),
    ("statement", "class A:\n    pass\n\n" + _checker("return True")),
    ("statement", _checker("global x", "return True")),
    ("statement", _checker("yield True")),
    ("contract", "def score(answer, instance):\n    return True\n"),
    ("contract", "def check(answer):\n    return True\n"),
    ("contract", "def check(answer, instance, strict):\n    return True\n"),
    ("contract", "def check(answer, *, instance):\n    return True\n"),
    ("contract", "def check(*args):\n    return True\n"),
    ("contract", "def check(answer, instance, **kwargs):\n    return True\n"),
    ("contract", _checker("return True") + _checker("return False")),
    ("contract", _checker("return True") + "print('hi')\n"),
    ("contract", "def merge(task_vectors, *, name, base):\n    return base\n"),
    ("restricted_python", _checker("x = 1", "x.y += 1", "return True")),
    ("syntax", _checker("return (")),
    ("size", _checker("return True") + "#" * 20_000),
]


@pytest.mark.parametrize(("rule", "source"), CHECKER_REJECTED)
def test_policy_rejects_with_rule(rule: str, source: str) -> None:
    verdict = check_checker(source)
    assert not verdict.ok
    assert verdict.rule == rule, verdict
    assert verdict.reason and "\n" not in verdict.reason


def test_checker_and_merge_policies_stay_separate() -> None:
    merge = "import torch\n\n\ndef merge(task_vectors, *, name, base):\n    return base\n"
    assert check_program(merge).ok
    assert check_checker(merge).rule == "import"  # torch is not a checker module
    assert check_program(NUMBER_CHECKER).rule == "import"  # re is not a merge module
    assert check_program(_checker("return True")).rule == "contract"
    assert check_program(_checker("return '{0}'.format(answer)")).rule == "computed_attr"
    # json.dumps is fine in a checker; merge programs keep banning `.dumps`.
    assert check_checker("import json\n" + _checker("return json.dumps(instance) == answer")).ok


def test_size_limit_is_configurable() -> None:
    source = _checker("return True")
    assert check_checker(source, max_bytes=len(source)).ok
    assert check_checker(source, max_bytes=len(source) - 1).rule == "size"
    job = _job(source, [("a", {})], max_bytes=len(source) - 1)
    assert run_check_job(job)["reason"].startswith("size: ")


# ---------------------------------------------------------------------------- runtime guards


def test_runtime_guards_block_modules_outside_the_allow_list() -> None:
    with pytest.raises(ImportError, match="not allowed in checkers"):
        load_checker("import os\n" + _checker("return True"))
    with pytest.raises(AttributeError, match="not allowed in checkers"):
        load_checker("from collections import abc\n" + _checker("return True"))
    # `re` imports `enum` and `copyreg`; reaching them is blocked though the policy allows it.
    check = load_checker("import re\n" + _checker("return re.enum"))
    with pytest.raises(AttributeError, match="module 'enum' is not allowed"):
        check("a", {})


def test_runtime_guards_block_formatter_and_module_writes() -> None:
    with pytest.raises(AttributeError, match="not allowed"):
        load_checker("import string\nF = string.Formatter\n" + _checker("return True"))
    check = load_checker("import re\n" + _checker("re.search = None", "return True"))
    with pytest.raises(TypeError):
        check("a", {})


def test_checkers_can_fill_collections() -> None:
    source = "import collections\n" + _checker(
        "counts = collections.Counter()",
        "order = collections.OrderedDict()",
        "words = {}",
        "for word in answer.split():",
        "    counts[word] = counts[word] + 1",
        "    order[word] = len(order)",
        "    words[word] = True",
        "return counts['a'] == 2 and list(order) == ['a', 'b'] and len(words) == 2",
    )
    assert load_checker(source)("a b a", {}) is True


# ---------------------------------------------------------------------------- run_check_job


def test_scores_bool_and_float_returns() -> None:
    result = run_check_job(
        _job(
            NUMBER_CHECKER,
            [("The answer is 1,234.", {"target": 1234}), ("I think 7", {"target": 8})],
        )
    )
    assert result == {"verdict": "ok", "reason": "ok", "scores": [1.0, 0.0], "errors": [None, None]}

    result = run_check_job(
        _job(
            JSON_CHECKER,
            [
                ('Sure: {"a": 1, "b": 2}', {"expected": {"b": 2, "a": 1}}),
                ('{"a": 1, "b": 3}', {"expected": {"a": 1, "b": 2}}),
                ("no json here", {"expected": {"a": 1}}),
            ],
        )
    )
    assert result["verdict"] == "ok", result
    assert result["scores"] == [1.0, 0.5, 0.0]
    assert all(isinstance(s, float) for s in result["scores"])

    result = run_check_job(
        _job(
            NORMALISE_CHECKER,
            [("  Café au LAIT! ", {"answers": ["cafe au lait"]}), ("tea", {"answers": ["cafe"]})],
        )
    )
    assert result["scores"] == [1.0, 0.0], result

    result = run_check_job(
        _job(DIFFLIB_CHECKER, [("the quick fox", {"reference": "The quick brown fox"})])
    )
    assert result["verdict"] == "ok", result
    assert 0.5 < result["scores"][0] < 1.0


def test_int_and_negative_zero_returns_are_floats() -> None:
    source = _checker("return instance['v']")
    result = run_check_job(_job(source, [("", {"v": 0}), ("", {"v": 1}), ("", {"v": -0.0})]))
    assert result["scores"] == [0.0, 1.0, 0.0]
    assert all(type(s) is float for s in result["scores"])
    assert math.copysign(1.0, result["scores"][2]) == 1.0


def test_exception_in_one_case_scores_zero_and_keeps_the_message() -> None:
    source = _checker("return int(answer) == instance['n']")
    result = run_check_job(
        _job(source, [("3", {"n": 3}), ("three", {"n": 3}), ("4", {}), ("3", {"n": 3})])
    )
    assert result["verdict"] == "ok"
    assert result["scores"] == [1.0, 0.0, 0.0, 1.0]
    errors = result["errors"]
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("ValueError: invalid literal for int()")
    assert errors[2] == "KeyError: 'n'"


def test_system_exit_in_check_is_a_case_error() -> None:
    result = run_check_job(_job(_checker("raise SystemExit(3)"), [("a", {})]))
    assert result["verdict"] == "ok"
    assert result["scores"] == [0.0]
    assert result["errors"] == ["SystemExit: 3"]


def test_instances_are_fresh_copies_per_case() -> None:
    source = _checker(
        "seen = 'seen' in instance",
        "instance['seen'] = True",
        "instance['items'].append(answer)",
        "return not seen and len(instance['items']) == 1",
    )
    shared: dict[str, Any] = {"items": []}
    result = run_check_job(_job(source, [("a", shared), ("b", shared), ("c", shared)]))
    assert result["scores"] == [1.0, 1.0, 1.0], result
    assert shared == {"items": []}  # the job itself is untouched too


def test_answers_are_passed_as_plain_str() -> None:
    class Sneaky(str):
        def upper(self) -> str:
            return "HACKED"

    source = _checker("return answer.upper() == 'ABC'")
    result = run_check_job(_job(source, [(Sneaky("abc"), {})]))
    assert result["scores"] == [1.0], result


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        ("'yes'", "str 'yes', expected a bool or a number"),
        ("1.5", "1.5, outside [0, 1]"),
        ("float('nan')", "NaN"),
        ("-0.25", "-0.25, outside [0, 1]"),
        ("2", "2, outside [0, 1]"),
        ("None", "NoneType None"),
        ("[1.0]", "list [1.0]"),
        ("10 ** 5000", "<int>, outside [0, 1]"),
        ("float('inf')", "inf, outside [0, 1]"),
    ],
)
def test_output_invalid_names_the_case(returned: str, expected: str) -> None:
    source = _checker("if answer == 'good':", "    return True", f"return {returned}")
    result = run_check_job(_job(source, [("good", {}), ("bad", {})]))
    assert result["verdict"] == "output_invalid", result
    assert result["reason"].startswith("case 1: check returned")
    assert expected in result["reason"]
    assert result["scores"] is None and result["errors"] is None


def test_top_level_failures_are_runtime_errors() -> None:
    result = run_check_job(_job("X = 1 // 0\n" + _checker("return True"), [("a", {})]))
    assert result["verdict"] == "runtime_error"
    assert result["reason"] == "ZeroDivisionError: integer division or modulo by zero"
    assert result["scores"] is None and result["errors"] is None

    result = run_check_job(_job(_checker("return True") + "check = 3\n", [("a", {})]))
    assert result["verdict"] == "runtime_error"
    assert "does not define a callable 'check'" in result["reason"]


def test_enormous_messages_are_truncated_to_one_line() -> None:
    huge = "'line\\n\\r\\u2028' * 500_000"
    top = f"def boom():\n    raise ValueError({huge})\n\n\nX = boom()\n"
    result = run_check_job(_job(top + _checker("return True"), []))
    assert result["verdict"] == "runtime_error"
    assert len(result["reason"]) <= 500
    assert result["reason"].endswith("[truncated]")
    assert result["reason"] == " ".join(result["reason"].split())  # one line

    source = _checker(f"raise ValueError({huge})")
    result = run_check_job(_job(source, [("a", {})]))
    error = result["errors"][0]
    assert result["verdict"] == "ok"
    assert error.startswith("ValueError: line line")
    assert len(error) <= MAX_ERROR_CHARS and error.endswith("[truncated]")
    assert error == " ".join(error.split())


def test_memory_errors_are_memory_exceeded() -> None:
    result = run_check_job(_job(_checker("raise MemoryError('big')"), [("a", {}), ("b", {})]))
    assert result["verdict"] == "memory_exceeded"
    assert result["reason"] == "in check(case 0): MemoryError: big"
    top = "def boom():\n    raise MemoryError()\n\n\nX = boom()\n"
    result = run_check_job(_job(top + _checker("return 1"), [("a", {})]))
    assert result == {
        "verdict": "memory_exceeded",
        "reason": "MemoryError:",
        "scores": None,
        "errors": None,
    }


def test_policy_is_rechecked_inside_the_sandbox() -> None:
    result = run_check_job(_job("import os\n" + _checker("return True"), [("a", {})]))
    assert result["verdict"] == "rejected_by_policy"
    assert result["reason"].startswith("import: import of 'os' is not allowed")
    assert result["scores"] is None


def test_malformed_jobs_are_sandbox_errors() -> None:
    source = _checker("return True")
    jobs: list[dict[str, Any]] = [
        {"source": source},
        {"source": None, "cases": []},
        _job(source, [(1, {})]),
        _job(source, [("a", [])]),
        _job(source, [("a", {"x": object()})]),
        _job(source, [], kind="merge"),
        _job(source, [], limits={"max_log_bytes": "lots"}),
        _job(source, [], limits=[1]),
    ]
    for job in jobs:
        result = run_check_job(job)
        assert result["verdict"] == "sandbox_error", (job, result)
        assert result["reason"].startswith("bad check job: ")


def test_printing_is_bounded(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr(harness.BoundedPrint, "budget", harness.BoundedPrint.budget)
    monkeypatch.setattr(harness.BoundedPrint, "_written", 0)
    source = _checker("for i in range(2000):", "    print('spam', i, answer)", "return True")
    result = run_check_job(_job(source, [("x" * 100, {})], limits={"max_log_bytes": 300}))
    assert result["verdict"] == "ok"
    assert harness.BoundedPrint.budget == 300
    out = capsys.readouterr().out
    assert 0 < len(out) <= 300
    assert out.startswith("spam 0 ")


# ---------------------------------------------------------------------------- dataclasses


def test_check_job_to_dict_and_validate() -> None:
    job = CheckJob(source=NUMBER_CHECKER, cases=[{"answer": "4", "instance": {"target": 4}}])
    job.validate()
    as_dict = job.to_dict()
    assert as_dict == {
        "kind": "check",
        "source": NUMBER_CHECKER,
        "cases": [{"answer": "4", "instance": {"target": 4}}],
    }
    assert json.loads(json.dumps(as_dict)) == as_dict
    result = run_check_job({**as_dict, "limits": {}})
    assert result["scores"] == [1.0]


@pytest.mark.parametrize(
    ("cases", "message"),
    [
        ([{"answer": 3, "instance": {}}], "case 0: answer must be a str, got int"),
        ([{"answer": "a", "instance": {}}, {"answer": "a", "instance": [1]}], "case 1: instance"),
        ([{"answer": "a"}], "case 0: missing instance"),
        (["a"], "case 0: must be a dict"),
        ([{"answer": "a", "instance": {"x": {1, 2}}}], "not JSON-serialisable"),
        ([{"answer": "a", "instance": {"x": float("nan")}}], "not JSON-serialisable"),
        ([{"answer": "a", "instance": {"x": (1, 2)}}], "JSON round trip"),
        ([{"answer": "a", "instance": {1: "x"}}], "JSON round trip"),
    ],
)
def test_check_job_validate_rejects_bad_cases(cases: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
        CheckJob(source=NUMBER_CHECKER, cases=cases).validate()
    assert "\n" not in str(info.value)


def test_check_result_to_dict() -> None:
    result = CheckResult(
        verdict="ok",
        reason="ok",
        duration_s=0.1,
        peak_memory_mb=12.0,
        scores=[1.0, 0.0],
        errors=[None, "KeyError: 'n'"],
        runner="process",
    )
    assert result.to_dict() == {
        "verdict": "ok",
        "reason": "ok",
        "duration_s": 0.1,
        "peak_memory_mb": 12.0,
        "scores": [1.0, 0.0],
        "errors": [None, "KeyError: 'n'"],
        "stdout": "",
        "stderr": "",
        "runner": "process",
    }
    assert CheckResult("timeout", "too slow", 5.0, 10.0).to_dict()["scores"] is None
