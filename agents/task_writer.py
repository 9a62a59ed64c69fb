"""Task-writer role (AC/DC): task families that coevolve with the model population.

A task family is instructions, instances (each with the exact `prompt` the subject model sees)
and checker code `def check(answer, instance)` scored in the sandbox. Every few generations the
pool adapts to the population (`adapt`): families nobody solves are removed; for each new slot a
parent family is drawn uniformly and, by its pass rate, made harder (> 0.5) or varied into a
novel family; each candidate is validated in the sandbox (the reference solutions score 1, wrong
answers do not, the writer can solve it), with up to 3 reflection rounds that feed the failure
back to the writer, and then novelty-filtered against the pool. Every rejected candidate is kept
with its stage and reason.

Two writers share one interface: `ProceduralTaskWriter` (the embedded default, no LLM:
parameterised families over the zoo's skills) and `LLMTaskWriter` (a backend writes families
from `prompts/task_writer*.md`).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agents.novelty import NoveltyFilter
from coevo.prompts import Prompt, load_prompt
from coevo.zoo.skills import LETTERS
from sandbox.checker import CheckJob
from sandbox.policy import check_checker

if TYPE_CHECKING:
    from agents.backends import LLMBackend
    from coevo.tasks import Task
    from sandbox.runner import Runner

ACTIONS = ("seed", "harder", "novel")
STAGES = ("parse", "policy", "validation", "novelty")
Solver = Callable[[list[str]], list[str]]


@dataclass
class TaskFamily:
    """One task family: what it asks, its instances and the code that scores answers."""

    family_id: str
    name: str
    instructions: str
    instances: list[dict[str, Any]]
    checker: str
    params: dict[str, Any]
    parent_id: str | None
    action: str
    generation: int
    origin: str

    def questions(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(task id, prompt shown to the model, instance) for every instance."""
        return [
            (f"{self.family_id}/{i:03d}", str(instance["prompt"]), instance)
            for i, instance in enumerate(self.instances)
        ]

    def signature(self) -> str:
        """What the novelty filter compares: name, instructions and three sample prompts.

        Procedural instructions spell out the parameters and carry examples drawn from them, so
        two families with the same parameters get the same instructions whatever their instances.
        """
        samples = "\n".join(str(instance["prompt"]) for instance in self.instances[:3])
        return f"{self.name}\n{self.instructions}\n{samples}"

    def to_dict(self) -> dict[str, Any]:
        """The family as JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskFamily:
        return cls(**values)


@dataclass(frozen=True)
class Rejection:
    """A candidate family that was not accepted, at which stage and why (one line)."""

    family: TaskFamily | None
    stage: str
    reason: str
    raw: str = ""


class TaskWriter(Protocol):
    """Writes seed families and harder / novel variants of a parent family."""

    name: str

    def seed(self, *, prefix: str, rng: random.Random) -> list[TaskFamily]:
        """The initial families (not yet validated)."""
        ...

    def propose(
        self,
        parent: TaskFamily,
        action: str,
        *,
        family_id: str,
        generation: int,
        rng: random.Random,
        feedback: str = "",
    ) -> TaskFamily | Rejection:
        """A "harder" or "novel" variant of `parent`; `feedback` says why the last try failed."""
        ...


def adaptation_action(pass_rate: float, *, harder_above: float = 0.5) -> str:
    """AC/DC's rule for a parent family: pass rate 0 -> "remove", above `harder_above` ->
    "harder", otherwise -> "novel"."""
    if not 0.0 <= pass_rate <= 1.0:
        raise ValueError(f"pass rate must be in [0, 1], got {pass_rate}")
    if pass_rate == 0.0:
        return "remove"
    return "harder" if pass_rate > harder_above else "novel"


# --- validation -----------------------------------------------------------------------------


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def perturb(solution: str) -> str:
    """A near miss of `solution`: its last character changed (digits +1, letters to the next
    letter of the same case), or an extra character where that is impossible."""
    if not solution:
        return "x"
    last = solution[-1]
    if last.isdigit():
        return solution[:-1] + str((int(last) + 1) % 10)
    if "a" <= last.lower() <= "z":
        base = ord("a") if last.islower() else ord("A")
        return solution[:-1] + chr(base + (ord(last) - base + 1) % 26)
    return solution + "x"


def family_problem(
    family: TaskFamily, runner: Runner, *, solver: Solver | None = None
) -> tuple[str, str] | None:
    """None when the family is valid, else (stage, one-line reason); see `validate`."""
    if not family.instances:
        return "validation", "the family has no instances"
    for i, instance in enumerate(family.instances):
        if not isinstance(instance, dict) or not isinstance(instance.get("prompt"), str):
            return "validation", f"instance {i} has no string 'prompt'"
        if not instance["prompt"].strip():
            return "validation", f"instance {i} has an empty prompt"
        if "solution" in instance and not isinstance(instance["solution"], str):
            return "validation", f"instance {i}: 'solution' must be a string"
    solved = [i for i, instance in enumerate(family.instances) if "solution" in instance]
    if family.origin.startswith("llm:") and len(solved) < len(family.instances):
        missing = next(i for i in range(len(family.instances)) if i not in solved)
        return "validation", f"instance {missing} has no reference 'solution'"
    verdict = check_checker(family.checker)
    if not verdict.ok:
        return "policy", _one_line(
            f"checker breaks the sandbox policy ({verdict.rule}): {verdict.reason}"
        )

    instances = family.instances
    cases = [{"answer": instances[i]["solution"], "instance": instances[i]} for i in solved]
    cases += [{"answer": "", "instance": instance} for instance in instances]
    cases += [
        {"answer": perturb(instances[i]["solution"]), "instance": instances[i]} for i in solved
    ]
    attempts: list[str] = []
    if solver is not None:
        attempts = [str(answer) for answer in solver([str(x["prompt"]) for x in instances])]
        if len(attempts) != len(instances):
            raise ValueError(
                f"solver returned {len(attempts)} answers for {len(instances)} prompts"
            )
        cases += [{"answer": a, "instance": x} for a, x in zip(attempts, instances, strict=True)]
    job = CheckJob(family.checker, cases)
    try:
        job.validate()
    except ValueError as err:
        return "validation", _one_line(f"instances are not plain JSON: {err}")
    result = runner.run_check(job)  # one sandbox job for the whole family
    if result.verdict != "ok" or result.scores is None:
        return "validation", _one_line(f"checker {result.verdict} in the sandbox: {result.reason}")
    scores, errors = result.scores, result.errors or [None] * len(result.scores)
    n, s = len(instances), len(solved)

    for k, i in enumerate(solved):
        if scores[k] < 1.0:
            raised = f" (it raised {errors[k]})" if errors[k] else ""
            return "validation", _one_line(
                f"checker scores the reference solution {scores[k]:.2f}{raised} on instance {i} "
                f"({instances[i]['prompt']!r} -> {instances[i]['solution']!r}); it must score 1.0"
            )
    empty = scores[s : s + n]
    near = scores[s + n : s + n + s]
    for label, wrong in (("the empty answer", empty), ("a perturbed solution", near)):
        accepted = sum(score >= 1.0 for score in wrong)
        if wrong and 2 * accepted >= len(wrong):
            return "validation", (
                f"checker does not discriminate: it gives {label} full marks on "
                f"{accepted}/{len(wrong)} instances"
            )
    if solver is not None:
        own = scores[s + n + s :]
        if not any(score >= 1.0 for score in own):
            return "validation", _one_line(
                f"self-solve failed: the checker accepts none of the writer's {n} answers "
                f"(e.g. {instances[0]['prompt']!r} -> {attempts[0]!r})"
            )
    return None


def validate(family: TaskFamily, runner: Runner, *, solver: Solver | None = None) -> str | None:
    """None when valid, else a one-line reason. Valid: the checker passes the static policy and
    runs in the sandbox (all cases in one `run_check` job); it scores every reference "solution"
    1.0 (LLM families must give one per instance); it gives the empty answer and a perturbed
    solution less than 1.0 on most instances; and, with `solver` (the writer answering the
    prompts itself), it accepts at least one of the solver's answers."""
    problem = family_problem(family, runner, solver=solver)
    return None if problem is None else problem[1]


