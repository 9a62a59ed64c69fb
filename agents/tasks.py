"""Tasks: the task sets a session is scored on, and the task families of the population modes.

- A task set on disk is `<dir>/<skill>/{dev,test}.jsonl` (or `.parquet`), one {"prompt",
  "answer"} object a line (`load_tasks`, `save_tasks`); each row is a `Task`. An optional
  `<dir>/format.toml` names other fields, declares the prompt format (k-shot exemplars from
  `<skill>/shots.jsonl`, chat template, stops, answer extraction: `agents.task_format`) or
  reads the rows from a Hugging Face `datasets` dir or the hub (`[source]`).
- A task family (AC/DC) is instructions, instances (each with the exact `prompt` the model
  sees) and checker code `def check(answer, instance)` scored in the sandbox; the task writer
  (`agents.task_writer`) writes and evolves them.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agents.console import one_line, say
from agents.task_format import PLAIN, TaskFormat, extract, render_prompt

SPLITS = ("dev", "test")
SHOTS = "shots"  # the exemplar pool of a k-shot format: <skill>/shots.jsonl
FORMAT_FILE = "format.toml"
_SLICE = re.compile(r"^(\w[\w.-]*)(?:\[(-?\d*):(-?\d*)\])?$")


class TaskFileError(ValueError):
    """A tasks dir or file is missing or malformed."""


@dataclass(frozen=True)
class Task:
    task_id: str
    skill: str
    split: str
    prompt: str  # what the model sees: rendered by the task set's format (k-shot, template)
    answer: str  # the reference answer, as the format reads it
    fmt: TaskFormat = PLAIN  # how the model's reply is read and compared (`agents.task_format`)


class SourceSpec(BaseModel):
    """Where a task set's rows come from, when not from <skill>/<split>.jsonl files (the
    `[source]` table of format.toml): a Hugging Face `datasets` dir or hub dataset."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a dir saved with datasets' save_to_disk, or a hub id (openai/gsm8k)")
    config: str | None = Field(None, description="the hub dataset's config name (gsm8k: main)")
    skill: str = Field("task", description="the skill name its tasks get")
    splits: dict[str, str] = Field(description="dev, test (and shots for k-shot) from the dataset's splits, e.g. train[:100]")

    @model_validator(mode="after")
    def _splits(self) -> SourceSpec:
        for name, spec in self.splits.items():
            if name not in (*SPLITS, SHOTS):
                raise ValueError(f"splits.{name}: only dev, test and shots are read")
            if not _SLICE.match(spec):
                raise ValueError(f"splits.{name} = {spec!r}: write a split name with an optional slice, e.g. train[:100]")
        if "dev" not in self.splits:
            raise ValueError("splits needs dev")
        return self


class TaskSetSpec(BaseModel):
    """format.toml: how a task set's rows are read and shown."""

    model_config = ConfigDict(extra="forbid")

    prompt_field: str = "prompt"
    answer_field: str = "answer"
    format: TaskFormat = TaskFormat()
    source: SourceSpec | None = None


def save_tasks(tasks: list[Task], directory: Path) -> None:
    for skill in sorted({t.skill for t in tasks}):
        (directory / skill).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            rows = [{"task_id": t.task_id, "skill": t.skill, "split": t.split, "prompt": t.prompt, "answer": t.answer}
                    for t in tasks if t.skill == skill and t.split == split]
            text = "".join(json.dumps(r) + "\n" for r in rows)
            (directory / skill / f"{split}.jsonl").write_text(text)


