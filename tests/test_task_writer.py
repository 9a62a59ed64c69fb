"""Task writers, validation in the real process sandbox, adaptation and novelty filters.

LLM roles run against a real local OpenAI-compatible HTTP server that answers from a script.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from openai_stub import completions_server

from agents.backends import OpenAIBackend
from agents.novelty import (
    EmbeddingNovelty,
    LexicalNovelty,
    LLMNoveltyJudge,
    make_novelty,
)
from agents.task_writer import LLMTaskWriter, adapt, adaptation_action, seed_pool, validate
from agents.tasks import Rejection, Task, TaskFamily, families_from_tasks, family_format
from coevo.zoo.skills import LETTERS
from coevo.zoo.task_families import ProceduralTaskWriter, procedural_family
from coevo.zoo.tiny import save_tiny_llama
from sandbox.jobs import CheckJob, SandboxLimits
from sandbox.policy import check_checker
from sandbox.process_runner import ProcessRunner

FORMATS = {
    "upper": r"up [a-z]+=",
    "reverse": r"rev [a-z]+=",
    "copy": r"say [a-z]+=",
    "add": r"add \d+ \d+=",
}


@pytest.fixture(scope="module")
def runner() -> ProcessRunner:
    return ProcessRunner(SandboxLimits(timeout_s=30))


@pytest.fixture(scope="module")
def writer() -> ProceduralTaskWriter:
    return ProceduralTaskWriter()


@pytest.fixture(scope="module")
def seeds(writer: ProceduralTaskWriter) -> list[TaskFamily]:
    return writer.seed(prefix="run", rng=random.Random(0))


def by_name(families: list[TaskFamily], name: str) -> TaskFamily:
    return next(f for f in families if f.name == name)


def variant(
    writer: ProceduralTaskWriter, parent: TaskFamily, action: str, seed: int = 0
) -> TaskFamily:
    out = writer.propose(
        parent,
        action,
        family_id=f"v/{parent.name}/{action}{seed}",
        generation=1,
        rng=random.Random(seed),
    )
    assert isinstance(out, TaskFamily), out
    return out


def lengths(family: TaskFamily) -> set[int]:
    return {len(x["word"]) for x in family.instances}


# --- procedural families --------------------------------------------------------------------


def test_seeds_cover_the_zoo_domains(seeds: list[TaskFamily]) -> None:
    assert [f.name for f in seeds] == [
        "upper-len3",
        "upper-len3-5",
        "reverse-len3",
        "reverse-len3-5",
        "add-a10-59-b0-3",
        "add-a10-59-b0-9",
        "copy-len2-6",
    ]
    for family in seeds:
        assert family.family_id == f"run/seed/{family.name}"
        assert (family.action, family.origin, family.parent_id) == ("seed", "procedural", None)
        assert len(family.instances) == 16
        assert len({x["prompt"] for x in family.instances}) == 16
        pattern = FORMATS[family.params["ops"][0]]
        assert all(re.fullmatch(pattern, x["prompt"]) for x in family.instances)
        assert all(set(x.get("word", "")) <= set("abcdefghij") for x in family.instances)
        task_id, prompt, instance = family.questions()[3]
        assert task_id == f"{family.family_id}/003" and prompt == instance["prompt"]
    assert lengths(by_name(seeds, "upper-len3")) == {3}
    assert lengths(by_name(seeds, "reverse-len3-5")) == {3, 4, 5}
    assert lengths(by_name(seeds, "copy-len2-6")) <= {2, 3, 4, 5, 6}
    narrow = by_name(seeds, "add-a10-59-b0-3").instances
    assert all(10 <= x["a"] <= 59 and 0 <= x["b"] <= 3 for x in narrow)
    assert all(x["solution"] == str(x["a"] + x["b"]) for x in narrow)
    assert all(x["solution"] == x["word"][::-1] for x in by_name(seeds, "reverse-len3").instances)


def test_seeds_and_variants_pass_validation_in_the_sandbox(
    seeds: list[TaskFamily], writer: ProceduralTaskWriter, runner: ProcessRunner
) -> None:
    families = list(seeds)
    for parent in seeds:
        families.append(variant(writer, parent, "harder"))
        families += [variant(writer, parent, "novel", seed) for seed in range(3)]
    parents = {f.family_id: f for f in seeds}
    for child in families[len(seeds) :]:
        assert child.params != parents[child.parent_id or ""].params
    # Every kind of novel variant is covered: another op, a composition, another alphabet.
    novel = [(f.params, parents[f.parent_id or ""].params) for f in families if f.action == "novel"]
    assert any(len(p["ops"]) == 1 and p["ops"] != parent["ops"] for p, parent in novel)
    assert any(len(p["ops"]) == 2 for p, _ in novel)
    assert any(p.get("alphabet", LETTERS) != LETTERS for p, _ in novel)
    for family in families:
        assert check_checker(family.checker).ok, family.name
        assert validate(family, runner) is None, family.name
        assert family.parent_id is None or family.generation == 1


def test_harder_variants_are_harder(seeds: list[TaskFamily], writer: ProceduralTaskWriter) -> None:
    for name in ("upper-len3", "reverse-len3-5", "copy-len2-6"):
        parent = by_name(seeds, name)
        child = variant(writer, parent, "harder")
        assert child.action == "harder" and child.parent_id == parent.family_id
        assert min(lengths(child)) > max(lengths(parent))
        assert child.params["word_hi"] - child.params["word_lo"] == (
            parent.params["word_hi"] - parent.params["word_lo"]
        )
    narrow = by_name(seeds, "add-a10-59-b0-3")
    child = variant(writer, narrow, "harder")
    assert (child.params["b_lo"], child.params["b_hi"]) == (4, 39)
    assert min(x["b"] for x in child.instances) > max(x["b"] for x in narrow.instances)
    grandchild = variant(writer, variant(writer, child, "harder"), "harder")
    assert (grandchild.params["a_lo"], grandchild.params["a_hi"]) == (60, 599)  # b outgrew a
    longest = variant(writer, by_name(seeds, "reverse-len3-5"), "harder")
    assert longest.name == "reverse-len6-8"
    capped = ProceduralTaskWriter(max_word=8).propose(
        longest, "harder", family_id="x", generation=2, rng=random.Random(0)
    )
    assert isinstance(capped, Rejection) and capped.stage == "validation"
    assert "longest words (max_word 8)" in capped.reason


def test_checker_computes_the_answer_from_the_instance(runner: ProcessRunner) -> None:
    chain = procedural_family(
        {"ops": ["reverse", "upper"], "word_lo": 3, "word_hi": 3, "alphabet": "abcdefghij"},
        family_id="c",
        rng=random.Random(0),
        n_instances=2,
    )
    assert chain.instances[0]["prompt"].startswith("rev up ")
    add = procedural_family(
        {"ops": ["add"], "a_lo": 10, "a_hi": 59, "b_lo": 0, "b_hi": 9},
        family_id="a",
        rng=random.Random(0),
        n_instances=2,
    )
    # The stored solutions are wrong on purpose: the checker must not read them.
    word = {"prompt": "rev up abc=", "word": "abc", "solution": "nonsense"}
    numbers = {"prompt": "add 37 4=", "a": 37, "b": 4, "solution": "0"}
    rev_up = runner.run_check(
        CheckJob(
            chain.checker,
            [
                {"answer": "CBA", "instance": word},
                {"answer": " CBA\n", "instance": word},
                {"answer": "cba", "instance": word},
                {"answer": "nonsense", "instance": word},
            ],
        )
    )
    plus = runner.run_check(
        CheckJob(
            add.checker,
            [
                {"answer": "41", "instance": numbers},
                {"answer": "42", "instance": numbers},
                {"answer": "0", "instance": numbers},
            ],
        )
    )
    assert rev_up.scores == [1.0, 1.0, 0.0, 0.0]
    assert plus.scores == [1.0, 0.0, 0.0]


def test_procedural_writer_is_deterministic(
    writer: ProceduralTaskWriter, seeds: list[TaskFamily]
) -> None:
    again = writer.seed(prefix="run", rng=random.Random(0))
    assert [f.to_dict() for f in again] == [f.to_dict() for f in seeds]
    other = writer.seed(prefix="run", rng=random.Random(1))
    assert [f.instances for f in other] != [f.instances for f in seeds]
    parent = by_name(seeds, "upper-len3-5")
    assert (
        variant(writer, parent, "novel", 7).to_dict()
        == variant(writer, parent, "novel", 7).to_dict()
    )
    assert TaskFamily.from_dict(json.loads(json.dumps(parent.to_dict()))) == parent


def test_validate_gives_one_line_reasons(seeds: list[TaskFamily], runner: ProcessRunner) -> None:
    good = by_name(seeds, "reverse-len3")

    def checker(body: str) -> TaskFamily:
        return replace(good, checker=f"def check(answer, instance):\n    {body}\n")

    cases = {
        "does not discriminate: it gives the empty answer full marks on 16/16": checker("return 1"),
        "scores the reference solution 0.00": checker('return answer == instance["word"]'),
        "(it raised KeyError": checker('return answer == instance["missing"]'),
        "breaks the sandbox policy (import)": replace(
            good, checker="import os\n\ndef check(answer, instance):\n    return True\n"
        ),
        "runtime_error in the sandbox": replace(
            good, checker="X = 1 // 0\n\ndef check(answer, instance):\n    return True\n"
        ),
        "has no reference 'solution'": replace(
            good, origin="llm:test", instances=[{"prompt": "rev abc=", "word": "abc"}]
        ),
        "has no instances": replace(good, instances=[]),
    }
    for expected, family in cases.items():
        reason = validate(family, runner)
        assert reason is not None and expected in reason, (expected, reason)
        assert "\n" not in reason
    wrong = validate(good, runner, solver=lambda prompts: ["zzz"] * len(prompts))
    assert wrong is not None and wrong.startswith("self-solve failed")

    def one_right(prompts: list[str]) -> list[str]:
        return [good.instances[0]["solution"]] + ["zzz"] * (len(prompts) - 1)

    assert validate(good, runner, solver=one_right) is None


def test_user_tasks_become_seed_families(runner: ProcessRunner) -> None:
    tasks = [
        Task(f"s/dev/{i}", "spell", "dev", f"spell {w}=", w.upper())
        for i, w in enumerate(["cat", "dog", "owl"])
    ]
    (family,) = families_from_tasks(tasks, prefix="user")
    assert family.family_id == "user/seed/spell" and len(family.instances) == 3
    assert validate(family, runner) is None


def test_user_tasks_with_a_numeric_format_get_a_numeric_checker(runner: ProcessRunner) -> None:
    from agents.judge import score_with_checker
    from agents.task_format import TaskFormat

    fmt = TaskFormat(extract="last_number", numeric=True, max_new_tokens=32, stop=("\n\n",))
    tasks = [Task(f"m/dev/{i}", "math", "dev", f"Q: {a} + {a}?\nA:", str(2 * a), fmt) for i, a in enumerate([500, 1500])]
    (family,) = families_from_tasks(tasks, prefix="user")
    assert family_format(family) == fmt
    (plain,) = families_from_tasks([Task("p/dev/0", "plain", "dev", "x=", "y")], prefix="user")
    assert family_format(plain).plain and "format" not in plain.params
    cases = [{"answer": answer, "instance": family.instances[1]} for answer in ("3,000", "3000.0", "$3000", "2999", "three")]
    scores, problem = score_with_checker(runner, family.checker, cases)
    assert problem is None and scores == [1.0, 1.0, 1.0, 0.0, 0.0]


# --- adaptation -----------------------------------------------------------------------------


def test_adaptation_action_thresholds() -> None:
    assert adaptation_action(0.0) == "remove"
    assert adaptation_action(0.01) == "novel"
    assert adaptation_action(0.5) == "novel"
    assert adaptation_action(0.51) == "harder"
    assert adaptation_action(1.0) == "harder"
    assert adaptation_action(0.6, harder_above=0.8) == "novel"
    with pytest.raises(ValueError, match="pass rate must be in"):
        adaptation_action(1.5)


def test_adapt_removes_varies_and_retires(
    seeds: list[TaskFamily], writer: ProceduralTaskWriter, runner: ProcessRunner
) -> None:
    rates = dict(
        zip([f.family_id for f in seeds], [0.0, 0.9, 0.3, 1.0, 0.0, 0.6, 0.2], strict=True)
    )

    def run() -> Any:
        return adapt(
            writer,
            seeds,
            rates,
            runner=runner,
            novelty=LexicalNovelty(),
            generation=5,
            prefix="run",
            rng=random.Random(3),
            n_new=4,
            max_active=6,
        )

    result = run()
    assert result.removed[:2] == [
        ("run/seed/upper-len3", "pass rate 0.00: nobody solves it"),
        ("run/seed/add-a10-59-b0-3", "pass rate 0.00: nobody solves it"),
    ]
    assert len(result.added) == 4
    parents = {f.family_id: f for f in seeds}
    for child in result.added:
        assert child.family_id.startswith("run/g5/c") and child.generation == 5
        assert rates[child.parent_id] > 0.0
        assert child.action == ("harder" if rates[child.parent_id] > 0.5 else "novel")
        assert child.name != parents[child.parent_id].name
    assert {f.action for f in result.added} == {"harder", "novel"}
    # 5 remain + 4 added = 9 > 6: the 3 most solved old families retire.
    retired = result.removed[2:]
    assert [fid for fid, _ in retired] == [
        "run/seed/reverse-len3-5",
        "run/seed/upper-len3-5",
        "run/seed/add-a10-59-b0-9",
    ]
    assert all(reason.startswith("retired: pool over max_active 6") for _, reason in retired)
    for rejection in result.rejected:
        assert rejection.stage in ("parse", "policy", "validation", "novelty") and rejection.reason
    again = run()
    assert [f.to_dict() for f in again.added] == [f.to_dict() for f in result.added]
    assert again.rejected == result.rejected


def test_adapt_records_every_failed_attempt(
    seeds: list[TaskFamily], writer: ProceduralTaskWriter, runner: ProcessRunner
) -> None:
    parent = by_name(seeds, "reverse-len3-5")
    child = variant(writer, parent, "harder")
    # The only parent is solved (-> harder), and its harder child exists already (pass rate 0:
    # removed now, but still counted by the novelty filter), so every attempt repeats it.
    result = adapt(
        writer,
        [parent, child],
        {parent.family_id: 0.9, child.family_id: 0.0},
        runner=runner,
        novelty=LexicalNovelty(),
        generation=2,
        prefix="p",
        rng=random.Random(0),
        n_new=1,
        max_active=10,
        reflection_rounds=3,
    )
    assert result.added == []
    assert result.removed == [(child.family_id, "pass rate 0.00: nobody solves it")]
    assert [r.stage for r in result.rejected] == ["novelty"] * 3
    assert [r.family.family_id for r in result.rejected if r.family] == [
        "p/g2/c0",
        "p/g2/c1",
        "p/g2/c2",
    ]
    assert all(child.family_id in r.reason and "cosine" in r.reason for r in result.rejected)
    # Nothing solvable left: the removed families become parents of novel variants.
    revived = adapt(
        writer,
        [child],
        {child.family_id: 0.0},
        runner=runner,
        novelty=LexicalNovelty(),
        generation=3,
        prefix="p",
        rng=random.Random(0),
        n_new=1,
        max_active=10,
    )
    assert [f.action for f in revived.added] == ["novel"]


# --- novelty --------------------------------------------------------------------------------


def test_lexical_novelty_rejects_repeats_and_accepts_variants(
    seeds: list[TaskFamily], writer: ProceduralTaskWriter, runner: ProcessRunner
) -> None:
    novelty = LexicalNovelty()
    # The same parameters with other instances: a repeat.
    for repeat in writer.seed(prefix="again", rng=random.Random(9)):
        reason = novelty.check(repeat, seeds)
        assert reason is not None and f"too similar to run/seed/{repeat.name} " in reason
    for parent in seeds:
        for child in [variant(writer, parent, "harder"), variant(writer, parent, "novel", 1)]:
            assert novelty.check(child, seeds) is None, (
                child.name,
                novelty.neighbours(child, seeds),
            )
    # Every seed is novel next to the others; a duplicate seed is dropped.
    doubled = ProceduralTaskWriter(instances=4)
    pool = seed_pool(doubled, runner=runner, novelty=novelty, prefix="s", rng=random.Random(0))
    assert len(pool.added) == 7 and pool.rejected == []
    assert make_novelty("lexical", threshold=0.5).threshold == 0.5  # type: ignore[attr-defined]


def test_embedding_novelty_on_a_tiny_model(tmp_path: Path, seeds: list[TaskFamily]) -> None:
    model = save_tiny_llama(tmp_path / "m")
    novelty = make_novelty("embedding", embedding_model=str(model))
    assert isinstance(novelty, EmbeddingNovelty)
    twin = replace(seeds[3], family_id="twin")
    reason = novelty.check(twin, seeds)
    assert reason is not None and "too similar to run/seed/reverse-len3-5 " in reason
    ((closest, sim),) = novelty.neighbours(twin, seeds[3:4])
    assert closest is seeds[3] and sim == pytest.approx(1.0, abs=1e-5)
    strict = EmbeddingNovelty(model, threshold=0.99999)
    assert strict.check(seeds[0], seeds[1:]) is None
    with pytest.raises(ValueError, match="needs embedding_model"):
        make_novelty("embedding")


# --- LLM roles against a real local OpenAI-compatible server ---------------------------------


@dataclass
class Script:
    writer: list[str] = field(default_factory=list)  # replies to task-writer prompts, in order
    judge: list[str] = field(default_factory=list)  # replies to novelty-judge prompts
    answers: dict[str, str] = field(default_factory=dict)  # instance prompt -> solver reply
    prompts: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reply(self, prompt: str) -> str:
        with self.lock:
            self.prompts.append(prompt)
            if prompt.startswith("You design task families"):
                return self.writer.pop(0)
            if prompt.startswith("You curate a pool"):
                return self.judge.pop(0)
            return self.answers.get(prompt, "no idea") + "\nmore text"

    def sent(self, start: str) -> list[str]:
        return [p for p in self.prompts if p.startswith(start)]


@pytest.fixture()
def server() -> Iterator[tuple[OpenAIBackend, Script]]:
    script = Script()
    with completions_server(script.reply) as url:
        backend = OpenAIBackend(url, "writer")
        try:
            yield backend, script
        finally:
            backend.close()


DOUBLE = {
    "name": "Double word",
    "instructions": "Write the word twice. The prompt is `dbl <word>=`.",
    "instances": [
        {"prompt": f"dbl {w}=", "word": w, "solution": w * 2} for w in ["abc", "hij", "bead"]
    ],
}


def family_reply(spec: dict[str, Any], checker: str) -> str:
    return f"Here it is.\n```json\n{json.dumps(spec)}\n```\n\n```python\n{checker}```\n"


GOOD_CHECKER = 'def check(answer, instance):\n    return answer.strip() == instance["word"] * 2\n'


def test_llm_writer_reflects_on_rejections(
    server: tuple[OpenAIBackend, Script], seeds: list[TaskFamily], runner: ProcessRunner
) -> None:
    backend, script = server
    script.writer = replies = [
        "Sorry, I would rather write a poem.",
        family_reply(DOUBLE, "def check(answer, instance):\n    return 1\n"),
        family_reply(DOUBLE, "import os\n\n" + GOOD_CHECKER),
        family_reply(DOUBLE, GOOD_CHECKER),
    ]
    script.answers = {"dbl abc=": "abcabc", "dbl hij=": "hijhi"}
    writer = LLMTaskWriter(backend, n_instances=3)
    parent = by_name(seeds, "reverse-len3-5")
    result = adapt(
        writer,
        [parent],
        {parent.family_id: 0.75},
        runner=runner,
        novelty=LexicalNovelty(),
        generation=4,
        prefix="llm",
        rng=random.Random(0),
        n_new=1,
        max_active=10,
        reflection_rounds=4,
        solver=writer.solver,
    )
    (family,) = result.added
    assert family.name == "double-word" and family.family_id == "llm/g4/c3"
    assert (family.action, family.parent_id, family.generation) == ("harder", parent.family_id, 4)
    assert (
        family.origin == f"llm:{backend.name}" and family.params["prompt"] == "task_writer_harder"
    )
    assert [r.stage for r in result.rejected] == ["parse", "validation", "policy"]
    parse, discriminate, policy = result.rejected
    assert parse.family is None and parse.raw == "Sorry, I would rather write a poem."
    assert replies == []  # every scripted reply was used
    assert "no ```json block" in parse.reason
    assert "does not discriminate" in discriminate.reason
    assert "(import)" in policy.reason and "os" in policy.reason
    asked = script.sent("You design task families")
    assert len(asked) == 4
    assert all("Write a HARDER variant" in p and parent.instructions in p for p in asked)
    assert "(none: this is the first attempt)" in asked[0]
    for prompt, rejection in zip(asked[1:], result.rejected, strict=True):
        assert rejection.reason in prompt  # each reflection round sees the last failure
    assert any(p == "dbl abc=" for p in script.prompts)  # the writer solved its own instances


def test_llm_writer_novel_prompt_and_seeds(
    server: tuple[OpenAIBackend, Script], seeds: list[TaskFamily], runner: ProcessRunner
) -> None:
    backend, script = server
    script.writer = [family_reply(DOUBLE, GOOD_CHECKER)]
    writer = LLMTaskWriter(backend, n_instances=3, n_seeds=2)
    family = writer.propose(seeds[0], "novel", family_id="n/1", generation=1, rng=random.Random(0))
    assert isinstance(family, TaskFamily) and family.action == "novel"
    assert "Write a NOVEL family" in script.prompts[-1]
    assert writer.solver(["dbl abc=", "other"]) == ["no idea", "no idea"]

    script.writer = [family_reply(DOUBLE, GOOD_CHECKER), "```json\n{broken\n```"]
    pool = seed_pool(
        writer, runner=runner, novelty=LexicalNovelty(), prefix="llm", rng=random.Random(0)
    )
    assert [f.family_id for f in pool.added] == ["llm/seed/c0"]
    (rejection,) = pool.rejected
    assert rejection.stage == "parse" and "not JSON" in rejection.reason
    assert "$" not in script.sent("You design task families")[-1]
    user = LLMTaskWriter(backend, seed_families=seeds[:2])
    assert user.seed(prefix="x", rng=random.Random(0)) == seeds[:2]


def test_llm_novelty_judge(
    server: tuple[OpenAIBackend, Script], seeds: list[TaskFamily], writer: ProceduralTaskWriter
) -> None:
    backend, script = server
    judge = make_novelty("lexical", judge_backend=backend)
    assert isinstance(judge, LLMNoveltyJudge)
    twin = replace(seeds[3], family_id="twin")
    script.judge = [
        "NOVEL: no\nREASON: It is the same reversal task.",
        "NOVEL: yes\nREASON: It tests another skill.",
        "I am not sure.",
    ]
    reason = judge.check(twin, seeds)
    assert reason is not None
    assert "too similar to run/seed/reverse-len3-5" in reason
    assert reason.endswith("not interestingly new: It is the same reversal task.")
    sent = script.sent("You curate a pool")[-1]
    assert twin.signature() in sent and "run/seed/reverse-len3-5 (reverse-len3-5)" in sent
    assert judge.check(twin, seeds) is None
    garbled = judge.check(twin, seeds)
    assert garbled is not None and "no 'NOVEL: yes|no' line" in garbled
    # A candidate with no neighbour over the threshold never reaches the judge.
    asked = len(script.prompts)
    assert judge.check(variant(writer, seeds[3], "harder"), seeds) is None
    assert len(script.prompts) == asked
