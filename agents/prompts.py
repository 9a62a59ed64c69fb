"""Editable prompt templates (`prompts/*.md`): loading, validation, rendering and hashing.

Templates use `$name` placeholders (string.Template), so code samples with braces need no
escaping. A leading HTML comment documents the template and is not part of the prompt. A
session reads every role's template from one dir (`prompts_dir` in its config, else the
templates shipped with coevo) and archives exactly the texts it read.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from archive_store import prompt_hash


def _default_prompts_dir() -> Path:
    # A wheel ships the templates inside the package; a source checkout has them at its top.
    packaged = Path(__file__).resolve().parent / "default_prompts"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "prompts"


DEFAULT_PROMPTS_DIR = _default_prompts_dir()

# Placeholders each role's template must use; rendering fails loudly on unknown ones.
REQUIRED = {
    "generator": {"n_experts", "exemplars"},
    "judge": {"question", "instructions", "reference", "answer"},
    "gibberish": {"answers"},
    "best_of_n": {"question", "candidates"},
    "task_writer": {"n_instances"},
    "task_writer_harder": {"parent", "feedback", "n_instances"},
    "task_writer_novel": {"parent", "feedback", "n_instances"},
    "task_novelty": {"candidate", "neighbours"},
}


class PromptError(ValueError):
    """A template is missing, unreadable or has wrong placeholders."""


@dataclass(frozen=True)
class Prompt:
    name: str
    path: Path
    text: str

    @property
    def hash(self) -> str:
        return prompt_hash(self.text)

    @property
    def placeholders(self) -> set[str]:
        found = set()
        for match in string.Template.pattern.finditer(self.text):
            key = match.group("named") or match.group("braced")
            if key:
                found.add(key)
        return found

    def render(self, **values: object) -> str:
        missing = self.placeholders - set(values)
        if missing:
            raise PromptError(f"prompt {self.name!r} needs values for: {', '.join(sorted(missing))}")
        return string.Template(self.text).substitute({k: str(v) for k, v in values.items()})


def _strip_header(raw: str) -> str:
    return re.sub(r"\A\s*<!--.*?-->\s*\n", "", raw, count=1, flags=re.S)


def load_prompt(name: str, prompts_dir: Path | None = None) -> Prompt:
    """The template `name` from `prompts_dir` (default: the shipped ones), its placeholders checked."""
    directory = Path(prompts_dir or DEFAULT_PROMPTS_DIR)
    path = directory / f"{name}.md"
    if not path.is_file():
        available = ", ".join(p.stem for p in sorted(directory.glob("*.md"))) or "none"
        raise PromptError(f"no prompt {name!r} in {directory} (available: {available})")
    prompt = Prompt(name, path, _strip_header(path.read_text()))
    required = REQUIRED.get(name, set())
    if not required <= prompt.placeholders:
        missing = ", $".join(sorted(required - prompt.placeholders))
        raise PromptError(f"prompt {path} lacks placeholder(s) ${missing}")
    return prompt


def list_prompts(prompts_dir: Path | None = None) -> list[Prompt]:
    directory = Path(prompts_dir or DEFAULT_PROMPTS_DIR)
    return [load_prompt(p.stem, directory) for p in sorted(directory.glob("*.md"))]
