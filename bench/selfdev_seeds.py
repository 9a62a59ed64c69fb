"""Does DPO on the generator raise the mean dev score, and does discovery beat the reference merges?

`--no-dpo` is the control: the same temperature schedule without the DPO update, which
separates the effect of DPO from that of the lower sampling temperature.

Runs the quickstart session for several seeds, each on the embedded zoo built from the same
seed (so the spread covers zoo and session alike), and prints per seed and iteration the
executable rate and the mean / top-3 dev score, then the test score of the best discovered
algorithm (best dev score of the report's top-k) against task arithmetic and TIES.

    python bench/selfdev_seeds.py --seeds 0 1 2 [--iterations 3] [--programs 64] [--out DIR] [--no-dpo]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from archive_store import Archive, queries


def _test_of(board: list[tuple], prefix: str) -> float:
    return 100 * next(test for name, _, _, test in board if name.startswith(prefix))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="keep workdirs here")
    parser.add_argument("--no-dpo", action="store_true", help="control: same sampling schedule, no DPO update")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="selfdev-seeds-"))
    root.mkdir(parents=True, exist_ok=True)
    deltas = []
    finals = []
    print(f"{'seed':>4} {'iter':>4} {'exec':>6} {'mean':>6} {'top3':>6}")
    for seed in args.seeds:
        workdir = root / f"seed{seed}"
        config = root / f"seed{seed}.toml"
        config.write_text(f"[zoo]\nseed = {seed}\n" + ("[dpo]\nenabled = false\n" if args.no_dpo else ""))
        subprocess.run(
            [sys.executable, "-m", "coevo", "launch", str(config), "--workdir", str(workdir), "--seed", str(seed),
             "--iterations", str(args.iterations), "--programs", str(args.programs)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
            rows = archive.records("select * from iteration_stats order by iteration")
            session = archive.latest_session()
            assert session is not None
            board = queries.session_leaderboard(archive, session["session_id"])
        for row in rows:
            print(f"{seed:>4} {row['iteration']:>4} {100 * row['executable_rate']:>5.0f}% "
                  f"{100 * row['mean_dev']:>6.1f} {100 * row['top3_mean_dev']:>6.1f}")
        deltas.append(100 * (rows[-1]["mean_dev"] - rows[0]["mean_dev"]))
        # Best dev score; ties go to the earliest program (iteration, sample), never to test.
        best = min((r for r in board if r[1] == "merged"), key=lambda r: (-r[2], r[0]))
        finals.append((seed, 100 * best[3], _test_of(board, "baseline:task_arithmetic"),
                       _test_of(board, "baseline:ties")))
    print(f"mean dev, last - first iteration, per seed: {', '.join(f'{d:+.1f}' for d in deltas)}")
    print(f"average {statistics.mean(deltas):+.1f}; rose in {sum(d > 0 for d in deltas)}/{len(deltas)} seeds")
    print(f"\n{'seed':>4} {'best discovered, test':>22} {'TA':>6} {'TIES':>6} {'vs TA':>6} {'vs TIES':>8}")
    for seed, best_test, ta, ties in finals:
        print(f"{seed:>4} {best_test:>22.1f} {ta:>6.1f} {ties:>6.1f} {best_test - ta:>+6.1f} {best_test - ties:>+8.1f}")
    wins = sum(b - max(ta, ties) >= 3 for _, b, ta, ties in finals)
    print(f">= 3 points above both TA and TIES in {wins}/{len(finals)} seeds")


if __name__ == "__main__":
    main()
