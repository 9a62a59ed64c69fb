"""Do merge children beat their better parent on any skill? (population runs of coevolution_experiments)

For each run directory written by `bench/coevolution_experiments.py` (its `runs/<slug>-s<seed>`),
the same children its summary measures (up to 4 per generation, the first by id) and their
parents answer the held-out benchmark; per benchmark group (each zoo test skill and each harder
family), counts the children that score above both parents, and the largest such gain.

    python bench/children_per_skill.py OUT/runs/acdc-tasks-acdc-s0 [...]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from coevolution_experiments import CHILDREN_MEASURED, benchmark

from agents.answerer import Answerer
from agents.judge import exact_match
from archive_store import Archive
from coevo.zoo.build import default_zoo_dir, ensure_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--zoo", type=Path, default=None, help="zoo dir (default: the cached embedded zoo, seed 0)")
    args = parser.parse_args()
    zoo = ensure_zoo(args.zoo or default_zoo_dir(0), seed=0)
    bench = benchmark(zoo)
    groups = sorted({g for g, _, _ in bench})
    judge = Answerer(zoo / "base", batch_size=512)
    cache: dict[str, dict[str, float]] = {}

    def per_group(path: str) -> dict[str, float]:
        if path not in cache:
            judge.load(Path(path))
            correct: dict[str, list[bool]] = defaultdict(list)
            for answer, (group, _, ref) in zip(judge.answers([p for _, p, _ in bench]), bench, strict=True):
                correct[group].append(exact_match(answer, ref))
            cache[path] = {g: 100 * sum(v) / len(v) for g, v in correct.items()}
        return cache[path]

    for run in args.runs:
        with Archive.open(run / "archive.duckdb", read_only=True) as archive:
            sid = archive.scalar("select session_id from sessions order by started_at desc limit 1")
            paths = dict(archive.query("select model_id, path from models")[1])
            parents_of = dict(archive.query("select model_id, parent_ids from models")[1])
            children = archive.query(
                "select model_id from models where session_id = ? and kind = 'merged' and name like 'g%' "
                "and discarded_reason is null qualify row_number() over (partition by generation order by model_id) <= ? "
                "order by 1", [sid, CHILDREN_MEASURED],
            )[1]
        above_any = 0
        count: dict[str, int] = defaultdict(int)
        best_gain: dict[str, float] = defaultdict(float)
        for (child,) in children:
            mine = per_group(paths[child])
            parents = [per_group(paths[p]) for p in parents_of[child]]
            gains = {g: mine[g] - max(p[g] for p in parents) for g in groups}
            above_any += any(v > 0 for v in gains.values())
            for g, v in gains.items():
                count[g] += v > 0
                best_gain[g] = max(best_gain[g], v)
        print(run.name, json.dumps({
            "children": len(children), "above_better_parent_on_some_group": above_any,
            "children_above_per_group": {g: n for g, n in count.items() if n},
            "largest_gain_per_group": {g: round(v, 1) for g, v in best_gain.items() if v > 0},
        }), flush=True)


if __name__ == "__main__":
    main()