# --- adaptation -----------------------------------------------------------------------------


@dataclass
class AdaptResult:
    """One adaptation round: families added, (family id, reason) removed, rejected candidates."""

    added: list[TaskFamily]
    removed: list[tuple[str, str]]
    rejected: list[Rejection]


def _accept(
    candidate: TaskFamily,
    pool: Sequence[TaskFamily],
    runner: Runner,
    novelty: NoveltyFilter,
    solver: Solver | None,
) -> Rejection | None:
    problem = family_problem(candidate, runner, solver=solver)
    if problem is None:
        why = novelty.check(candidate, pool)
        problem = None if why is None else ("novelty", why)
    return None if problem is None else Rejection(candidate, *problem)


def adapt(
    writer: TaskWriter,
    active: list[TaskFamily],
    pass_rates: Mapping[str, float],
    *,
    runner: Runner,
    novelty: NoveltyFilter,
    generation: int,
    prefix: str,
    rng: random.Random,
    n_new: int,
    max_active: int,
    reflection_rounds: int = 3,
    harder_above: float = 0.5,
    solver: Solver | None = None,
) -> AdaptResult:
    """One adaptation round of the task pool (deterministic given `rng`).

    Families with pass rate 0 are removed. For each of `n_new` slots a parent is drawn uniformly
    from the remaining families and its pass rate picks the action (a family without a pass rate
    yet gets "novel"; when every family was removed, the removed ones are parents for "novel"
    variants). A slot gets at most `reflection_rounds` attempts: each failed one (unparsable,
    invalid, or not novel next to `active` and the families added so far) is a `Rejection`, and
    its reason is the next attempt's `feedback`. Candidate ids are `{prefix}/g{generation}/c{k}`,
    k counting attempts. If more than `max_active` families are then active, the most-solved
    previously active ones are retired (families added this round are never retired).
    """
    removed = [
        (f.family_id, "pass rate 0.00: nobody solves it")
        for f in active
        if pass_rates.get(f.family_id) == 0.0
    ]
    gone = {family_id for family_id, _ in removed}
    remaining = [f for f in active if f.family_id not in gone]
    parents = remaining or list(active)
    added: list[TaskFamily] = []
    rejected: list[Rejection] = []
    ids = (f"{prefix}/g{generation}/c{k}" for k in itertools.count())
    for _ in range(n_new if parents else 0):
        parent = rng.choice(parents)
        rate = pass_rates.get(parent.family_id)
        if rate is None or not remaining:
            action = "novel"
        else:
            action = adaptation_action(rate, harder_above=harder_above)
        feedback = ""
        for _ in range(max(1, reflection_rounds)):
            outcome = writer.propose(
                parent,
                action,
                family_id=next(ids),
                generation=generation,
                rng=rng,
                feedback=feedback,
            )
            if isinstance(outcome, TaskFamily):
                rejection = _accept(outcome, [*active, *added], runner, novelty, solver)
                if rejection is None:
                    added.append(outcome)
                    break
                outcome = rejection
            rejected.append(outcome)
            feedback = outcome.reason

    excess = len(remaining) + len(added) - max_active
    if excess > 0:
        most_solved = sorted(
            remaining, key=lambda f: (-pass_rates.get(f.family_id, 0.0), f.family_id)
        )
        for family in most_solved[:excess]:
            rate = pass_rates.get(family.family_id, 0.0)
            removed.append(
                (
                    family.family_id,
                    f"retired: pool over max_active {max_active}; pass rate {rate:.2f} "
                    "is among the most solved",
                )
            )
    return AdaptResult(added, removed, rejected)


