"""Crossover and mutation for population modes (AC/DC, CycleQD), rendered as merge programs.

Breeding must run inside the sandbox like any generated program, so each operator here is a
function that writes program *text*, never one that touches weights. A child is one merge
program: the crossover (a weighted sum of the parents' task vectors, or any generated merge
program) followed by a mutation of its result, tensor by tensor:

    child = child_program(crossover_program(crossover_weights(3, rng)), Mutation("svd_noise", 7))
    runner.run(MergeJob(child, base_dir, parent_dirs, out_dir))

Mutations draw their noise from a `torch.Generator` seeded from the mutation's seed and the
parameter's name, so a child's weights are the same whatever order tensors are visited in and
whichever process runs it. `tensor_seed` is that derivation in plain Python, for references.
"""

from __future__ import annotations

import ast
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from agents.config import PopulationConfig
from merging import contract

MUTATION_KINDS = ("svd_noise", "svd_scale", "gaussian", "none")

# The per-tensor seed is a polynomial hash of the name modulo the Mersenne prime 2**61 - 1:
# pure Python (the builtin `hash` is salted per process) and below 2**63, which
# `torch.Generator.manual_seed` accepts.
SEED_MODULUS = 2**61 - 1
SEED_MULTIPLIER = 1_000_003

# AC/DC and CycleQD breed from one draw per parent; a draw whose sum is near zero would blow
# the normalised weights up, so it is redrawn. Past this many draws the parameters are unusable.
MAX_CROSSOVER_DRAWS = 1000
# Generated algorithms are drawn "by score": softmax over dev scores (in [0, 1]) at this
# temperature, so a 10-point better algorithm is drawn e times more often (CycleQD).
ALGORITHM_SAMPLING_TEMPERATURE = 0.1


@dataclass(frozen=True)
class Mutation:
    """One mutation of a child's merged task vector, applied tensor by tensor.

    - `svd_noise` (AC/DC): N(0, sigma^2) noise on the top-`top_k` singular values of each
      weight matrix (base + merged), clamped at zero.
    - `svd_scale` (CycleQD): every singular value of each merged task-vector matrix scaled by
      its own U[0, w_max] draw (`top_k` is not used: CycleQD scales them all).
    - `gaussian`: a control that perturbs entries rather than the spectrum: every floating
      tensor gets N(0, (gauss_sigma * std)^2) noise, std being the tensor's own (population)
      std, so one setting suits layers whose task vectors differ in scale by orders of
      magnitude. 0.5 is our choice, not either paper's.
    - `none`: the child is the crossover.

    SVD kinds leave tensors that are not 2-D unchanged.
    """

    kind: str
    seed: int
    top_k: int = 256
    sigma: float = 0.25
    w_max: float = 2.0
    gauss_sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in MUTATION_KINDS:
            raise ValueError(
                f"unknown mutation kind {self.kind!r}; choose one of: {', '.join(MUTATION_KINDS)}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"mutation seed must be an int, got {self.seed!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"mutation top_k must be an int >= 1, got {self.top_k!r}")
        for field, value in (
            ("sigma", self.sigma),
            ("w_max", self.w_max),
            ("gauss_sigma", self.gauss_sigma),
        ):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"mutation {field} must be a finite number >= 0, got {value!r}")


