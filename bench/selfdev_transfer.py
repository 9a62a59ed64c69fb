"""Transfer: do the algorithms discovered on one set of experts merge another set well?

The Self-Developing paper applies its top-3 algorithms, found by merging one set of experts,
unchanged to other experts (78.8 vs 71.4 for task arithmetic). Here: the top-3 algorithms by
dev score of each quickstart session (run by `bench/selfdev_seeds.py --out DIR`) merge the
zoo's transfer experts (`transfer/experts/`, skills the session never saw); each merge runs in
the sandbox and is scored on the transfer test split, against task arithmetic with its scale
tuned on the transfer dev split, and TIES.

    python bench/selfdev_transfer.py DIR [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from agents.answerer import Answerer
from agents.baselines import baseline_merge
from agents.judge import exact_scores, mean_score
from agents.loop import run_merge_jobs
from agents.tasks import Task, load_tasks
from archive_store import Archive
from coevo.zoo.build import default_zoo_dir, ensure_zoo
from coevo.zoo.skills import TRANSFER
from sandbox.jobs import MergeJob, SandboxLimits
from sandbox.runners import make_runner


def score(answerer: Answerer, model_dir: Path, tasks: list[Task]) -> float:
    return mean_score(exact_scores(tasks, answerer.answer_tasks(model_dir, tasks)))  # %


def transfer_seed(workdir: Path, seed: int, runner_kind: str) -> dict[str, object]:
    zoo = ensure_zoo(default_zoo_dir(seed), seed=seed)
    experts = [zoo / "transfer" / "experts" / s for s in TRANSFER]
    tasks = load_tasks(zoo / "transfer" / "tasks")
    dev = [t for t in tasks if t.split == "dev"]
    test = [t for t in tasks if t.split == "test"]
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        session = archive.latest_session()
        if session is None:
            raise SystemExit(f"no session in {workdir}")
        top = archive.top_algorithms(session["session_id"], 3)
    answerer = Answerer(zoo / "base")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        ta_params = baseline_merge("task_arithmetic", zoo / "base", experts, out / "ta", answerer=answerer, dev_tasks=dev)
        baseline_merge("ties", zoo / "base", experts, out / "ties", answerer=answerer, dev_tasks=dev)
        runner = make_runner(runner_kind, SandboxLimits(timeout_s=120, memory_mb=2048))
        jobs = [MergeJob(source=a["code"], base_dir=zoo / "base", expert_dirs=experts, out_dir=out / f"alg{i}")
                for i, a in enumerate(top)]
        try:
            results = run_merge_jobs(runner, jobs, workers=2, label=f"seed {seed}: top-3 on the transfer experts")
        finally:
            runner.close()
        algorithms = []
        for algorithm, job, result in zip(top, jobs, results, strict=True):
            test_score = score(answerer, job.out_dir, test) if result.verdict == "ok" else None
            algorithms.append({"id": algorithm["algorithm_id"], "discovery_dev": 100 * algorithm["dev_score"],
                               "verdict": result.verdict, "transfer_test": test_score})
        return {
            "seed": seed,
            "ta": score(answerer, out / "ta", test),
            "ta_scale": ta_params["scale"],
            "ties": score(answerer, out / "ties", test),
            "experts": {s: score(answerer, e, test) for s, e in zip(TRANSFER, experts, strict=True)},
            "algorithms": algorithms,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the --out dir of bench/selfdev_seeds.py (seed<N>/ workdirs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runner", default="auto")
    args = parser.parse_args()
    rows = [transfer_seed(args.root / f"seed{seed}", seed, args.runner) for seed in args.seeds]
    print(f"\ntransfer experts {', '.join(TRANSFER)}: test accuracy (%)")
    print(f"{'seed':>4} {'TA':>6} {'TIES':>6} {'best expert':>12} {'top-3 algorithms (discovery rank order)':>40} {'mean':>6}")
    leads = []
    for row in rows:
        algos = [a["transfer_test"] for a in row["algorithms"]]  # type: ignore[union-attr]
        ok = [a for a in algos if a is not None]
        mean = statistics.mean(ok) if ok else float("nan")
        shown = " ".join("fail" if a is None else f"{a:.1f}" for a in algos)
        best_expert = max(row["experts"].values())  # type: ignore[union-attr]
        print(f"{row['seed']:>4} {row['ta']:>6.1f} {row['ties']:>6.1f} {best_expert:>12.1f} {shown:>40} {mean:>6.1f}")
        if ok:
            leads.append(max(ok) - row["ta"])  # type: ignore[operator]
    if leads:
        print(f"best of the top-3 minus TA, per seed: {', '.join(f'{d:+.1f}' for d in leads)}")


if __name__ == "__main__":
    main()