def seed_pool(
    writer: TaskWriter,
    *,
    runner: Runner,
    novelty: NoveltyFilter,
    prefix: str,
    rng: random.Random,
    solver: Solver | None = None,
) -> AdaptResult:
    """The writer's seed families, validated and novelty-filtered like adapted ones (no
    reflection rounds); an LLM writer's unparsable seed replies are among the rejections.

    Each valid seed is compared with the seeds accepted so far and the valid seeds after it,
    so of two near-duplicate seeds exactly the later one survives.
    """
    seeds = writer.seed(prefix=prefix, rng=rng)
    rejected: list[Rejection] = list(getattr(writer, "seed_rejections", []))
    valid: list[TaskFamily] = []
    for family in seeds:
        problem = family_problem(family, runner, solver=solver)
        if problem is None:
            valid.append(family)
        else:
            rejected.append(Rejection(family, *problem))
    added: list[TaskFamily] = []
    for i, family in enumerate(valid):
        why = novelty.check(family, [*added, *valid[i + 1 :]])
        if why is None:
            added.append(family)
        else:
            rejected.append(Rejection(family, "novelty", why))
    return AdaptResult(added, [], rejected)


# --- procedural families over the zoo's skills ----------------------------------------------


@dataclass(frozen=True)
class WordOp:
    keyword: str  # the zoo's prompt keyword
    verb: str  # for the instructions: "<verb> the word"
    expr: str  # checker expression around "{}" (the word so far)


