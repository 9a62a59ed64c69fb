"""Time a from-scratch build of the embedded zoo and print its testbed numbers.

    python bench/zoo_build.py [--seed 0]

Figures go to BENCHMARKS.md ("Embedded zoo build").
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from coevo.zoo.build import build_zoo, format_zoo_info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zoo"
        started = time.time()
        manifest = build_zoo(out, seed=args.seed, runner_kind="process")
        wall = time.time() - started
        print(format_zoo_info(out, manifest))
        print(f"\nwall time {wall:.0f}s on {torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    main()
