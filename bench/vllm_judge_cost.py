"""Per-candidate cost on the vLLM path: merge in the sandbox, swap into the engine, judge.

N merge programs from the zoo's seed grammar run in the sandbox against the zoo (seed 0); each
merged model is swapped into one resident vLLM engine (`reload_weights` + `reset_prefix_cache`)
and answers the dev tasks in one batched greedy `generate`; the transformers judge answers the
same tasks beside it. Merged weights go to RAM-backed storage (/dev/shm) when there is one.
Prints the median and p90 of each stage, the engine's start time (what restarting the engine
per candidate would cost instead of a swap), and whether both judges gave the same answers.

Needs vLLM (on CPU machines: the .venv-vllm of README's Development section):

    VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python bench/vllm_judge_cost.py [--candidates 16] [--runner auto]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from agents.answerer import Answerer
from agents.loop import run_merge_jobs
from agents.tasks import load_tasks
from agents.vllm_answerer import VLLMAnswerer
from coevo.zoo.build import default_zoo_dir, ensure_zoo
from coevo.zoo.programs import random_program
from sandbox.jobs import MergeJob, SandboxLimits
from sandbox.runners import make_runner


def _row(name: str, values: list[float]) -> str:
    ms = sorted(1000 * v for v in values)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return f"| {name} | {statistics.median(ms):.0f} ms | {p90:.0f} ms | {len(ms)} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--runner", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    zoo = ensure_zoo(default_zoo_dir(0), seed=0)
    experts = sorted((zoo / "experts").iterdir())
    dev = [t for t in load_tasks(zoo / "tasks") if t.split == "dev"]
    rng = random.Random(args.seed)
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="coevo-judge-cost-", dir=shm if shm.is_dir() else None) as tmp:
        jobs = [MergeJob(source=random_program(rng), base_dir=zoo / "base", expert_dirs=experts, out_dir=Path(tmp) / f"m{i}")
                for i in range(args.candidates)]
        runner = make_runner(args.runner, SandboxLimits(timeout_s=120, memory_mb=2048))
        try:
            started = time.perf_counter()
            results = run_merge_jobs(runner, jobs, workers=1, label=f"merge ({runner.description})")
            merge_wall = time.perf_counter() - started
        finally:
            runner.close()
        merged = [job.out_dir for job, result in zip(jobs, results, strict=True) if result.verdict == "ok"]
        engine = VLLMAnswerer(zoo / "base", max_new_tokens=8, dtype="float32", gpu_memory_utilization=0.05, max_model_len=64)
        reference = Answerer(zoo / "base", max_new_tokens=8)
        vllm_judge, hf_judge, same = [], [], 0
        for model in merged:
            engine.load(model)
            started = time.perf_counter()
            ours = engine.answer_tasks(model, dev)
            vllm_judge.append(time.perf_counter() - started)
            started = time.perf_counter()
            theirs = reference.answer_tasks(model, dev)
            hf_judge.append(time.perf_counter() - started)
            same += ours == theirs
    print(f"zoo seed 0, {len(merged)} of {len(jobs)} merges ok, {len(dev)} dev tasks per candidate, runner {results[0].runner if results else '?'}")
    print("| stage, per candidate | median | p90 | n |\n| --- | ---: | ---: | ---: |")
    print(_row("merge in the sandbox (job wall time)", [r.duration_s for r in results if r.verdict == "ok"]))
    print(_row("swap weights into the vLLM engine (reload_weights + reset_prefix_cache)", engine.swap_seconds))
    print(_row("judge: vLLM, one batched generate", vllm_judge))
    print(_row("judge: transformers (the CPU judge), for comparison", hf_judge))
    print(f"| vLLM engine start (what a restart per candidate would cost instead of a swap) | {1000 * engine.start_seconds:.0f} ms | | 1 |")
    print(f"\nmerge stage wall time, {len(jobs)} jobs: {merge_wall:.1f} s; engine start / median swap: "
          f"{engine.start_seconds / statistics.median(engine.swap_seconds):.0f}x; "
          f"both judges gave identical answers for {same} of {len(merged)} candidates")


if __name__ == "__main__":
    main()
