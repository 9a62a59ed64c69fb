"""Per-job sandbox overhead: the warm Docker pool against a cold `docker run` per job (and the
process fallback), measured side by side in one run on the same tiny models.

Overhead is everything but the program's own compute: a job's wall time as the caller sees
it (`SandboxResult.duration_s`: policy check, container or process start, imports, reading
the weights, writing and installing the merged model, teardown) minus the time spent inside
the program's `merge` calls (`compute_s`). Rounds are interleaved (warm, cold, process,
warm, ...) so drift on the machine hits every mode alike. The warm pool is started before
the first round; its start-up is reported separately.

    .venv/bin/python bench/sandbox_overhead.py [--jobs 30]
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

from coevo.zoo.tiny import perturbed_copy, save_tiny_llama  # noqa: E402
from sandbox.docker_runner import DockerRunner  # noqa: E402
from sandbox.jobs import MergeJob, Runner, SandboxLimits  # noqa: E402
from sandbox.process_runner import ProcessRunner  # noqa: E402

PROGRAM = "import torch\n\n\ndef merge(task_vectors, *, name, base):\n    return torch.stack(task_vectors).mean(dim=0)\n"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30, help="jobs per mode")
    args = parser.parse_args()

    limits = SandboxLimits(timeout_s=120, memory_mb=1024)
    with tempfile.TemporaryDirectory(prefix="coevo-bench-") as tmp:
        root = Path(tmp)
        base = save_tiny_llama(root / "base", seed=0)
        experts = [perturbed_copy(base, root / f"expert{i}", seed=i + 1) for i in range(3)]
        started = time.perf_counter()
        warm = DockerRunner(limits, pool_size=1, jobs_per_container=10_000, scratch_dir=root / "scratch")
        warm.prewarm(base, experts)
        first = warm.run(MergeJob(PROGRAM, base, experts, root / "first"))
        startup = time.perf_counter() - started
        assert first.verdict == "ok", first
        cold = DockerRunner(limits, pool_size=0, scratch_dir=root / "scratch-cold")
        process = ProcessRunner(limits)
        runners: dict[str, Runner] = {"docker warm pool": warm, "docker cold run": cold, "process": process}
        overhead: dict[str, list[float]] = {name: [] for name in runners}
        compute: dict[str, list[float]] = {name: [] for name in runners}
        for i in range(args.jobs):
            for name, runner in runners.items():
                result = runner.run(MergeJob(PROGRAM, base, experts, root / f"out-{i % 2}"))
                assert result.verdict == "ok", (name, result)
                overhead[name].append(result.duration_s - result.compute_s)
                compute[name].append(result.compute_s)
            print(f"round {i + 1}/{args.jobs}", file=sys.stderr, end="\r")
        warm.close()
        cold.close()

    print(f"\nwarm pool start-up (container + imports + first job): {startup:.2f} s")
    print(f"jobs per mode: {args.jobs}, interleaved; tiny Llama base + 3 experts, mean of task vectors\n")
    print("| mode | overhead median | overhead p95 | program compute median |")
    print("|---|---|---|---|")
    for name in runners:
        print(
            f"| {name} | {1000 * statistics.median(overhead[name]):.0f} ms "
            f"| {1000 * percentile(overhead[name], 0.95):.0f} ms "
            f"| {1000 * statistics.median(compute[name]):.1f} ms |"
        )
    warm_median = statistics.median(overhead["docker warm pool"])
    cold_median = statistics.median(overhead["docker cold run"])
    print(f"\ncold / warm median overhead: {cold_median / warm_median:.1f}x")
    print(f"target (warm median <= 100 ms): {'PASS' if warm_median <= 0.1 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
