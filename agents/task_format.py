"""How a task set is shown to a model and how its answers are read.

A task set may declare its format in `<tasks dir>/format.toml` (`TaskFormat`): the question
template, k-shot exemplars drawn from a pool, an optional chat template, stop sequences, the
answer length, how the answer is extracted from the reply (first line, `Answer:` line, last
number, GSM8k's `#### N`, `\\boxed{}`, a regex) and whether answers compare as numbers.
Without one, a task set is shown as the zoo's: the prompt as is, the first line of the reply,
exact match.

`render_prompt` builds the text a model sees; `read_reply` cuts a reply at the stop
sequences and extracts the answer; `same_answer` compares it with the reference.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agents.answer_text import extract_answer, last_boxed

Extractor = Literal["first_line", "answer_line", "last_number", "gsm8k", "boxed", "regex", "as_is"]


class TaskFormat(BaseModel):
    """A task set's prompt format and answer reading (the `[format]` table of format.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field("{prompt}", description="the question as shown; {prompt} is the task's prompt")
    shots: int = Field(0, ge=0, description="k-shot: exemplars put before each question")
    shot_template: str = Field(
        "{prompt}{answer}", description="one exemplar; {prompt} and {answer} (the pool's full answer)"
    )
    separator: str = Field("\n", description="between exemplars, and between the last one and the question")
    shot_seed: int = Field(0, description="which exemplars each task gets (drawn per task, reproducibly)")
    chat: bool = Field(False, description="wrap the prompt in the model tokenizer's chat template")
    system: str = Field("", description="system message when chat = true")
    stop: tuple[str, ...] = Field(("\n",), description="the reply is cut at the first of these")
    max_new_tokens: int = Field(8, ge=1, description="longest reply")
    extract: Extractor = Field("first_line", description="how the answer is read from the reply")
    pattern: str = Field("", description="extract = 'regex': the answer is the pattern's first group (last match)")
    reference: Extractor = Field("as_is", description="how the reference answer is read from the answer field")
    numeric: bool = Field(False, description="answers that parse as numbers compare as numbers (1,000 = 1000.0)")

    @model_validator(mode="after")
    def _consistent(self) -> TaskFormat:
        if "{prompt}" not in self.template:
            raise ValueError("template must contain {prompt}")
        if self.shots and "{prompt}" not in self.shot_template:
            raise ValueError("shot_template must contain {prompt}")
        if "regex" in (self.extract, self.reference):
            if not self.pattern:
                raise ValueError("extract = 'regex' needs a pattern")
            try:
                compiled = re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern is not a regular expression: {err}") from None
            if compiled.groups < 1:
                raise ValueError("pattern needs one group: the answer")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must not be empty strings")
        return self

    @property
    def plain(self) -> bool:
        """Whether this is the zoo's format (prompt as is, first line, exact match)."""
        return self == PLAIN


PLAIN = TaskFormat()

_NUMBER = re.compile(r"-?[$€£]?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM8K = re.compile(r"####\s*(-?[$€£]?[\d,]*\.?\d+)")


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract(text: str, how: Extractor, pattern: str = "") -> str:
    """The answer in `text` read the `how` way; '' when there is none."""
    if how == "as_is":
        return text.strip()
    if how == "first_line":
        return text.split("\n", 1)[0].strip()
    if how == "answer_line":
        return extract_answer(text)
    if how == "last_number":
        return _last_number(text) or ""
    if how == "gsm8k":
        found = _GSM8K.findall(text)
        return found[-1] if found else ""
    if how == "boxed":
        return (last_boxed(text) or "").strip()
    matches = list(re.finditer(pattern, text))
    return (matches[-1].group(1) or "").strip() if matches else ""


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    if not stop:
        return text
    cut = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def as_number(text: str) -> Decimal | None:
    """`text` as a number (commas, a currency sign, a trailing period and `x.0` allowed), else None."""
    cleaned = text.strip().rstrip(".").replace(",", "").lstrip("$€£")
    if cleaned.startswith("-"):
        cleaned = "-" + cleaned[1:].lstrip("$€£")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def same_answer(answer: str, reference: str, fmt: TaskFormat) -> bool:
    """Whether an extracted answer matches the reference (as numbers when `fmt.numeric`)."""
    if fmt.numeric:
        a, r = as_number(answer), as_number(reference)
        if a is not None and r is not None:
            return a == r
    return answer.strip() == reference.strip()


def read_reply(reply: str, fmt: TaskFormat) -> str:
    """The answer in a model's reply: cut at the stop sequences, then extracted."""
    return extract(truncate_at_stop(reply, fmt.stop), fmt.extract, fmt.pattern)


def render_prompt(prompt: str, fmt: TaskFormat, pool: Sequence[tuple[str, str]], *, key: str) -> str:
    """The text a model sees for a question: `fmt.shots` exemplars from `pool` (drawn
    reproducibly per `key`, never the question itself), then the templated question."""
    question = fmt.template.replace("{prompt}", prompt)
    if not fmt.shots:
        return question
    candidates = [p for p in pool if p[0] != prompt]
    if len(candidates) < fmt.shots:
        raise ValueError(f"{fmt.shots}-shot prompts need {fmt.shots} exemplars; the pool has {len(candidates)}")
    rng = random.Random(f"{fmt.shot_seed}:{key}")
    shots = [fmt.shot_template.replace("{prompt}", p).replace("{answer}", a) for p, a in rng.sample(candidates, fmt.shots)]
    return fmt.separator.join([*shots, question])


def chat_prompt(text: str, fmt: TaskFormat, tokenizer: Any) -> str:
    """`text` wrapped in the tokenizer's chat template when `fmt.chat` (generation prompt added)."""
    if not fmt.chat:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the task format asks for a chat template (chat = true) but the model's tokenizer has none")
    messages = ([{"role": "system", "content": fmt.system}] if fmt.system else []) + [{"role": "user", "content": text}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
