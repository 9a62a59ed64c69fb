"""Task sets on disk: `<dir>/<skill>/{dev,test}.jsonl`, one {"prompt", "answer"} object a line."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

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
