"""Reference merges the generated algorithms are compared with.

Task arithmetic's scaling factor is chosen on the dev split from a grid in steps of 0.1, as
the papers do (Ilharco et al. tune lambda on validation data); TIES uses its usual defaults.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from agents.answerer import Resident
from agents.judge import exact_scores, mean_score
from agents.tasks import Task
from merging.apply import merge_models
from merging.methods import make_merge_fn

TA_SCALES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)


def baseline_merge(
    method: str,
    base_dir: Path,
    expert_dirs: list[Path],
    out_dir: Path,
    *,
    answerer: Resident,
    dev_tasks: Sequence[Task],
    include: str | None = None,
) -> dict[str, float]:
    """Write the reference merge `method` to out_dir; returns the parameters used."""
    if method != "task_arithmetic":
        merge_models(make_merge_fn(method), base_dir, expert_dirs, out_dir, include=include)
        return {}
    best: tuple[float, float] | None = None
    for scale in TA_SCALES:
        candidate = out_dir.with_name(f"{out_dir.name}.scale{scale}")
        merge_models(make_merge_fn(method, scale=scale), base_dir, expert_dirs, candidate, include=include)
        answers = answerer.answer_tasks(candidate, dev_tasks)
        score = mean_score(exact_scores(dev_tasks, answers))
        if best is None or score > best[0]:
            best = (score, scale)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            candidate.rename(out_dir)
        else:
            shutil.rmtree(candidate)
    assert best is not None
    return {"scale": best[1]}