def read_spec(directory: Path) -> TaskSetSpec:
    """The task set's format.toml (the plain format when there is none)."""
    path = Path(directory) / FORMAT_FILE
    if not path.is_file():
        return TaskSetSpec()
    try:
        return TaskSetSpec.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise TaskFileError(f"{path}: not valid TOML: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TaskFileError(f"{path}: {where}: {first['msg']}") from None


def _jsonl_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskFileError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise TaskFileError(f"{path}:{number}: not a JSON object")
        rows.append((f"{path}:{number}", row))
    return rows


def _parquet_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq  # a dependency of datasets (via trl); only parquet task sets need it

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise TaskFileError(f"{path}: not a readable Parquet file ({one_line(str(err))})") from None
    return [(f"{path}: row {number}", row) for number, row in enumerate(table.to_pylist(), 1)]


def _file_rows(skill_dir: Path, split: str) -> list[tuple[str, dict[str, Any]]] | None:
    for suffix, reader in ((".jsonl", _jsonl_rows), (".parquet", _parquet_rows)):
        path = skill_dir / f"{split}{suffix}"
        if path.is_file():
            return reader(path)
    return None


def _dataset_rows(directory: Path, source: SourceSpec) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Rows of each split named in `source.splits`, from a datasets dir or the hub."""
    import datasets  # a dependency of trl; only task sets with a [source] need it
    import huggingface_hub

    local = (directory / source.path) if not Path(source.path).is_absolute() else Path(source.path)
    datasets.utils.logging.set_verbosity_error()  # the one-line error below says what went wrong
    huggingface_hub.utils.logging.set_verbosity_error()
    try:
        if local.exists():
            loaded = datasets.load_from_disk(str(local))
        else:
            say(f"[tasks] reading {source.path} from the Hugging Face hub (or its local cache)")
            loaded = datasets.load_dataset(source.path, source.config)
    except Exception as err:  # missing dir, no network, unknown dataset: one line
        raise TaskFileError(f"{directory / FORMAT_FILE}: source {source.path!r} cannot be loaded ({one_line(str(err))})") from None
    out = {}
    for name, spec in source.splits.items():
        match = _SLICE.match(spec)
        assert match is not None  # validated
        split_name, start, stop = match.group(1), match.group(2), match.group(3)
        if isinstance(loaded, datasets.Dataset):
            dataset = loaded
        elif split_name in loaded:
            dataset = loaded[split_name]
        else:
            raise TaskFileError(f"{directory / FORMAT_FILE}: splits.{name}: {source.path} has no split {split_name!r} (it has {', '.join(loaded)})")
        indices = range(len(dataset))[slice(int(start) if start else None, int(stop) if stop else None)]
        rows = dataset.select(indices).to_list()
        out[name] = [(f"{source.path} {split_name} row {i}", row) for i, row in zip(indices, rows, strict=True)]
    return out


def _pairs(rows: list[tuple[str, dict[str, Any]]], spec: TaskSetSpec, *, reference: bool) -> list[tuple[str, str]]:
    """(prompt, answer) of each row; the answer read as the reference when `reference`."""
    pairs = []
    for where, row in rows:
        for field in (spec.prompt_field, spec.answer_field):
            if not isinstance(row.get(field), (str, int, float)) or isinstance(row.get(field), bool):
                raise TaskFileError(f"{where}: needs a string field {field!r}")
        answer = str(row[spec.answer_field])
        if reference:
            answer = extract(answer, spec.format.reference, spec.format.pattern)
            if not answer:
                raise TaskFileError(f"{where}: field {spec.answer_field!r} has no answer the {spec.format.reference!r} way")
        pairs.append((str(row[spec.prompt_field]), answer))
    return pairs


def load_tasks(directory: Path) -> list[Task]:
    """All tasks of a tasks dir, rendered by its format.toml when it has one; every malformed
    file, row or field is reported as where: what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TaskFileError(f"tasks dir {directory} does not exist")
    spec = read_spec(directory)
    fmt = spec.format
    by_skill: dict[str, dict[str, list[tuple[str, dict[str, Any]]]]] = {}
    if spec.source is not None:
        by_skill[spec.source.skill] = _dataset_rows(directory, spec.source)
    else:
        for skill_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
            splits: dict[str, list[tuple[str, dict[str, Any]]]] = {}
            for split in (*SPLITS, SHOTS):
                rows = _file_rows(skill_dir, split)
                if rows is None and split != SHOTS:
                    raise TaskFileError(f"{skill_dir / split}.jsonl is missing (each skill needs dev and test, .jsonl or .parquet)")
                if rows is not None:
                    splits[split] = rows
            by_skill[skill_dir.name] = splits
    tasks: list[Task] = []
    for skill, splits in by_skill.items():
        pool = _pairs(splits[SHOTS], spec, reference=False) if SHOTS in splits else []
        if fmt.shots and not pool:
            raise TaskFileError(f"{directory}: {fmt.shots}-shot format but skill {skill!r} has no exemplar pool ({skill}/shots.jsonl or splits.shots)")
        for split in SPLITS:
            rows = splits.get(split, [])
            for number, ((where, row), (question, answer)) in enumerate(zip(rows, _pairs(rows, spec, reference=True), strict=True)):
                task_id = str(row.get("task_id") or f"{skill}/{split}/{number:04d}")
                try:
                    prompt = render_prompt(question, fmt, pool, key=task_id)
                except ValueError as err:
                    raise TaskFileError(f"{where}: {err}") from None
                tasks.append(Task(task_id, skill, split, prompt, answer, fmt))
    if not any(t.split == "dev" for t in tasks):
        raise TaskFileError(f"tasks dir {directory} has no dev tasks (<skill>/dev.jsonl)")
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


_EXACT_CHECKER = (
    "def check(answer, instance):\n"
    '    """Exact match with the task set\'s answer."""\n'
    '    return answer.strip() == instance["solution"].strip()\n'
)
_NUMERIC_CHECKER = (
    "def number(text):\n"
    "    text = text.strip().rstrip('.').replace(',', '').replace('$', '')\n"
    "    try:\n"
    "        return float(text)\n"
    "    except ValueError:\n"
    "        return None\n"
    "\n"
    "\n"
    "def check(answer, instance):\n"
    '    """Numeric match with the task set\'s answer (1,000 = 1000.0), else exact match."""\n'
    '    a, r = number(answer), number(instance["solution"])\n'
    "    if a is not None and r is not None:\n"
    "        return a == r\n"
    '    return answer.strip() == instance["solution"].strip()\n'
)


def families_from_tasks(tasks: Sequence[Task], *, prefix: str) -> list[TaskFamily]:
    """One seed family per skill of a user's task set (prompt -> answer). Its checker is exact
    match (numeric when the task set's format says so); a declared format travels in
    `params["format"]`, so answers are generated and read the task set's way."""
    by_skill: dict[str, list[Task]] = {}
    for task in tasks:
        by_skill.setdefault(task.skill, []).append(task)
    families = []
    for skill, skill_tasks in sorted(by_skill.items()):
        fmt = skill_tasks[0].fmt
        params: dict[str, Any] = {"skill": skill}
        if not fmt.plain:
            params["format"] = fmt.model_dump(mode="json")
        families.append(TaskFamily(
            family_id=f"{prefix}/seed/{skill}",
            name=skill,
            instructions=f"Tasks of the user's skill '{skill}': answer each prompt exactly.",
            instances=[{"prompt": t.prompt, "solution": t.answer} for t in skill_tasks],
            checker=_NUMERIC_CHECKER if fmt.numeric else _EXACT_CHECKER,
            params=params,
            parent_id=None,
            action="seed",
            generation=0,
            origin="tasks",
        ))
    return families


def family_format(family: TaskFamily) -> TaskFormat:
    """How a family's prompts are answered and read (the plain format unless it declares one)."""
    declared = family.params.get("format")
    return TaskFormat.model_validate(declared) if isinstance(declared, dict) else PLAIN


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
