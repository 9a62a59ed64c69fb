"""Judging: checkers in the real process sandbox, answer extraction, LLM judges against a real
local OpenAI-compatible HTTP server with scripted replies, and the gibberish filters."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from openai_stub import completions_server

from agents.answer_text import extract_answer
from agents.backends import OpenAIBackend
from agents.judge import (
    UNPARSABLE_REPLIES,
    GibberishFilter,
    GibberishVerdict,
    HeuristicGibberishFilter,
    LLMGibberishFilter,
    LLMJudge,
    parse_verdict,
    pick_best_of_n,
    score_with_checker,
)
from agents.prompts import DEFAULT_PROMPTS_DIR, list_prompts, load_prompt
from sandbox.jobs import CheckJob, CheckResult, SandboxLimits
from sandbox.process_runner import ProcessRunner

# --- checkers in the process sandbox -----------------------------------------------------------

NUMBER_CHECKER = '''"""1 when the last number in the answer is the target; half a point when off by one."""
import re


def check(answer, instance):
    found = re.findall(r"-?[0-9]+", answer)
    if not found:
        return 0.0
    gap = abs(int(found[-1]) - instance["target"])
    return 1.0 if gap == 0 else (0.5 if gap == 1 else 0.0)
'''

# Crashes on answers that are not integers: a crash scores that case 0, the others still count.
RAISING_CHECKER = """def check(answer, instance):
    return int(answer.strip()) == instance["target"]
"""

LOOPING_CHECKER = """def check(answer, instance):
    n = 0
    while True:
        n += 1
"""

IMPORT_OS_CHECKER = """import os


def check(answer, instance):
    return os.path.exists(answer)
"""

OUT_OF_RANGE_CHECKER = """def check(answer, instance):
    return len(answer)
