"""Reading the final answer out of an LLM's free-form reply (`Answer: ...` lines, `\\boxed{}`)."""

from __future__ import annotations

import re

_ANSWER_LINE = re.compile(r"^[\s>*_#-]*(?:final\s+)?answer\s*[*_]*\s*[:：]\s*[*_]*\s*(.*)$", re.I)
_BOXED = "\\boxed{"


def extract_answer(text: str) -> str:
    """The final answer in an LLM's reply, stripped: the last `Answer: ...` / `Final answer:
    ...` line (or the line after it, when the label stands alone), else the last
    `\\boxed{...}`, else the last non-empty line."""
    lines = text.splitlines()
    for index in range(len(lines) - 1, -1, -1):
        match = _ANSWER_LINE.match(lines[index])
        if match is None:
            continue
        answer = match.group(1).strip()
        if lines[index].lstrip().startswith(("*", "_")):  # "**Answer: 42**"
            answer = answer.rstrip("*_").strip()
        if answer:
            return answer
        following = [line.strip() for line in lines[index + 1 :] if line.strip()]
        if following:
            return following[0]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    non_empty = [line.strip() for line in lines if line.strip()]
    return non_empty[-1] if non_empty else ""


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` with balanced braces, if any."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth = 1
        for at in range(start + len(_BOXED), len(text)):
            depth += {"{": 1, "}": -1}.get(text[at], 0)
            if depth == 0:
                return text[start + len(_BOXED) : at]
        start = text.rfind(_BOXED, 0, start)  # unbalanced (cut off): try an earlier one
    return None
