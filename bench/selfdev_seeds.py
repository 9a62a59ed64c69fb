"""Does DPO on the generator raise the mean dev score of executable programs?

`--no-dpo` is the control: the same temperature schedule without the DPO update, which
separates the effect of DPO from that of the lower sampling temperature.

Runs the quickstart session (embedded zoo) for several seeds and prints, per seed and
iteration, the executable rate and the mean / top-3 dev score, plus first -> last deltas.

    python bench/selfdev_seeds.py --seeds 0 1 2 [--iterations 2] [--programs 64] [--out DIR] [--no-dpo]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from archive_store import Archive


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="keep workdirs here")
    parser.add_argument("--no-dpo", action="store_true", help="control: same sampling schedule, no DPO update")
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="selfdev-seeds-"))
    root.mkdir(parents=True, exist_ok=True)
    config = []
    if args.no_dpo:
        (root / "no_dpo.toml").write_text("[dpo]\nenabled = false\n")
        config = [str(root / "no_dpo.toml")]
    deltas = []
    print(f"{'seed':>4} {'iter':>4} {'exec':>6} {'mean':>6} {'top3':>6}")
    for seed in args.seeds:
        workdir = root / f"seed{seed}"
        subprocess.run(
            [sys.executable, "-m", "coevo", "launch", *config, "--workdir", str(workdir), "--seed", str(seed),
             "--iterations", str(args.iterations), "--programs", str(args.programs)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
            rows = archive.records("select * from iteration_stats order by iteration")
        for row in rows:
            print(f"{seed:>4} {row['iteration']:>4} {100 * row['executable_rate']:>5.0f}% "
                  f"{100 * row['mean_dev']:>6.1f} {100 * row['top3_mean_dev']:>6.1f}")
        deltas.append(100 * (rows[-1]["mean_dev"] - rows[0]["mean_dev"]))
    print(f"mean dev, last - first iteration, per seed: {', '.join(f'{d:+.1f}' for d in deltas)}")
    print(f"average {statistics.mean(deltas):+.1f}; rose in {sum(d > 0 for d in deltas)}/{len(deltas)} seeds")


if __name__ == "__main__":
    main()