# The zoo's formats (`coevo.zoo.skills`): the tiny models understand only these.
WORD_OPS = {
    "upper": WordOp("up", "upper-case", "{}.upper()"),
    "reverse": WordOp("rev", "reverse", "{}[::-1]"),
    "copy": WordOp("say", "repeat", "{}"),
}
CHAINS = (["reverse", "upper"], ["upper", "reverse"])
# Ten-letter slices of the alphabet for "novel" variants: shifted away from the zoo's LETTERS.
ALPHABETS = ("abcdefghij", "fghijklmno", "klmnopqrst", "qrstuvwxyz")
SEED_PARAMS: tuple[dict[str, Any], ...] = (
    # The base model's narrow slice of each skill, then the experts' domain (coevo.zoo.skills).
    {"ops": ["upper"], "word_lo": 3, "word_hi": 3, "alphabet": LETTERS},
    {"ops": ["upper"], "word_lo": 3, "word_hi": 5, "alphabet": LETTERS},
    {"ops": ["reverse"], "word_lo": 3, "word_hi": 3, "alphabet": LETTERS},
    {"ops": ["reverse"], "word_lo": 3, "word_hi": 5, "alphabet": LETTERS},
    {"ops": ["add"], "a_lo": 10, "a_hi": 59, "b_lo": 0, "b_hi": 3},
    {"ops": ["add"], "a_lo": 10, "a_hi": 59, "b_lo": 0, "b_hi": 9},
    {"ops": ["copy"], "word_lo": 2, "word_hi": 6, "alphabet": LETTERS},
)
ADD_DEFAULT = SEED_PARAMS[5]
WORDS_DEFAULT = {"word_lo": 3, "word_hi": 5, "alphabet": LETTERS}


def _apply(ops: list[str], word: str) -> str:
    for op in reversed(ops):  # `rev up w=` is rev(up(w)): the op next to the word goes first
        word = word.upper() if op == "upper" else word[::-1] if op == "reverse" else word
    return word


def check_params(params: Mapping[str, Any]) -> None:
    """Raise ValueError (one line) unless `params` describe a procedural family."""
    ops = params.get("ops")
    if ops == ["add"]:
        keys = ("a_lo", "a_hi", "b_lo", "b_hi")
        if not all(isinstance(params.get(k), int) for k in keys):
            raise ValueError(f"add params need integers {', '.join(keys)}, got {dict(params)}")
        if not (0 <= params["a_lo"] <= params["a_hi"] and 0 <= params["b_lo"] <= params["b_hi"]):
            raise ValueError(f"add ranges must be non-negative and lo <= hi, got {dict(params)}")
        return
    if not isinstance(ops, list) or not ops or any(op not in WORD_OPS for op in ops):
        raise ValueError(f"ops must be ['add'] or a list of {', '.join(WORD_OPS)}, got {ops!r}")
    lo, hi, alphabet = params.get("word_lo"), params.get("word_hi"), params.get("alphabet")
    if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
        raise ValueError(f"word lengths need 1 <= word_lo <= word_hi, got {lo!r}, {hi!r}")
    if not (isinstance(alphabet, str) and alphabet.isalpha() and alphabet.islower()):
        raise ValueError(f"alphabet must be lower-case letters, got {alphabet!r}")


