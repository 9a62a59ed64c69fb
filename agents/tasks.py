"""Tasks: the task sets a session is scored on, and the task families of the population modes.

- A task set on disk is `<dir>/<skill>/{dev,test}.jsonl`, one {"prompt", "answer"} object a
  line (`load_tasks`, `save_tasks`); each row is a `Task`.
- A task family (AC/DC) is instructions, instances (each with the exact `prompt` the model
  sees) and checker code `def check(answer, instance)` scored in the sandbox; the task writer
  (`agents.task_writer`) writes and evolves them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPLITS = ("dev", "test")


class TaskFileError(ValueError):
    """A tasks dir or file is missing or malformed."""


@dataclass(frozen=True)
class Task:
    task_id: str
    skill: str
    split: str
    prompt: str
    answer: str


def save_tasks(tasks: list[Task], directory: Path) -> None:
    for skill in sorted({t.skill for t in tasks}):
        (directory / skill).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            rows = [asdict(t) for t in tasks if t.skill == skill and t.split == split]
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (directory / skill / f"{split}.jsonl").write_text(text)


def load_tasks(directory: Path) -> list[Task]:
    """All tasks of a tasks dir; every malformed line is reported as file:line: what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TaskFileError(f"tasks dir {directory} does not exist")
    tasks: list[Task] = []
    for skill_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        for split in SPLITS:
            path = skill_dir / f"{split}.jsonl"
            if not path.is_file():
                raise TaskFileError(f"{path} is missing (each skill needs dev.jsonl and test.jsonl)")
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise TaskFileError(f"{path}:{number}: not JSON ({err.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), str):
                    raise TaskFileError(f"{path}:{number}: needs string fields 'prompt' and 'answer'")
                task_id = str(row.get("task_id") or f"{skill_dir.name}/{split}/{number - 1:04d}")
                tasks.append(Task(task_id, skill_dir.name, split, row["prompt"], row["answer"]))
    if not tasks:
        raise TaskFileError(f"tasks dir {directory} has no <skill>/dev.jsonl files")
    ids = [t.task_id for t in tasks]
    if len(ids) != len(set(ids)):
        raise TaskFileError(f"tasks dir {directory} has duplicate task ids")
    return tasks


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


def skill_of(family: TaskFamily) -> str:
    """The skill a family exercises (CycleQD has one grid per skill): its op(s), else its name."""
    op = family.params.get("op")
    if isinstance(op, str):
        return op
    ops = family.params.get("ops")
    if isinstance(ops, list) and ops:
        return "+".join(map(str, ops))
    return family.name


def family_rows(session_id: str, families: Sequence[TaskFamily], generation: int) -> list[dict[str, Any]]:
    """Archive rows (`task_families`) of families added in `generation`."""
    return [
        {"family_id": f.family_id, "session_id": session_id, "generation": generation, "name": f.name,
         "instructions": f.instructions, "checker": f.checker, "params": f.params, "parent_id": f.parent_id,
         "action": f.action, "origin": f.origin, "n_instances": len(f.instances),
         "prompt_hash": f.params.get("prompt_hash") if isinstance(f.params.get("prompt_hash"), str) else None}
        for f in families
    ]


def family_task_rows(families: Sequence[TaskFamily]) -> list[dict[str, Any]]:
    """Archive rows (`tasks`) of every instance of `families`."""
    return [
        {"task_id": task_id, "skill": skill_of(f), "split": "dev", "prompt": prompt,
         "answer": str(instance["solution"]) if "solution" in instance else None, "origin": f.origin,
         "family_id": f.family_id, "instance": instance}
        for f in families for task_id, prompt, instance in f.questions()
    ]


def rejection_rows(session_id: str, rejections: Sequence[Rejection], generation: int) -> list[dict[str, Any]]:
    """Archive rows (`task_rejections`) of candidates rejected in `generation`."""
    rows = []
    for index, r in enumerate(rejections):
        f = r.family
        rows.append({
            "rejection_id": f"{session_id}/rejected/g{generation}/{index:03d}", "session_id": session_id,
            "generation": generation, "parent_id": f.parent_id if f else None, "action": f.action if f else "unknown",
            "stage": r.stage, "reason": r.reason, "name": f.name if f else None,
            "instructions": f.instructions if f else None, "checker": f.checker if f else None,
            "params": f.params if f else None, "raw": r.raw or None,
        })
    return rows


def family_from_row(row: Mapping[str, Any], instances: list[dict[str, Any]]) -> TaskFamily:
    """A family read back from its archive row and its instances (on resume)."""
    return TaskFamily(
        family_id=row["family_id"], name=row["name"], instructions=row["instructions"], instances=instances,
        checker=row["checker"], params=json.loads(row["params"]), parent_id=row["parent_id"], action=row["action"],
        generation=row["generation"], origin=row["origin"],
    )
