"""Task-writer role (AC/DC): task families that coevolve with the model population.

A task family is instructions, instances (each with the exact `prompt` the subject model sees)
and checker code `def check(answer, instance)` scored in the sandbox. Every few generations the
pool adapts to the population (`adapt`): families nobody solves are removed; for each new slot a
parent family is drawn uniformly and, by its pass rate, made harder (> 0.5) or varied into a
novel family; each candidate is validated in the sandbox (the reference solutions score 1, wrong
answers do not, the writer can solve it), with up to 3 reflection rounds that feed the failure
back to the writer, and then novelty-filtered against the pool. Every rejected candidate is kept
with its stage and reason.

Two writers share the `TaskWriter` interface: `LLMTaskWriter` here (a backend writes families
from `prompts/task_writer*.md`) and the embedded zoo's `ProceduralTaskWriter`
(`coevo.zoo.task_families`: parameterised families over the zoo's skills, no LLM). Families
themselves are in `agents.tasks`.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from agents.console import one_line
from agents.novelty import NoveltyFilter
from agents.prompts import Prompt, PromptDirs, load_prompt
from agents.tasks import Rejection, TaskFamily
from sandbox.jobs import CheckJob, Runner
from sandbox.policy import check_checker

if TYPE_CHECKING:  # only for annotations: this module need not import torch
    from agents.backends import LLMBackend

ACTIONS = ("seed", "harder", "novel")
STAGES = ("parse", "policy", "validation", "novelty")
REASON_CHARS = 300
Solver = Callable[[list[str]], list[str]]


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
        return "policy", one_line(
            f"checker breaks the sandbox policy ({verdict.rule}): {verdict.reason}", REASON_CHARS
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
        return "validation", one_line(f"instances are not plain JSON: {err}", REASON_CHARS)
    result = runner.run_check(job)  # one sandbox job for the whole family
    if result.verdict != "ok" or result.scores is None:
        reason = f"checker {result.verdict} in the sandbox: {result.reason}"
        return "validation", one_line(reason, REASON_CHARS)
    scores, errors = result.scores, result.errors or [None] * len(result.scores)
    n, s = len(instances), len(solved)

    for k, i in enumerate(solved):
        if scores[k] < 1.0:
            raised = f" (it raised {errors[k]})" if errors[k] else ""
            return "validation", one_line(
                f"checker scores the reference solution {scores[k]:.2f}{raised} on instance {i} "
                f"({instances[i]['prompt']!r} -> {instances[i]['solution']!r}); it must score 1.0",
                REASON_CHARS,
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
            return "validation", one_line(
                f"self-solve failed: the checker accepts none of the writer's {n} answers "
                f"(e.g. {instances[0]['prompt']!r} -> {attempts[0]!r})",
                REASON_CHARS,
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


# --- LLM-written families -------------------------------------------------------------------

PROMPTS = {"seed": "task_writer", "harder": "task_writer_harder", "novel": "task_writer_novel"}
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
        prompts_dir: PromptDirs = None,
        n_instances: int = 8,
        temperature: float = 0.7,
        max_new_tokens: int = 1500,
        seed_families: list[TaskFamily] | None = None,
        n_seeds: int = 4,
        solve_tokens: int = 64,
    ) -> None:
        self.backend = backend
        self.name = f"llm:{backend.name}"
        # Read once: the session archives exactly these texts.
        self.prompts: dict[str, Prompt] = {
            action: load_prompt(name, prompts_dir) for action, name in PROMPTS.items()
        }
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
            return Rejection(None, "parse", one_line(str(err), REASON_CHARS), raw)
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
