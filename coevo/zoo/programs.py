"""A grammar of merge programs composed from merge primitives: the seed generator's corpus.

Every program follows the merge contract (`merging.contract`), works for tensors of any rank,
and is built from the ideas the Self-Developing paper found in its best algorithms (weighted
sums, sign consensus, magnitude trimming, norm / cosine weighting, sorting by norm, iterative
pairwise merging, element-wise products).
"""

from __future__ import annotations

import random
from collections.abc import Callable

from merging import contract

HEADER = contract.PROGRAM_HEADER


def _c(rng: random.Random, lo: float, hi: float) -> str:
    return f"{rng.uniform(lo, hi):.2f}"


def _weights(rng: random.Random) -> list[str]:
    return [
        f"weights = [{', '.join(_c(rng, 0.1, 0.9) for _ in range(3))}]",
        "merged = sum(w * tv for w, tv in zip(weights, task_vectors))",
    ]


def _mean(rng: random.Random) -> list[str]:
    return ["merged = torch.stack(task_vectors).mean(dim=0)"]


def _sum(rng: random.Random) -> list[str]:
    return ["merged = sum(task_vectors)"]


def _sign_consensus(rng: random.Random) -> list[str]:
    return [
        "stacked = torch.stack(task_vectors)",
        "sign = torch.sign(stacked.sum(dim=0))",
        "agree = (torch.sign(stacked) == sign).float()",
        "merged = (stacked * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)",
    ]


def _trim(rng: random.Random) -> list[str]:
    return [
        "stacked = torch.stack(task_vectors)",
        f"cutoff = stacked.abs().mean() * {_c(rng, 0.2, 1.5)}",
        "kept = torch.where(stacked.abs() >= cutoff, stacked, torch.zeros_like(stacked))",
        "merged = kept.sum(dim=0)",
    ]


def _max_magnitude(rng: random.Random) -> list[str]:
    return [
        "stacked = torch.stack(task_vectors)",
        "index = stacked.abs().argmax(dim=0, keepdim=True)",
        "merged = stacked.gather(0, index).squeeze(0)",
    ]


def _norm_weighted(rng: random.Random) -> list[str]:
    return [
        "norms = torch.stack([tv.norm() for tv in task_vectors])",
        "weights = norms / norms.sum().clamp(min=1e-8)",
        "merged = sum(w * tv for w, tv in zip(weights, task_vectors))",
    ]


def _cosine_weighted(rng: random.Random) -> list[str]:
    return [
        "center = torch.stack(task_vectors).mean(dim=0).flatten()",
        "sims = torch.stack([torch.nn.functional.cosine_similarity(tv.flatten(), center, dim=0) for tv in task_vectors])",
        f"weights = torch.softmax(sims / {_c(rng, 0.1, 2.0)}, dim=0)",
        "merged = sum(w * tv for w, tv in zip(weights, task_vectors))",
    ]


def _pairwise(rng: random.Random) -> list[str]:
    a = rng.uniform(0.3, 1.0)
    return [
        "ordered = sorted(task_vectors, key=lambda tv: float(tv.norm()))",
        "merged = ordered[0]",
        "for tv in ordered[1:]:",
        f"    merged = {a:.2f} * merged + {rng.uniform(0.3, 1.0):.2f} * tv",
    ]


def _product_gate(rng: random.Random) -> list[str]:
    return [
        "stacked = torch.stack(task_vectors)",
        "gate = torch.tanh(stacked.prod(dim=0).abs() * " + _c(rng, 1.0, 100.0) + ")",
        "merged = stacked.sum(dim=0) * (1.0 + gate)",
    ]


COMBINE: list[Callable[[random.Random], list[str]]] = [
    _weights, _mean, _sum, _sign_consensus, _trim, _max_magnitude,
    _norm_weighted, _cosine_weighted, _pairwise, _product_gate,
]


def _post(rng: random.Random) -> list[str]:
    choice = rng.random()
    if choice < 0.2:
        return [f"merged = merged.clamp(-{_c(rng, 0.01, 0.2)}, {_c(rng, 0.01, 0.2)})"]
    if choice < 0.4:
        return [
            f'if "{rng.choice(["mlp", "attn", "embed", "norm"])}" in name:',
            f"    merged = merged * {_c(rng, 0.0, 1.5)}",
        ]
    if choice < 0.5:
        return ["if base.dim() == 1:", "    return torch.zeros_like(base)"]
    return []


def random_program(rng: random.Random) -> str:
    """One valid merge program: a combination strategy, an optional post-step, a final scale."""
    body = rng.choice(COMBINE)(rng) + _post(rng)
    body.append(f"return merged * {_c(rng, 0.1, 1.6)}")
    return HEADER + "".join(f"    {line}\n" for line in body)