"""


class CountingRunner(ProcessRunner):
    """The process runner, counting the check jobs it starts."""

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        super().__init__(limits)
        self.jobs = 0

    def run_check(self, job: CheckJob) -> CheckResult:
        self.jobs += 1
        return super().run_check(job)


@pytest.fixture(scope="module")
def runner() -> CountingRunner:
    return CountingRunner(SandboxLimits(timeout_s=20.0, memory_mb=1024))


def _cases(answers: list[str], target: int = 42) -> list[dict[str, Any]]:
    return [{"answer": a, "instance": {"target": target}} for a in answers]


def test_checker_scores_answers(runner: CountingRunner) -> None:
    cases = _cases(["The answer is 42.", "41", "no idea", "6 x 7 = 42"])
    assert score_with_checker(runner, NUMBER_CHECKER, cases) == ([1.0, 0.5, 0.0, 1.0], None)


def test_checker_raising_on_some_answers_scores_them_zero(runner: CountingRunner) -> None:
    cases = _cases([" 42\n", "forty-two", "42.0", "7"])
    assert score_with_checker(runner, RAISING_CHECKER, cases) == ([1.0, 0.0, 0.0, 0.0], None)


def test_checker_timeout_gives_zeros_and_reason() -> None:
    fast = ProcessRunner(SandboxLimits(timeout_s=1.0, memory_mb=1024))
    start = time.perf_counter()
    scores, reason = score_with_checker(fast, LOOPING_CHECKER, _cases(["1", "2"]))
    assert scores == [0.0, 0.0]
    assert reason is not None and reason.startswith("checker timeout: ") and "\n" not in reason
    assert time.perf_counter() - start < 15.0


def test_checker_rejected_by_policy_never_runs(runner: CountingRunner) -> None:
    scores, reason = score_with_checker(runner, IMPORT_OS_CHECKER, _cases(["/etc/passwd"] * 3))
    assert scores == [0.0, 0.0, 0.0]
    assert reason is not None and reason.startswith("checker rejected_by_policy: import")


def test_checker_invalid_output_gives_zeros_and_reason(runner: CountingRunner) -> None:
    scores, reason = score_with_checker(runner, OUT_OF_RANGE_CHECKER, _cases(["", "long answer"]))
    assert scores == [0.0, 0.0]
    assert reason is not None and reason.startswith("checker output_invalid: case 1")


def test_checker_empty_cases_start_no_job(runner: CountingRunner) -> None:
    before = runner.jobs
    assert score_with_checker(runner, NUMBER_CHECKER, []) == ([], None)
    assert runner.jobs == before


def test_checker_malformed_cases_fail_before_any_job(runner: CountingRunner) -> None:
    before = runner.jobs
    with pytest.raises(ValueError, match="case 0: answer must be a str"):
        score_with_checker(runner, NUMBER_CHECKER, [{"answer": 42, "instance": {"target": 42}}])
    assert runner.jobs == before


# --- answer extraction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Let me add them: 2 + 3 = 5.\nAnswer: 5", "5"),
        ("Answer: 4\nWait, I made a mistake.\nFinal answer: 5\n", "5"),
        ("**Final Answer:** Paris", "Paris"),
        ("**Answer: 12**", "12"),
        ("The sum is\n\\boxed{\\frac{1}{2}} as required.", "\\frac{1}{2}"),
        ("First \\boxed{3}, then corrected: \\boxed{4}", "4"),
        ("Answer:\n\n  HBDC  \n", "HBDC"),
        ("thinking...\n\n  cbah  \n\n", "cbah"),
        ("57", "57"),
        ("", ""),
        ("   \n\n", ""),
        ("My answer is not labelled\nbut this line is last", "but this line is last"),
    ],
)
def test_extract_answer(reply: str, expected: str) -> None:
    assert extract_answer(reply) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("The answer matches the reference.\nVERDICT: CORRECT", 1.0),
        ("It is wrong.\nVERDICT: INCORRECT", 0.0),
        ("verdict: **correct**", 1.0),
        ("VERDICT: CORRECT\nOn reflection the units are wrong.\nVERDICT: INCORRECT", 0.0),
        ("Two of four parts are right.\nSCORE: 0.5", 0.5),
        ("SCORE: 1.7", None),
        ("VERDICT: PARTIALLY CORRECT", None),
        ("I think it is right.", None),
    ],
)
def test_parse_verdict(reply: str, expected: float | None) -> None:
    assert parse_verdict(reply) == expected


# --- a real OpenAI-compatible server with scripted replies -------------------------------------


@dataclass
class Script:
    """Replies by prompt content: the first key found in a prompt picks its reply."""

    replies: dict[str, str]
    default: str = "I cannot tell."
    requests: list[dict[str, Any]] = field(default_factory=list)

    @property
    def prompts(self) -> list[str]:
        return [request["prompt"] for request in self.requests]

    def reply(self, prompt: str) -> str:
        return next((text for key, text in self.replies.items() if key in prompt), self.default)


@pytest.fixture()
def serve() -> Iterator[Any]:
    """`serve(replies)` -> (an OpenAIBackend on a live local server, the server's Script)."""
    with ExitStack() as stack:

        def start(
            replies: dict[str, str], default: str = "I cannot tell."
        ) -> tuple[OpenAIBackend, Script]:
            script = Script(replies, default)
            url = stack.enter_context(completions_server(script.reply, requests=script.requests))
            backend = OpenAIBackend(url, "judge-llm")
            stack.callback(backend.close)
            return backend, script

        yield start


def test_llm_judge_scores_a_batch(serve: Any) -> None:
    backend, script = serve(
        {
            "What is 2 + 3?": "The answer equals the reference.\nVERDICT: CORRECT",
            "Capital of France?": "Lyon is not the capital.\nVERDICT: INCORRECT",
            "three lines about the sea": "Two of three lines rhyme.\nSCORE: 0.67",
        },
        default="The answer looks plausible.",  # no verdict: unparsable
    )
    judge = LLMJudge(backend, max_new_tokens=64, seed=3)
    items = [
        {
            "question": "What is 2 + 3?",
            "answer": "Let me think: 2 + 3 = 5.\nAnswer: 5",
            "reference": "5",
            "instructions": "",
        },
        {"question": "Capital of France?", "answer": "Lyon", "reference": "Paris"},
        {
            "question": "Write three lines about the sea that rhyme.",
            "answer": "Waves...",
            "reference": "",
            "instructions": "One third of a point per rhyming line.",
        },
        {"question": "Name a prime above 100.", "answer": "101", "reference": ""},
    ]
    assert judge.score(items) == [1.0, 0.0, 0.67, 0.0]
    assert judge.unparsable == 1
    assert judge.name == f"llm:{backend.name}"
    assert judge.score([]) == []
    assert len(script.requests) == 4  # one batched generate: one request per prompt

    first = next(p for p in script.prompts if "What is 2 + 3?" in p)
    assert "## Answer to grade\n5\n" in first  # the extracted answer, not the reasoning
    assert "Let me think" not in first
    assert "## Reference answer\n5\n" in first and "## Grading instructions\n(none)" in first
    third = next(p for p in script.prompts if "about the sea" in p)
    assert "One third of a point per rhyming line." in third
    assert "## Reference answer\n(none)" in third
    assert all(r["temperature"] == 0.0 and r["max_tokens"] == 64 for r in script.requests)
    assert all(r["seed"] == 3 for r in script.requests)


def test_llm_judge_rejects_items_without_answer(serve: Any) -> None:
    backend, script = serve({})
    with pytest.raises(ValueError, match="judge item 1 lacks answer"):
        LLMJudge(backend).score([{"question": "q", "answer": "a"}, {"question": "q"}])
    assert script.requests == []


def test_llm_judge_uses_an_edited_prompt(serve: Any, tmp_path: Path) -> None:
    shutil.copy(DEFAULT_PROMPTS_DIR / "judge.md", tmp_path)
    edited = (tmp_path / "judge.md").read_text().replace("You are grading", "Strictly grade")
    (tmp_path / "judge.md").write_text(edited)
    backend, _ = serve({"Strictly grade": "VERDICT: CORRECT"})
    assert LLMJudge(backend, prompts_dir=tmp_path).score([{"question": "q", "answer": "a"}]) == [
        1.0
    ]


def test_pick_best_of_n(serve: Any) -> None:
    backend, script = serve(
        {
            "Which number is prime?": "[1] is prime; [0] is even.\nBEST: 1",
            "out of range": "BEST: 7",
        },
        default="They are all fine.",
    )
    question = "Which number is prime?"
    assert pick_best_of_n(backend, question, ["12", "13", "15"], seed=1) == 1
    prompt = script.prompts[-1]
    assert question in prompt and "[0]\n12\n\n[1]\n13\n\n[2]\n15" in prompt
    assert script.requests[-1]["seed"] == 1

    before = UNPARSABLE_REPLIES["best_of_n"]
    assert pick_best_of_n(backend, "An out of range pick", ["a", "b"]) == 0
    assert pick_best_of_n(backend, "Anything else", ["a", "b"]) == 0
    assert UNPARSABLE_REPLIES["best_of_n"] == before + 2

    calls = len(script.requests)
    assert pick_best_of_n(backend, question, ["only one"]) == 0
    assert len(script.requests) == calls  # no LLM call for a single candidate
    with pytest.raises(ValueError, match="at least one candidate"):
        pick_best_of_n(backend, question, [])


def test_llm_gibberish_filter(serve: Any) -> None:
    backend, script = serve(
        {
            "aaaaaaaa": " The answers are one letter repeated.\nVERDICT: BROKEN",
            "HBDC": " Short but readable answers to each prompt.\nVERDICT: OK",
            "zzz": "VERDICT: OK\nREASON: terse but on topic",
        },
        default="Hard to say.",
    )
    gibberish = LLMGibberishFilter(backend, seed=2)
    assert isinstance(gibberish, GibberishFilter)
    assert gibberish.name == f"llm:{backend.name}"

    broken = gibberish.check(["aaaaaaaa", "aaaaaaaa", ""])
    assert broken == GibberishVerdict(True, "The answers are one letter repeated.")
    prompt = script.prompts[-1]
    assert "### Answer 1\naaaaaaaa" in prompt and "### Answer 3\n(empty)" in prompt

    assert gibberish.check(["HBDC", "cbah", "57"]) == GibberishVerdict(
        False, "Short but readable answers to each prompt."
    )
    assert gibberish.check(["zzz", "yes", "no"]).reason == "terse but on topic"

    kept = gibberish.check(["something", "else", "entirely"])
    assert not kept.broken and kept.reason.startswith("unparsable judge reply, kept")
    assert gibberish.unparsable == 1
    assert all(r["temperature"] == 0.0 and r["seed"] == 2 for r in script.requests)


# --- heuristic gibberish filter ----------------------------------------------------------------


@pytest.mark.parametrize(
    "answers",
    [
        ["HBDC", "cbah", "57"],  # the embedded tiny models' real answer shapes
        ["DCBA", "", "12"],  # one empty answer is not enough
        ["1000000", "abcd", "x y z"],  # one legitimately repetitive answer is not enough
        ["The capital is Paris.", "It is 42.", "def f(x): return x"],
        ["11", "11.5", "1"],
    ],
)
def test_heuristic_keeps_attempts(answers: list[str]) -> None:
    verdict = HeuristicGibberishFilter().check(answers)
    assert not verdict.broken, verdict.reason


@pytest.mark.parametrize(
    ("answers", "why"),
    [
        (["", "  \n", "HBDC"], "answer 1 empty; answer 2 empty"),
        (["!!!!!!!!", "!!!!!!!!!!", "57"], "one character repeated ('!' x8)"),
        (["aaaaaaaa", "bbbbbbbbbb", "cccccccc"], "3 of 3"),
        (["abababab", "xyzxyzxyz", "ok"], "'ab' repeated"),
        (["the the the the the", "of of of of", "57"], "one token repeated ('the' x5)"),
        (["\x00\x01\x02\x03", "\ufffd\ufffd\ufffd", "cbah"], "not printable"),
        (["HBDC", "HBDC", " HBDC\n"], "the same answer 'HBDC' to all 3 prompts"),
        (["", "!!!!!!!!", "aaaaaaaa"], "3 of 3"),
    ],
)
def test_heuristic_flags_broken_models(answers: list[str], why: str) -> None:
    gibberish = HeuristicGibberishFilter()
    assert isinstance(gibberish, GibberishFilter) and gibberish.name == "heuristic"
    verdict = gibberish.check(answers)
    assert verdict.broken
    assert why in verdict.reason and "\n" not in verdict.reason


def test_heuristic_needs_answers() -> None:
    with pytest.raises(ValueError, match="at least one answer"):
        HeuristicGibberishFilter().check([])


# --- prompts -----------------------------------------------------------------------------------


def test_prompts_declare_their_placeholders() -> None:
    assert load_prompt("judge").placeholders == {"question", "instructions", "reference", "answer"}
    assert load_prompt("gibberish").placeholders == {"answers"}
    assert load_prompt("best_of_n").placeholders == {"question", "candidates"}
    names = {p.name for p in list_prompts()}
    assert {"judge", "gibberish", "best_of_n", "generator"} <= names
    for name in ("judge", "gibberish", "best_of_n"):
        text = load_prompt(name).text
        assert not text.lstrip().startswith("<!--")  # the header is documentation only
