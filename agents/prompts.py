"""Editable prompt templates (`prompts/*.md`): loading, validation, rendering and hashing.

Templates use `$name` placeholders (string.Template), so code samples with braces need no
escaping. A leading HTML comment documents the template and is not part of the prompt. A
session reads every role's template from one dir (`prompts_dir` in its config, else the
templates shipped with coevo) and archives exactly the texts it read.

A workdir may hold its own `prompts/` dir (written by `coevo serve`'s prompt editor): a template
there overrides the session's one of the same name, and a session reads its templates again
before every iteration (the generator's) or generation (the population modes' roles), so an
edit is used from the next one on (`reload_prompt`). Edits are validated
(`check_template`) before they are saved (`save_template`); the installed templates are never
written.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from archive_store import prompt_hash
from archive_store.shell import write_atomic


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


# Where a session's roles read templates: one dir, or several with the first that holds a
# template winning (the workdir's edits before the config's dir).
PromptDirs = Path | Sequence[Path] | None
WORKDIR_PROMPTS = "prompts"  # <workdir>/prompts: edits made with `coevo serve`
TEMPLATE_LIMIT = 100_000  # characters


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


def _dirs(prompts_dir: PromptDirs) -> list[Path]:
    if prompts_dir is None:
        return [DEFAULT_PROMPTS_DIR]
    if isinstance(prompts_dir, (str, Path)):
        return [Path(prompts_dir)]
    return [Path(d) for d in prompts_dir] or [DEFAULT_PROMPTS_DIR]


def template_path(name: str, prompts_dir: PromptDirs = None) -> Path:
    """The file `name` is read from: the first of `prompts_dir` that holds it (else the last dir)."""
    dirs = _dirs(prompts_dir)
    for directory in dirs:
        if (directory / f"{name}.md").is_file():
            return directory / f"{name}.md"
    return dirs[-1] / f"{name}.md"


def load_prompt(name: str, prompts_dir: PromptDirs = None) -> Prompt:
    """The template `name` from `prompts_dir` (default: the shipped ones; several dirs: the
    first that has it), its placeholders checked."""
    path = template_path(name, prompts_dir)
    if not path.is_file():
        directory = _dirs(prompts_dir)[-1]
        available = ", ".join(p.stem for p in sorted(directory.glob("*.md"))) or "none"
        raise PromptError(f"no prompt {name!r} in {directory} (available: {available})")
    prompt = Prompt(name, path, _strip_header(path.read_text()))
    required = REQUIRED.get(name, set())
    if not required <= prompt.placeholders:
        missing = ", $".join(sorted(required - prompt.placeholders))
        raise PromptError(f"prompt {path} lacks placeholder(s) ${missing}")
    return prompt


def reload_prompt(prompt: Prompt, prompts_dir: PromptDirs) -> tuple[Prompt, str | None]:
    """`prompt` read again from `prompts_dir`: (the current template, a warning or None).

    A template edited into something invalid by hand keeps the last good one, with a warning:
    a running session does not stop over a typo."""
    try:
        fresh = load_prompt(prompt.name, prompts_dir)
        check_template(prompt.name, fresh.text)
    except (PromptError, OSError, UnicodeDecodeError) as err:
        return prompt, f"prompt {prompt.name!r} not reloaded, keeping hash {prompt.hash}: {err}"
    return fresh, None


def list_prompts(prompts_dir: PromptDirs = None) -> list[Prompt]:
    """Every template: the union of the dirs' names, each read from where it wins."""
    names = sorted({p.stem for d in _dirs(prompts_dir) for p in d.glob("*.md")})
    return [load_prompt(name, prompts_dir) for name in names]


def check_template(name: str, raw: str) -> str:
    """The template text of `raw` (header comment dropped) if it is a valid template for role
    `name`: exactly the placeholders the role fills, no unknown `$name`, no stray `$`.
    PromptError says what is wrong otherwise."""
    if name not in REQUIRED:
        raise PromptError(f"unknown prompt {name!r} (known: {', '.join(sorted(REQUIRED))})")
    if len(raw) > TEMPLATE_LIMIT:
        raise PromptError(f"prompt {name!r} is {len(raw)} characters; at most {TEMPLATE_LIMIT}")
    text = _strip_header(raw)
    if not text.strip():
        raise PromptError(f"prompt {name!r} is empty")
    for match in string.Template.pattern.finditer(text):
        if match.group("invalid") is not None:
            line = text.count("\n", 0, match.start("invalid")) + 1
            raise PromptError(f"prompt {name!r} line {line}: a lone '$' (write $$ for a literal dollar sign)")
    found = Prompt(name, Path(f"{name}.md"), text).placeholders
    required = REQUIRED[name]
    unknown, missing = found - required, required - found
    if unknown:
        raise PromptError(f"prompt {name!r} uses unknown placeholder(s) {', '.join('$' + p for p in sorted(unknown))}; "
                          f"it may use {', '.join('$' + p for p in sorted(required))}")
    if missing:
        raise PromptError(f"prompt {name!r} lacks placeholder(s) {', '.join('$' + p for p in sorted(missing))}")
    return text


def save_template(name: str, raw: str, workdir_prompts: Path) -> Prompt:
    """Validate `raw` and write it (whole, then renamed into place) as `workdir_prompts/name.md`;
    PromptError when it is not a valid template, ArchiveError when it cannot be written."""
    check_template(name, raw)
    write_atomic(workdir_prompts / f"{name}.md", raw if raw.endswith("\n") else raw + "\n")
    return load_prompt(name, [workdir_prompts])
