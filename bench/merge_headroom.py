"""How far can simple re-weightings of the task vectors go beyond task arithmetic on the zoo?

Explains EXPERIMENTS.md's Self-Developing result: task arithmetic (one scale, tuned on dev)
against (a) one weight per expert, grid 0.6-1.2, picked on dev, and (b) separate scales for
the attention and the MLP part of the summed task vector, picked on dev; each reported on dev
and on test. Built-in arithmetic on the zoo's own models, run in-process (no generated code).

    python bench/merge_headroom.py [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence

from transformers import LlamaForCausalLM
from zoo_regimes import accuracy

from agents.baselines import TA_SCALES
from agents.tasks import Task, load_tasks
from coevo.zoo.build import default_zoo_dir, ensure_zoo
from coevo.zoo.skills import DISCOVERY
from coevo.zoo.tiny import char_tokenizer

GRID = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
PART_SCALES = (0.6, 0.8, 1.0, 1.2, 1.4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    zoo = ensure_zoo(default_zoo_dir(args.seed), seed=args.seed)
    tokenizer = char_tokenizer()
    model = LlamaForCausalLM.from_pretrained(zoo / "base").eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    vectors = []
    for skill in DISCOVERY:
        expert = LlamaForCausalLM.from_pretrained(zoo / "experts" / skill).state_dict()
        vectors.append({k: expert[k] - base[k] for k in base})
    tasks = load_tasks(zoo / "tasks")
    dev = [t for t in tasks if t.split == "dev"]
    test = [t for t in tasks if t.split == "test"]

    def score(weights: Sequence[float], parts: tuple[float, float] = (1.0, 1.0), split: list[Task] = dev) -> float:
        state = {}
        for name, b in base.items():
            part = parts[0] if "self_attn" in name else parts[1] if "mlp" in name else 1.0
            state[name] = b + part * sum(w * v[name] for w, v in zip(weights, vectors, strict=True))
        model.load_state_dict(state)
        return accuracy(model, split, tokenizer)["average"]

    scale = max(TA_SCALES, key=lambda s: score([s] * len(vectors)))
    ta = [scale] * len(vectors)
    weights = max(itertools.product(GRID, repeat=len(vectors)), key=lambda w: score(w))
    parts = max(itertools.product(PART_SCALES, repeat=2), key=lambda p: score(ta, p))
    print(f"zoo seed {args.seed}: average of {', '.join(DISCOVERY)} (%)")
    print(f"{'merge':<46} {'dev':>6} {'test':>6}")
    rows = [
        (f"task arithmetic, scale {scale}", ta, (1.0, 1.0)),
        (f"one weight per expert {tuple(weights)}", list(weights), (1.0, 1.0)),
        (f"TA, attention x{parts[0]} and MLP x{parts[1]}", ta, parts),
    ]
    for label, w, p in rows:
        print(f"{label:<46} {score(w, p):>6.1f} {score(w, p, test):>6.1f}")


if __name__ == "__main__":
    main()