def crossover_weights(
    n_parents: int, rng: random.Random, *, mu: float = 1.0, sigma: float = 0.5
) -> list[float]:
    """AC/DC & CycleQD crossover weights: one per parent for the whole model.

    Draws w_i ~ N(mu, sigma^2) and normalises them to sum 1; weights may be negative
    (extrapolation). A draw whose sum is below 0.1 * n_parents * mu in magnitude is redrawn so
    normalisation cannot explode. Deterministic given `rng`'s state.
    """
    if n_parents < 1:
        raise ValueError(f"crossover needs at least one parent, got n_parents={n_parents}")
    if not (math.isfinite(mu) and mu > 0):
        raise ValueError(f"crossover mu must be a positive finite number, got {mu!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"crossover sigma must be a finite number >= 0, got {sigma!r}")
    min_sum = 0.1 * n_parents * mu
    for _ in range(MAX_CROSSOVER_DRAWS):
        draws = [rng.gauss(mu, sigma) for _ in range(n_parents)]
        total = math.fsum(draws)
        if abs(total) >= min_sum:
            return [w / total for w in draws]
    raise ValueError(
        f"crossover weights N({mu}, {sigma}^2) summed to under {min_sum:g} in "
        f"{MAX_CROSSOVER_DRAWS} draws: lower sigma or raise mu"
    )


def crossover_program(weights: Sequence[float]) -> str:
    """Source of a merge program returning sum_i weights[i] * task_vectors[i].

    The weights are written as repr-exact float literals; the program raises ValueError when it
    is given a different number of task vectors.
    """
    if not weights:
        raise ValueError("crossover_program needs at least one weight")
    values = [float(w) for w in weights]
    bad = [w for w in values if not math.isfinite(w)]
    if bad:
        raise ValueError(f"crossover weights must be finite, got {bad[0]!r}")
    literal = "[" + ", ".join(repr(w) for w in values) + "]"
    return f'''"""Crossover (AC/DC, CycleQD): a fixed weighted sum of the parents' task vectors."""

import torch

WEIGHTS = {literal}


{contract.SIGNATURE}:
    if len(task_vectors) != len(WEIGHTS):
        raise ValueError(
            "crossover has " + str(len(WEIGHTS)) + " weights but got "
            + str(len(task_vectors)) + " task vectors"
        )
    merged = torch.zeros_like(base)
    for weight, task_vector in zip(WEIGHTS, task_vectors):
        merged = merged + weight * task_vector
    return merged
'''


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed a mutation uses for parameter `name` (the programs inline this)."""
    state = seed % SEED_MODULUS
    for char in name:
        state = (state * SEED_MULTIPLIER + ord(char)) % SEED_MODULUS
    return state


def mutation_program(mutation: Mutation) -> str | None:
    """Source defining `def mutate(merged, *, name, base)`; None for kind 'none'."""
    return _mutation_source(mutation, "mutate")


def child_program(crossover_source: str, mutation: Mutation | None) -> str:
    """One merge program: `crossover_source`'s merge, then `mutation` on its result.

    `crossover_source` is any merge program (`crossover_program`'s or a generated one). Its
    top-level `merge` is renamed `crossover_step` (every reference to the name `merge` with
    it), the mutation's `mutate` is appended, and a new `merge` chains the two. Either name
    gets a numeric suffix when the crossover already uses it. Without a mutation (None or kind
    'none') the crossover is returned unchanged. Comments of the crossover are not kept (it is
    rewritten from its AST); its docstrings are.
    """
    tree = _parse_crossover(crossover_source)
    if mutation is None or mutation.kind == "none":
        return crossover_source
    taken = set(_names(tree))
    crossover_name = _fresh("crossover_step", taken)
    mutate_name = _fresh("mutate", taken)
    for node in ast.walk(tree):
        _rename(node, contract.FUNCTION, crossover_name)
    mutate_source = _mutation_source(mutation, mutate_name)
    assert mutate_source is not None
    return f'''{ast.unparse(tree)}


{mutate_source}

{contract.SIGNATURE}:
    """The child: the crossover's merged task vector, mutated."""
    merged = {crossover_name}(task_vectors, name=name, base=base)
    return {mutate_name}(merged, name=name, base=base)
'''


def _parse_crossover(source: str) -> ast.Module:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as err:
        line = getattr(err, "lineno", None)
        where = f" (line {line})" if line else ""
        raise ValueError(
            f"crossover source does not parse: {getattr(err, 'msg', err)}{where}"
        ) from None
    merges = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == contract.FUNCTION]
    if len(merges) != 1:
        found = "no" if not merges else f"{len(merges)}"
        raise ValueError(f"crossover source has {found} top-level '{contract.SIGNATURE}'")
    # Renamed, the crossover's merge escapes the policy's contract check; a wrong signature
    # would otherwise surface as a runtime TypeError in the child.
    args = merges[0].args
    if (
        len(args.posonlyargs + args.args) != len(contract.POSITIONAL)
        or {a.arg for a in args.kwonlyargs} != set(contract.KEYWORD_ONLY)
        or args.vararg is not None
        or args.kwarg is not None
    ):
        raise ValueError(f"crossover merge (line {merges[0].lineno}) must be '{contract.SIGNATURE}'")
    return tree


def _names(tree: ast.AST) -> Iterator[str]:
    """Every identifier the program binds or reads (attribute names excluded)."""
    for node in ast.walk(tree):
        for field in _IDENTIFIER_FIELDS.get(type(node), ()):
            value = getattr(node, field)
            if isinstance(value, str):
                yield value


def _rename(node: ast.AST, old: str, new: str) -> None:
    for field in _IDENTIFIER_FIELDS.get(type(node), ()):
        if getattr(node, field) == old:
            setattr(node, field, new)


# Fields holding variable names, in every node kind that has one: renaming all of them renames
# a name consistently in every scope (attributes such as `x.merge` are not variables).
_IDENTIFIER_FIELDS: dict[type[ast.AST], tuple[str, ...]] = {
    ast.Name: ("id",),
    ast.arg: ("arg",),
    ast.keyword: ("arg",),
    ast.FunctionDef: ("name",),
    ast.AsyncFunctionDef: ("name",),
    ast.ClassDef: ("name",),
    ast.alias: ("asname",),
    ast.ExceptHandler: ("name",),
    ast.MatchAs: ("name",),
    ast.MatchStar: ("name",),
    ast.MatchMapping: ("rest",),
}


def _fresh(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    suffix = 1
    while f"{name}_{suffix}" in taken:
        suffix += 1
    return f"{name}_{suffix}"


def _mutation_source(mutation: Mutation, function: str) -> str | None:
    if mutation.kind == "none":
        return None
    m = mutation
    body, doc = {
        "svd_noise": (
            _SVD_NOISE,
            f"AC/DC mutation (seed {m.seed}): N(0, {m.sigma!r}^2) noise on the top {m.top_k} "
            "singular values of each weight matrix",
        ),
        "svd_scale": (
            _SVD_SCALE,
            f"CycleQD mutation (seed {m.seed}): each singular value of each task-vector matrix "
            f"scaled by U[0, {m.w_max!r}]",
        ),
        "gaussian": (
            _GAUSSIAN,
            f"Control mutation (seed {m.seed}): N(0, ({m.gauss_sigma!r} * std)^2) noise, std "
            "being the tensor's own",
        ),
    }[m.kind]
    # The templates hold no braces but their fields; repr keeps floats exact.
    return (_PROLOGUE + body).format(
        function=function,
        doc=doc,
        seed=repr(mutation.seed),
        modulus=repr(SEED_MODULUS),
        multiplier=repr(SEED_MULTIPLIER),
        top_k=repr(mutation.top_k),
        sigma=repr(float(mutation.sigma)),
        w_max=repr(float(mutation.w_max)),
        gauss_sigma=repr(float(mutation.gauss_sigma)),
    )


# The shared start of every mutation. Anything the engine would reject passes through
# untouched, so the child's verdict (output_invalid) names the crossover's fault rather than a
# crash inside the mutation. The seed loop must match `tensor_seed`.
_PROLOGUE = '''import torch


def {function}(merged, *, name, base):
    """{doc}."""
    if (
        not isinstance(merged, torch.Tensor)
        or merged.shape != base.shape
        or not merged.is_floating_point()
        or not bool(torch.isfinite(merged).all())
    ):
        return merged
    # A seed per parameter name (the builtin hash is salted per process): the same noise
    # whatever order the tensors are visited in.
    state = {seed} % {modulus}
    for char in name:
        state = (state * {multiplier} + ord(char)) % {modulus}
    generator = torch.Generator().manual_seed(state)
'''

_SVD_NOISE = """    if merged.dim() != 2:
        return merged
    weight = base + merged
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    k = min({top_k}, s.shape[0])
    noise = torch.randn(k, generator=generator).to(device=s.device, dtype=s.dtype) * {sigma}
    s = torch.cat([s[:k] + noise, s[k:]]).clamp(min=0.0)
    return (u * s) @ vh - base
"""

_SVD_SCALE = """    if merged.dim() != 2:
        return merged
    u, s, vh = torch.linalg.svd(merged.to(base.dtype), full_matrices=False)
    scale = torch.rand(s.shape[0], generator=generator).to(device=s.device, dtype=s.dtype)
    return (u * (s * scale * {w_max})) @ vh
"""

_GAUSSIAN = """    # Population std (correction=0): a one-element tensor has std 0, not NaN.
    std = float(merged.std(correction=0)) if merged.numel() > 0 else 0.0
    if std == 0.0:
        return merged
    noise = torch.randn(merged.shape, generator=generator)
    return merged + noise.to(device=merged.device, dtype=merged.dtype) * ({gauss_sigma} * std)
"""


def describe_operators(mode: str, p: PopulationConfig) -> str:
    """What bred a generation's children, archived as the children's 'prompt' (by hash)."""
    return (f"{mode} operators: crossover={p.crossover}"
            + (f"(mu={p.crossover_mu}, sigma={p.crossover_sigma})" if p.crossover == "paper" else f"({p.algorithm})")
            + f", mutation={p.mutation}(top_k={p.svd_top_k}, sigma={p.svd_sigma}, w_max={p.w_max}, gauss_sigma={p.gauss_sigma})"
            + f", parents={p.parents}")


def describe_mutation(mutation: Mutation) -> str:
    """A mutation as the archive records it (`models.mutation`)."""
    if mutation.kind == "svd_noise":
        return f"svd_noise(top_k={mutation.top_k}, sigma={mutation.sigma}, seed={mutation.seed})"
    if mutation.kind == "svd_scale":
        return f"svd_scale(w_max={mutation.w_max}, seed={mutation.seed})"
    if mutation.kind == "gaussian":
        return f"gaussian(sigma={mutation.gauss_sigma}, seed={mutation.seed})"
    return "none"


def pick_algorithm(algorithms: list[dict[str, Any]], how: str, rng: random.Random) -> dict[str, Any]:
    """A generated merge algorithm to use as crossover (rows with `dev_score`, best first): the
    best, or one sampled by softmax of dev score."""
    if how == "best":
        return algorithms[0]
    top = max(a["dev_score"] for a in algorithms)
    weights = [math.exp((a["dev_score"] - top) / ALGORITHM_SAMPLING_TEMPERATURE) for a in algorithms]
    return rng.choices(algorithms, weights=weights, k=1)[0]
