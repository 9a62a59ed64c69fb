"""Candidates per hour on a Ray cluster against the number of workers, and what the
orchestrator spends per candidate (the ceiling on how many nodes one orchestrator feeds).

Two cores cannot show CPU scaling, so the judge is `agents.cluster.LatencyJudge`: its cost per
candidate is waiting (`--latency`, standing in for a GPU's merge-swap-judge time). A real
multi-node cluster is started on this machine (`ray.cluster_utils.Cluster`, one node per
worker, one CPU slot each) and the pool answers `--candidates` candidates with 1, 2 and 4 judge
actors. Then, with no latency at all, what each candidate costs the orchestrator: a judge
round trip through the pool, and a sandbox job's round trip through `RayRunner` (a program the
node's static policy rejects, so no sandbox process starts and only the dispatch is timed).

    .venv/bin/python bench/cluster_throughput.py [--latency 1.0] [--candidates 24]
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

from agents.cluster import JudgePool, LatencyJudge  # noqa: E402
from agents.config import DiscoveryConfig  # noqa: E402
from sandbox.cluster import RayRunner  # noqa: E402
from sandbox.config import SandboxConfig  # noqa: E402
from sandbox.jobs import MergeJob  # noqa: E402
from sandbox.runners import run_many  # noqa: E402

REJECTED = "import os\n\n\ndef merge(task_vectors, *, name, base):\n    return os.system('true')\n"


def throughput(address: str, actors: int, latency: float, candidates: int) -> float:
    """Candidates per hour through a pool of `actors` latency judges."""
    pool = JudgePool(address, DiscoveryConfig(), Path("."), actors=actors, actor_class=LatencyJudge,
                     actor_args=(latency,), gpus=0.0)
    try:
        items = [(Path(f"/m/{i}"), ["t"]) for i in range(candidates)]
        list(pool.answer_many(items[:actors]))  # every actor warm
        start = time.perf_counter()
        answers = list(pool.answer_many(items))
        took = time.perf_counter() - start
        assert answers == [[f"{i}:t"] for i in range(candidates)]
        return candidates / took * 3600
    finally:
        pool.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=1.0, help="seconds of waiting per candidate")
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--overhead-candidates", type=int, default=200)
    args = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    try:
        ideal = 3600 / args.latency
        print(f"| judge actors | candidates/hour | vs 1 actor | vs ideal ({ideal:.0f}/h per actor) |")
        print("| ---: | ---: | ---: | ---: |")
        first = None
        for actors in (1, 2, 4):
            rate = throughput(cluster.address, actors, args.latency, args.candidates)
            first = first or rate
            print(f"| {actors} | {rate:.0f} | {rate / first:.2f}x | {rate / (actors * ideal):.0%} |", flush=True)

        n = args.overhead_candidates
        judge_rate = throughput(cluster.address, 4, 0.0, n)
        per_judge_ms = 3600 / judge_rate * 1000
        with tempfile.TemporaryDirectory() as tmp:
            models = Path(tmp)
            runner = RayRunner(cluster.address, SandboxConfig(runner="process", workers=1))
            try:
                jobs = [MergeJob(REJECTED, models / "base", [models / "e"], models / f"out{i}") for i in range(n)]
                run_many(runner, jobs[: runner.slots], workers=runner.slots)
                start = time.perf_counter()
                results = run_many(runner, jobs, workers=runner.slots)
                took = time.perf_counter() - start
                assert {r.verdict for r in results} == {"rejected_by_policy"}
                durations = [r.duration_s for r in results]
            finally:
                runner.close()
        per_job_ms = took / n * 1000
        print()
        print(f"orchestrator per candidate, no latency, 4 nodes: judge round trip {per_judge_ms:.1f} ms "
              f"({judge_rate:.0f}/h), sandbox dispatch {per_job_ms:.1f} ms "
              f"(node-side policy check median {1000 * statistics.median(durations):.1f} ms); "
              f"one orchestrator feeds at most {3600 / ((per_judge_ms + per_job_ms) / 1000):.0f} candidates/hour")
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
