"""Archive at scale: insert 1 M algorithms and 10 M evaluation rows through the writer's own
batched path (`Archive.add_*`), then time every view.

Shape: one session, 1 M generated algorithms (10 % executable), 1 M sandbox runs, 100 k
merged models with lineage, 100 tasks, 10 M evaluations (100 k models x 100 tasks), 1 k DPO
pairs over 10 DPO runs. Rows are built as Python dicts before the clock starts; the timed part
is what a session pays: dicts -> Arrow -> one `INSERT OR IGNORE` per batch, committed.

For each view two timings (median of 3): `SELECT * FROM view LIMIT 100` (what a user types
first) and `SELECT count(*) FROM (SELECT * FROM view)` (the whole view computed).
Targets (2 cores): >= 200 k evaluation rows/s inserted, every view < 500 ms.

    .venv/bin/python bench/archive_scale.py [--algorithms 1000000] [--evaluations 10000000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from archive_store import POPULATION_VIEWS, VIEWS, Archive  # noqa: E402

SID = "bench-session"
BATCH = 100_000  # rows per write (a session writes a whole step at once)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", type=int, default=1_000_000)
    parser.add_argument("--evaluations", type=int, default=10_000_000)
    parser.add_argument("--tasks", type=int, default=100)
    args = parser.parse_args()
    n_models = args.evaluations // args.tasks
    iterations = 10
    per_iteration = args.algorithms // iterations

    with tempfile.TemporaryDirectory(prefix="coevo-archive-bench-") as tmp:
        path = Path(tmp) / "archive.duckdb"
        archive = Archive.open(path)
        archive.add_session(SID, "selfdev", 0, {})
        prompt = archive.add_prompt("generator", "generator.md", "Write a merge function.")
        archive.add_tasks(
            [{"task_id": f"t{i}", "skill": f"k{i % 3}", "split": "dev" if i % 2 else "test",
              "prompt": f"p{i}", "answer": "a", "origin": "bench", "family_id": f"f{i % 10}",
              "instance": {"word": f"w{i}"}} for i in range(args.tasks)]
        )  # fmt: skip
        archive.add_task_families(
            [{"family_id": f"f{k}", "session_id": SID, "generation": 0, "name": f"family{k}",
              "instructions": "i", "checker": "def check(answer, instance):\n    return 1\n",
              "params": {}, "action": "seed", "origin": "bench", "n_instances": args.tasks // 10}
             for k in range(10)]
        )  # fmt: skip
        for version in range(iterations + 1):
            archive.add_generator_version(SID, version, f"gen/v{version}", dpo_run_id=f"d{version}")

        timings: dict[str, tuple[int, float]] = {}

        def timed(name: str, rows_fn, add) -> None:  # type: ignore[no-untyped-def]
            total, seconds = 0, 0.0
            for batch in rows_fn():
                start = time.perf_counter()
                with archive.transaction():
                    add(batch)
                seconds += time.perf_counter() - start
                total += len(batch)
            timings[name] = (total, seconds)
            print(f"{name}: {total:,} rows in {seconds:.1f} s = {total / seconds:,.0f} rows/s", file=sys.stderr)

        def algorithm_rows():  # type: ignore[no-untyped-def]
            for start in range(0, args.algorithms, BATCH):
                yield [
                    {"algorithm_id": f"{SID}/it{i // per_iteration}/s{i:07d}", "session_id": SID,
                     "iteration": i // per_iteration, "sample_index": i % per_iteration,
                     "generator_version": i // per_iteration, "prompt_hash": prompt,
                     "temperature": 1.0, "code": f"def merge(task_vectors, *, name, base):\n    return base * {i}\n",
                     "code_hash": f"c{i}", "normalized_hash": f"n{i}", "policy_ok": i % 7 != 0,
                     "exemplar_ids": []}
                    for i in range(start, min(start + BATCH, args.algorithms))
                ]  # fmt: skip

        def run_rows():  # type: ignore[no-untyped-def]
            for start in range(0, args.algorithms, BATCH):
                yield [
                    {"run_id": f"{SID}/it{i // per_iteration}/s{i:07d}/run",
                     "algorithm_id": f"{SID}/it{i // per_iteration}/s{i:07d}", "runner": "docker",
                     "verdict": "ok" if i % (args.algorithms // n_models) == 0 else "runtime_error",
                     "reason": "ok", "duration_s": 0.05, "peak_memory_mb": 200.0}
                    for i in range(start, min(start + BATCH, args.algorithms))
                ]  # fmt: skip

        step = args.algorithms // n_models
        model_algorithms = list(range(0, args.algorithms, step))[:n_models]

        def model_rows():  # type: ignore[no-untyped-def]
            for start in range(0, len(model_algorithms), BATCH):
                yield [
                    {"model_id": f"{SID}/it{i // per_iteration}/s{i:07d}/model", "session_id": SID,
                     "kind": "merged", "name": f"m{i}", "algorithm_id": f"{SID}/it{i // per_iteration}/s{i:07d}",
                     "parent_ids": [f"{SID}/base", f"{SID}/expert/a", f"{SID}/expert/b"],
                     "generation": i // per_iteration, "path": f"models/m{i}"}
                    for i in model_algorithms[start : start + BATCH]
                ]  # fmt: skip

        def evaluation_rows():  # type: ignore[no-untyped-def]
            per_batch = BATCH // args.tasks
            for start in range(0, len(model_algorithms), per_batch):
                yield [
                    {"model_id": f"{SID}/it{i // per_iteration}/s{i:07d}/model", "task_id": f"t{t}",
                     "judge": "exact_match", "answer": "a", "score": float((i + t) % 3 == 0)}
                    for i in model_algorithms[start : start + per_batch]
                    for t in range(args.tasks)
                ]  # fmt: skip

        def pair_rows():  # type: ignore[no-untyped-def]
            yield [
                {"pair_id": f"d{k}/p{j}", "session_id": SID, "iteration": k, "prompt_hash": prompt,
                 "chosen_algorithm_id": f"{SID}/it{k}/s{k * per_iteration + j:07d}",
                 "rejected_algorithm_id": f"{SID}/it{k}/s{k * per_iteration + j + 1:07d}",
                 "chosen_score": 1.0, "rejected_score": 0.0, "dpo_run_id": f"d{k}"}
                for k in range(iterations) for j in range(100)
            ]  # fmt: skip

        started = time.perf_counter()
        timed("algorithms", algorithm_rows, archive.add_algorithms)
        timed("sandbox_runs", run_rows, archive.add_sandbox_runs)
        timed("models", model_rows, archive.add_models)
        timed("evaluations", evaluation_rows, archive.add_evaluations)
        timed("preference_pairs", pair_rows, archive.add_preference_pairs)
        with archive.transaction():
            for k in range(iterations):
                archive.add_dpo_run({"dpo_run_id": f"d{k}", "session_id": SID, "iteration": k,
                                     "base_version": k, "new_version": k + 1, "num_pairs": 100,
                                     "config_json": {}})  # fmt: skip
        load_seconds = time.perf_counter() - started
        publish = time.perf_counter()
        archive.publish_snapshot()
        publish_seconds = time.perf_counter() - publish
        archive.close()
        size_mb = path.stat().st_size / 1e6

        view_times: dict[str, tuple[float, float]] = {}
        with Archive.open(path, read_only=True) as reader:
            for view in (*VIEWS, *POPULATION_VIEWS):
                first = _median_ms(reader, f"SELECT * FROM {view} LIMIT 100")
                full = _median_ms(reader, f"SELECT count(*) FROM (SELECT * FROM {view})")
                view_times[view] = (first, full)
                print(f"{view}: {first:.0f} ms / {full:.0f} ms", file=sys.stderr)

    print(f"\narchive: {size_mb:,.0f} MB after loading in {load_seconds:.0f} s; "
          f"publishing the reader snapshot took {publish_seconds:.1f} s\n")  # fmt: skip
    print("| table | rows | seconds | rows/s |")
    print("|---|---|---|---|")
    for name, (rows, seconds) in timings.items():
        print(f"| {name} | {rows:,} | {seconds:.1f} | {rows / seconds:,.0f} |")
    rate = timings["evaluations"][0] / timings["evaluations"][1]
    print(f"\nevaluation insert target (>= 200k rows/s): {'PASS' if rate >= 200_000 else 'FAIL'}\n")
    print("| view | first 100 rows | whole view |")
    print("|---|---|---|")
    for view, (first, full) in view_times.items():
        print(f"| {view} | {first:.0f} ms | {full:.0f} ms |")
    slowest = max(max(v) for v in view_times.values())
    print(f"\nview target (every view < 500 ms): {'PASS' if slowest < 500 else 'FAIL'} (slowest {slowest:.0f} ms)")
    return 0


def _median_ms(archive: Archive, sql: str) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        archive.query(sql)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