def family_name(params: Mapping[str, Any]) -> str:
    if params["ops"] == ["add"]:
        return f"add-a{params['a_lo']}-{params['a_hi']}-b{params['b_lo']}-{params['b_hi']}"
    lo, hi, alphabet = params["word_lo"], params["word_hi"], params["alphabet"]
    name = "-".join(params["ops"]) + (f"-len{lo}" if lo == hi else f"-len{lo}-{hi}")
    return name if alphabet == LETTERS else f"{name}-letters-{alphabet[0]}-{alphabet[-1]}"


def _instance(params: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    ops = params["ops"]
    if ops == ["add"]:
        a = rng.randint(params["a_lo"], params["a_hi"])
        b = rng.randint(params["b_lo"], params["b_hi"])
        return {"prompt": f"add {a} {b}=", "a": a, "b": b, "solution": str(a + b)}
    length = rng.randint(params["word_lo"], params["word_hi"])
    word = "".join(rng.choice(params["alphabet"]) for _ in range(length))
    keywords = " ".join(WORD_OPS[op].keyword for op in ops)
    return {"prompt": f"{keywords} {word}=", "word": word, "solution": _apply(ops, word)}


def make_instances(params: Mapping[str, Any], rng: random.Random, n: int) -> list[dict[str, Any]]:
    """Up to `n` instances with distinct prompts (fewer when the domain is smaller)."""
    found: dict[str, dict[str, Any]] = {}
    for _ in range(50 * n):
        if len(found) == n:
            break
        instance = _instance(params, rng)
        found.setdefault(instance["prompt"], instance)
    return list(found.values())


def _instructions(params: Mapping[str, Any]) -> str:
    # Short on boilerplate, with examples drawn from the parameters alone: equal parameters
    # give equal instructions, and the examples are what sets two families' signatures apart.
    examples = make_instances(params, random.Random(json.dumps(params, sort_keys=True)), 8)
    shown = ", ".join(f"`{x['prompt']}` -> `{x['solution']}`" for x in examples)
    if params["ops"] == ["add"]:
        return (
            f"Add two numbers: `add <a> <b>=` with a in {params['a_lo']}..{params['a_hi']}, "
            f"b in {params['b_lo']}..{params['b_hi']}; answer the sum. Examples: {shown}."
        )
    steps = [WORD_OPS[op].verb for op in reversed(params["ops"])]
    task = f"{steps[0].capitalize()} the word" + "".join(f", then {s} it" for s in steps[1:])
    keywords = " ".join(WORD_OPS[op].keyword for op in params["ops"])
    lo, hi = params["word_lo"], params["word_hi"]
    lengths = f"{lo}" if lo == hi else f"{lo} to {hi}"
    return (
        f"{task}: `{keywords} <word>=`, {lengths} letters from {params['alphabet']}; "
        f"answer the result. Examples: {shown}."
    )


def _checker(params: Mapping[str, Any]) -> str:
    ops = params["ops"]
    if ops == ["add"]:
        doc, expected = "a + b", 'str(int(instance["a"]) + int(instance["b"]))'
    else:
        expected = 'instance["word"]'
        for op in reversed(ops):
            expected = WORD_OPS[op].expr.format(expected)
        doc = " then ".join(WORD_OPS[op].verb for op in reversed(ops)) + " the word"
    return (
        "def check(answer, instance):\n"
        f'    """Exact match with {doc}, computed from the instance."""\n'
        f"    expected = {expected}\n"
        "    return answer.strip() == expected\n"
    )


def procedural_family(
    params: Mapping[str, Any],
    *,
    family_id: str,
    rng: random.Random,
    n_instances: int = 16,
    parent_id: str | None = None,
    action: str = "seed",
    generation: int = 0,
) -> TaskFamily:
    """The procedural family of `params`: instances drawn from `rng`, a checker that computes
    the answer from each instance's fields (`word`, or `a` and `b`)."""
    check_params(params)
    plain: dict[str, Any] = json.loads(json.dumps(params))  # a JSON copy, no caller aliasing
    return TaskFamily(
        family_id=family_id,
        name=family_name(plain),
        instructions=_instructions(plain),
        instances=make_instances(plain, rng, n_instances),
        checker=_checker(plain),
        params=plain,
        parent_id=parent_id,
        action=action,
        generation=generation,
        origin="procedural",
    )


def harder_params(params: Mapping[str, Any], *, max_word: int, max_number: int) -> dict[str, Any]:
    """One step harder, on the next band of the domain: words [lo, hi] -> [hi+1, 2*hi-lo+1]
    (as wide, all longer); for `add`, the smaller operand's range [lo, hi] -> [hi+1, 10*hi+9]
    (one more digit). ValueError past `max_word` / `max_number`."""
    params = dict(params)
    if params["ops"] == ["add"]:
        side = "b" if params["b_hi"] < params["a_hi"] else "a"
        hi = params[f"{side}_hi"]
        if 10 * hi + 9 > max_number:
            raise ValueError(f"already at the largest numbers (max_number {max_number})")
        params[f"{side}_lo"], params[f"{side}_hi"] = hi + 1, 10 * hi + 9
        return params
    lo, hi = params["word_lo"], params["word_hi"]
    if 2 * hi - lo + 1 > max_word:
        raise ValueError(f"already at the longest words (max_word {max_word})")
    params["word_lo"], params["word_hi"] = hi + 1, 2 * hi - lo + 1
    return params


def novel_params(params: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    """A different family: another op, a composition of ops, or another alphabet (the kind is
    drawn uniformly among those that apply, then the variant uniformly within it)."""
    ops = list(params["ops"])
    if ops == ["add"]:
        options = {
            "op": [{"ops": [op], **WORDS_DEFAULT} for op in WORD_OPS],
            "chain": [{"ops": list(chain), **WORDS_DEFAULT} for chain in CHAINS],
        }
    else:
        words = {k: params[k] for k in ("word_lo", "word_hi", "alphabet")}
        options = {
            "op": [{"ops": [op], **words} for op in WORD_OPS if [op] != ops] + [dict(ADD_DEFAULT)],
            "chain": [
                {"ops": list(chain), **words}
                for chain in CHAINS
                if len(ops) == 1 and (ops[0] in chain or ops == ["copy"])
            ],
            "alphabet": [
                {**params, "ops": ops, "alphabet": alphabet}
                for alphabet in ALPHABETS
                if alphabet != params["alphabet"]
            ],
        }
    kind = rng.choice(sorted(k for k, v in options.items() if v))
    return dict(rng.choice(options[kind]))


class ProceduralTaskWriter:
    """The embedded default writer: parameterised families over the zoo's skills, no LLM.

    Ops `upper`, `reverse`, `copy` (words of `word_lo`..`word_hi` letters from `alphabet`), `add`
    (a in `a_lo`..`a_hi`, b in `b_lo`..`b_hi`) and compositions such as ["reverse", "upper"]
    (prompt `rev up <w>=`, answer reverse(upper(w))), in the zoo's prompt formats.
    """

    name = "procedural"

    def __init__(self, *, instances: int = 16, max_word: int = 16, max_number: int = 10**9) -> None:
        if instances < 1:
            raise ValueError(f"instances must be >= 1, got {instances}")
        self.instances = instances
        self.max_word = max_word
        self.max_number = max_number

    def seed(self, *, prefix: str, rng: random.Random) -> list[TaskFamily]:
        """Each skill on the base's narrow slice and on the experts' domain, plus copying."""
        return [
            procedural_family(
                params,
                family_id=f"{prefix}/seed/{family_name(params)}",
                rng=rng,
                n_instances=self.instances,
            )
            for params in SEED_PARAMS
        ]

    def propose(
        self,
        parent: TaskFamily,
        action: str,
        *,
        family_id: str,
        generation: int,
        rng: random.Random,
        feedback: str = "",
    ) -> TaskFamily | Rejection:
        """A harder or novel variant of a procedural parent (`feedback` is not needed: the
        variants are valid by construction)."""
        if action not in ("harder", "novel"):
            raise ValueError(f"action must be 'harder' or 'novel', got {action!r}")
        try:
            check_params(parent.params)
        except ValueError as err:
            reason = f"procedural writer cannot vary {parent.family_id}: {err}"
            return Rejection(None, "parse", _one_line(reason))
        try:
            if action == "harder":
                params = harder_params(
                    parent.params, max_word=self.max_word, max_number=self.max_number
                )
            else:
                params = novel_params(parent.params, rng)
        except ValueError as err:
            return Rejection(None, "validation", f"{parent.family_id} cannot get harder: {err}")
        return procedural_family(
            params,
            family_id=family_id,
            rng=rng,
            n_instances=self.instances,
            parent_id=parent.family_id,
            action=action,
            generation=generation,
        )


def families_from_tasks(tasks: Sequence[Task], *, prefix: str) -> list[TaskFamily]:
    """One seed family per skill of a user's task set (prompt -> answer, exact match)."""
    by_skill: dict[str, list[Task]] = {}
    for task in tasks:
        by_skill.setdefault(task.skill, []).append(task)
    checker = (
        "def check(answer, instance):\n"
        '    """Exact match with the task set\'s answer."""\n'
        '    return answer.strip() == instance["solution"].strip()\n'
    )
    return [
        TaskFamily(
            family_id=f"{prefix}/seed/{skill}",
            name=skill,
            instructions=f"Tasks of the user's skill '{skill}': answer each prompt exactly.",
            instances=[{"prompt": t.prompt, "solution": t.answer} for t in skill_tasks],
            checker=checker,
            params={"skill": skill},
            parent_id=None,
            action="seed",
            generation=0,
            origin="tasks",
        )
        for skill, skill_tasks in sorted(by_skill.items())
    ]


# --- LLM-written families -------------------------------------------------------------------

PROMPTS = {"seed": "task_writer", "harder": "task_writer_harder", "novel": "task_writer_novel"}
PLACEHOLDERS = {
    "seed": {"n_instances"},
    "harder": {"parent", "feedback", "n_instances"},
    "novel": {"parent", "feedback", "n_instances"},
}
_JSON_BLOCK = re.compile(r"```json[ \t]*\n(.*?)```", re.S)
# The checker may be the last thing the model writes before running out of tokens.
_PYTHON_BLOCK = re.compile(r"```python[ \t]*\n(.*?)(?:```|\Z)", re.S)


def describe_family(family: TaskFamily, n_examples: int = 3) -> str:
    """A family as shown to the writer LLM: name, instructions, sample instances, checker."""
    samples = json.dumps(family.instances[:n_examples], indent=1)
    return (
        f"Name: {family.name}\nInstructions: {family.instructions}\n"
        f"Sample instances:\n```json\n{samples}\n```\n"
        f"Checker:\n```python\n{family.checker.rstrip()}\n```"
    )


def parse_reply(raw: str) -> tuple[str, str, list[dict[str, Any]], str]:
    """(name, instructions, instances, checker) of a writer reply; ValueError (one line) when
    it is not a ```json block with name / instructions / instances then a ```python block."""
    block = _JSON_BLOCK.search(raw)
    if block is None:
        raise ValueError("no ```json block with the family")
    try:
        spec = json.loads(block.group(1))
    except json.JSONDecodeError as err:
        raise ValueError(f"the ```json block is not JSON: {err.msg} (line {err.lineno})") from None
    if not isinstance(spec, dict):
        raise ValueError("the ```json block must be an object with name, instructions, instances")
    name, instructions, instances = (
        spec.get("name"),
        spec.get("instructions"),
        spec.get("instances"),
    )
    if not isinstance(name, str) or not isinstance(instructions, str) or not instructions.strip():
        raise ValueError("the family needs string 'name' and non-empty 'instructions'")
    if not isinstance(instances, list) or not instances:
        raise ValueError("the family needs a non-empty list 'instances'")
    clean: list[dict[str, Any]] = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict) or not isinstance(instance.get("prompt"), str):
            raise ValueError(f"instance {i} must be an object with a string 'prompt'")
        solution = instance.get("solution")
        if isinstance(solution, bool) or not isinstance(solution, str | int | float):
            raise ValueError(f"instance {i} needs a 'solution' (a string)")
        clean.append({**instance, "solution": str(solution)})
    code = _PYTHON_BLOCK.search(raw[: block.start()] + raw[block.end() :])
    if code is None or "def check" not in code.group(1):
        raise ValueError("no ```python block defining def check(answer, instance)")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "task"
    return slug, " ".join(instructions.split()), clean, code.group(1).strip() + "\n"


class LLMTaskWriter:
    """Writes families with an LLM from prompts/task_writer.md (seeds), task_writer_harder.md
    and task_writer_novel.md (variants); the reply is a ```json block {"name", "instructions",
    "instances": [{"prompt", "solution", ...}]} then a ```python block with
    `def check(answer, instance)`. Unparsable replies are `Rejection(stage="parse")`."""

    def __init__(
        self,
        backend: LLMBackend,
        *,
        prompts_dir: Path | None = None,
        n_instances: int = 8,
        temperature: float = 0.7,
        max_new_tokens: int = 1500,
        seed_families: list[TaskFamily] | None = None,
        n_seeds: int = 4,
        solve_tokens: int = 64,
    ) -> None:
        self.backend = backend
        self.name = f"llm:{backend.name}"
        self.prompts: dict[str, Prompt] = {}
        for action, prompt_name in PROMPTS.items():
            prompt = load_prompt(prompt_name, prompts_dir)
            missing = PLACEHOLDERS[action] - prompt.placeholders
            if missing:
                raise ValueError(f"prompt {prompt.path} lacks ${', $'.join(sorted(missing))}")
            self.prompts[action] = prompt
        self.n_instances = n_instances
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.seed_families = seed_families
        self.n_seeds = n_seeds
        self.solve_tokens = solve_tokens
        self.seed_rejections: list[Rejection] = []

    def _family(self, raw: str, action: str, **fields: Any) -> TaskFamily | Rejection:
        try:
            name, instructions, instances, checker = parse_reply(raw)
        except ValueError as err:
            return Rejection(None, "parse", _one_line(str(err)), raw)
        prompt = self.prompts[action]
        return TaskFamily(
            name=name,
            instructions=instructions,
            instances=instances,
            checker=checker,
            params={"prompt": prompt.name, "prompt_hash": prompt.hash},
            action=action,
            origin=self.name,
            **fields,
        )

    def seed(self, *, prefix: str, rng: random.Random) -> list[TaskFamily]:
        """`seed_families` when given, else `n_seeds` families the LLM writes from the seed
        prompt (unparsable replies go to `seed_rejections`)."""
        self.seed_rejections = []
        if self.seed_families is not None:
            return list(self.seed_families)
        text = self.prompts["seed"].render(n_instances=self.n_instances)
        replies = self.backend.generate(
            [text],
            n=self.n_seeds,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            seed=rng.randrange(2**31),
        )[0]
        families: list[TaskFamily] = []
        for i, raw in enumerate(replies):
            outcome = self._family(
                raw, "seed", family_id=f"{prefix}/seed/c{i}", parent_id=None, generation=0
            )
            if isinstance(outcome, Rejection):
                self.seed_rejections.append(outcome)
            else:
                families.append(outcome)
        return families

    def propose(
        self,
        parent: TaskFamily,
        action: str,
        *,
        family_id: str,
        generation: int,
        rng: random.Random,
        feedback: str = "",
    ) -> TaskFamily | Rejection:
        """Ask the LLM for a harder or novel variant of `parent`; `feedback` (why the previous
        attempt failed) goes into the prompt."""
        if action not in ("harder", "novel"):
            raise ValueError(f"action must be 'harder' or 'novel', got {action!r}")
        text = self.prompts[action].render(
            parent=describe_family(parent),
            feedback=feedback or "(none: this is the first attempt)",
            n_instances=self.n_instances,
        )
        raw = self.backend.generate(
            [text],
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            seed=rng.randrange(2**31),
        )[0][0]
        return self._family(
            raw, action, family_id=family_id, parent_id=parent.family_id, generation=generation
        )

    def solver(self, prompts: list[str]) -> list[str]:
        """The writer LLM answering instance prompts (greedy; first line of each reply)."""
        replies = self.backend.generate(
            list(prompts), temperature=0.0, max_new_tokens=self.solve_tokens, seed=0
        )
        return [(reply[0].strip().splitlines() or [""])[0].strip() for reply in replies]
