"""Tests of the population operators: rendered programs run through the real policy, the
sandbox's restricted loader, the merge engine and the process runner, on real tiny models."""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from agents.operators import (
    MUTATION_KINDS,
    Mutation,
    child_program,
    crossover_program,
    crossover_weights,
    mutation_program,
    tensor_seed,
)
from merging.apply import MergeOutputInvalid, merge_models
from merging.io import open_weights
from sandbox.harness import load_program
from sandbox.jobs import MergeJob
from sandbox.policy import check_program
from sandbox.process_runner import ProcessRunner
from sandbox.restricted import load_function, restricted_globals

# A merge program as an LLM writes one: helpers, constants, comments, docstrings.
TIES_LIKE = '''"""TIES-style merge: trim small entries, elect a sign per entry, average the agreeing."""
import torch

DENSITY = 0.3
SCALE = 1.0


def trim(tensor, density):
    # Keep only the largest-magnitude entries.
    k = max(1, int(density * tensor.numel()))
    threshold = tensor.abs().flatten().kthvalue(tensor.numel() - k + 1).values
    return torch.where(tensor.abs() >= threshold, tensor, torch.zeros_like(tensor))


def merge(task_vectors, *, name, base):
    """Trim, elect, disjoint mean."""
    trimmed = torch.stack([trim(tv, DENSITY) for tv in task_vectors])
    sign = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return SCALE * total / count
'''

# Refers to `merge` by name (recursion) and already uses both names child_program adds.
CLASHING = """import torch


def mutate(tensor):
    return tensor * 0.5


def merge(task_vectors, *, name, base):
    if len(task_vectors) > 2:
        crossover_step = merge(task_vectors[:2], name=name, base=base)
        return merge([crossover_step, task_vectors[2]], name=name, base=base)
    return mutate(task_vectors[0] + task_vectors[-1])
"""

MUTATIONS = [Mutation(kind, seed=7) for kind in MUTATION_KINDS if kind != "none"]


def _load(source: str, function: str = "merge") -> Callable[..., Any]:
    """`function` from `source`, loaded the way the sandbox harness loads programs."""
    assert check_program(source).ok, check_program(source)
    return load_function(source, restricted_globals(), function, "program")


def _merge(tiny_models: dict, source: str, out: Path) -> dict[str, torch.Tensor]:
    """Apply `source` to the tiny base and its three experts; the written weights by name."""
    merge_models(load_program(source), tiny_models["base"], tiny_models["experts"], out)
    return _read(out)


def _read(model_dir: Path) -> dict[str, torch.Tensor]:
    with open_weights(model_dir) as weights:
        return {name: weights.get(name) for name in weights.names()}


def _task_vectors(
    tiny_models: dict,
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = _read(tiny_models["base"])
    experts = [_read(d) for d in tiny_models["experts"]]
    return base, [{n: e[n] - base[n] for n in base} for e in experts]


def _weighted_sum(weights: list[float], task_vectors: list[torch.Tensor]) -> torch.Tensor:
    merged = torch.zeros_like(task_vectors[0])
    for weight, tv in zip(weights, task_vectors, strict=True):
        merged = merged + weight * tv
    return merged


def _svd_noise_reference(
    merged: torch.Tensor, base: torch.Tensor, name: str, m: Mutation
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(tensor_seed(m.seed, name))
    u, s, vh = torch.linalg.svd(base + merged, full_matrices=False)
    k = min(m.top_k, s.shape[0])
    s = torch.cat([s[:k] + torch.randn(k, generator=generator) * m.sigma, s[k:]]).clamp(min=0)
    return (u * s) @ vh - base


def _svd_scale_reference(merged: torch.Tensor, name: str, m: Mutation) -> torch.Tensor:
    generator = torch.Generator().manual_seed(tensor_seed(m.seed, name))
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    return (u * (s * torch.rand(s.shape[0], generator=generator) * m.w_max)) @ vh


# crossover_weights


def test_crossover_weights_sum_to_one_and_are_deterministic() -> None:
    for seed in range(20):
        weights = crossover_weights(3, random.Random(seed))
        assert len(weights) == 3
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
        assert weights == crossover_weights(3, random.Random(seed))
    assert crossover_weights(3, random.Random(0)) != crossover_weights(3, random.Random(1))


def test_crossover_weights_allow_negatives_and_one_parent_gets_everything() -> None:
    draws = [w for seed in range(200) for w in crossover_weights(3, random.Random(seed))]
    assert min(draws) < 0 < max(draws)
    assert crossover_weights(1, random.Random(0)) == [1.0]


def test_crossover_weights_redraw_when_the_sum_is_near_zero() -> None:
    def first_draw(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [rng.gauss(1.0, 3.0) for _ in range(2)]

    # A seed whose first draw of two N(1, 3^2) weights sums to under 0.1 * 2 * 1.
    seed = next(s for s in range(10_000) if abs(sum(first_draw(s))) < 0.2)
    tiny = first_draw(seed)
    weights = crossover_weights(2, random.Random(seed), sigma=3.0)
    assert weights != [w / sum(tiny) for w in tiny]
    assert sum(weights) == pytest.approx(1.0)
    # Every kept draw sums to at least 0.2 in magnitude, which bounds the weights.
    for s in range(500):
        draw = first_draw(s)
        if abs(sum(draw)) >= 0.2:
            assert crossover_weights(2, random.Random(s), sigma=3.0) == [
                w / sum(draw) for w in draw
            ]


@pytest.mark.parametrize(
    ("n_parents", "kwargs", "message"),
    [
        (0, {}, "at least one parent"),
        (2, {"mu": 0.0}, "mu must be a positive"),
        (2, {"sigma": -1.0}, "sigma must be"),
    ],
)
def test_crossover_weights_reject_bad_parameters(
    n_parents: int, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        crossover_weights(n_parents, random.Random(0), **kwargs)


# Rendering and the policy


def test_every_rendered_program_passes_the_policy() -> None:
    crossovers = [crossover_program(w) for w in ([1.0], [0.5, 0.5], [1.7, -0.2, -0.5])]
    for crossover in crossovers:
        assert check_program(crossover).ok, check_program(crossover)
        for mutation in [*MUTATIONS, Mutation("svd_noise", seed=-3, top_k=1, sigma=0.0)]:
            child = child_program(crossover, mutation)
            assert check_program(child).ok, (mutation, check_program(child))
    for mutation in MUTATIONS:
        source = mutation_program(mutation)
        assert source is not None
        standalone = (
            source
            + "\n\ndef merge(task_vectors, *, name, base):\n    return mutate(task_vectors[0], name=name, base=base)\n"
        )
        assert check_program(standalone).ok, check_program(standalone)
    assert mutation_program(Mutation("none", seed=0)) is None


def test_crossover_program_writes_exact_weights_and_checks_the_parent_count() -> None:
    weights = [0.1 + 0.2, -1 / 3, 1e-17, 1.0000000000000002]
    source = crossover_program(weights)
    assign = next(n for n in ast.parse(source).body if isinstance(n, ast.Assign))
    assert ast.literal_eval(assign.value) == weights
    merge = _load(source)
    with pytest.raises(ValueError, match="crossover has 4 weights but got 2 task vectors"):
        merge([torch.zeros(3), torch.zeros(3)], name="x", base=torch.zeros(3))
    with pytest.raises(ValueError, match="at least one weight"):
        crossover_program([])
    with pytest.raises(ValueError, match="must be finite"):
        crossover_program([0.5, float("nan")])


def test_mutation_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="unknown mutation kind 'svd'; choose one of"):
        Mutation("svd", seed=0)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        Mutation("svd_noise", seed=0, sigma=-0.1)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        Mutation("svd_noise", seed=0, top_k=0)
    with pytest.raises(ValueError, match="seed must be an int"):
        Mutation("gaussian", seed=1.5)  # type: ignore[arg-type]


def test_child_program_keeps_a_generated_programs_logic(tiny_models: dict) -> None:
    base, task_vectors = _task_vectors(tiny_models)
    original = _load(TIES_LIKE)
    for mutation in MUTATIONS:
        child = child_program(TIES_LIKE, mutation)
        assert "DENSITY = 0.3" in child and "def trim(tensor, density)" in child
        crossover_step = _load(child, "crossover_step")
        mutate = _load(child, "mutate")
        merge = _load(child)
        for name in ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight"]:
            tvs = [tv[name] for tv in task_vectors]
            expected = original(tvs, name=name, base=base[name])
            assert torch.equal(crossover_step(tvs, name=name, base=base[name]), expected)
            mutated = mutate(expected, name=name, base=base[name])
            assert torch.equal(merge(tvs, name=name, base=base[name]), mutated)
    assert child_program(TIES_LIKE, None) == TIES_LIKE
    assert child_program(TIES_LIKE, Mutation("none", seed=1)) == TIES_LIKE


def test_child_program_renames_merge_references_and_avoids_name_clashes() -> None:
    mutation = Mutation("svd_scale", seed=2)
    child = child_program(CLASHING, mutation)
    assert check_program(child).ok, check_program(child)
    assert "def crossover_step_1(task_vectors, *, name, base)" in child
    assert "def mutate_1(merged, *, name, base)" in child
    tvs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    base = torch.zeros(5, 4)
    expected = _load(CLASHING)(tvs, name="w", base=base)
    assert torch.equal(_load(child, "crossover_step_1")(tvs, name="w", base=base), expected)
    assert torch.allclose(
        _load(child)(tvs, name="w", base=base), _svd_scale_reference(expected, "w", mutation)
    )
    # A child bred again: its merge becomes the grandchild's crossover, under the next free name.
    grandchild = child_program(child, Mutation("gaussian", seed=3))
    assert check_program(grandchild).ok, check_program(grandchild)
    assert torch.equal(
        _load(grandchild, "crossover_step_2")(tvs, name="w", base=base),
        _load(child)(tvs, name="w", base=base),
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "import torch\n\ndef blend(task_vectors, *, name, base):\n    return task_vectors[0]\n",
            "has no top-level 'def merge",
        ),
        ("def merge(task_vectors, *, name, base):\n    return (\n", "does not parse"),
        (
            "def merge(task_vectors, name, base):\n    return task_vectors[0]\n",
            "must be 'def merge(task_vectors, *, name, base)'",
        ),
        (
            "def merge(t, *, name, base):\n    return t[0]\n\ndef merge(t, *, name, base):\n    return t[1]\n",
            "has 2 top-level",
        ),
    ],
)
def test_child_program_rejects_a_crossover_without_a_usable_merge(
    source: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        child_program(source, Mutation("gaussian", seed=0))
    assert "\n" not in str(err.value)


# Weights, against direct torch references


def test_crossover_matches_a_torch_reference(tiny_models: dict, tmp_path: Path) -> None:
    weights = crossover_weights(3, random.Random(4))
    out = _merge(tiny_models, crossover_program(weights), tmp_path / "child")
    base, task_vectors = _task_vectors(tiny_models)
    for name, tensor in out.items():
        reference = base[name] + _weighted_sum(weights, [tv[name] for tv in task_vectors])
        assert torch.equal(tensor, reference), name


def test_svd_noise_perturbs_the_top_singular_values_of_matrices_only(
    tiny_models: dict, tmp_path: Path
) -> None:
    weights = [0.5, 0.3, 0.2]
    mutation = Mutation("svd_noise", seed=11, top_k=8)
    crossed = _merge(tiny_models, crossover_program(weights), tmp_path / "crossed")
    child = _merge(
        tiny_models, child_program(crossover_program(weights), mutation), tmp_path / "child"
    )
    base = _read(tiny_models["base"])
    matrices = [n for n in base if base[n].dim() == 2]
    assert matrices and len(matrices) < len(base)
    for name in base:
        if base[name].dim() != 2:
            assert torch.equal(child[name], crossed[name]), name
            continue
        merged = crossed[name] - base[name]
        reference = base[name] + _svd_noise_reference(merged, base[name], name, mutation)
        assert torch.allclose(child[name], reference, atol=1e-5), name
        assert not torch.allclose(child[name], crossed[name], atol=1e-3), name
        # Past the top 8, the spectrum of base + merged survives as it was.
        before = torch.linalg.svdvals(crossed[name])
        after = torch.linalg.svdvals(child[name])
        for value in before[8:]:
            assert (after - value).abs().min() < 1e-4, name


def test_svd_scale_keeps_singular_values_within_w_max_times(
    tiny_models: dict, tmp_path: Path
) -> None:
    weights = [0.2, 0.5, 0.3]
    mutation = Mutation("svd_scale", seed=5, w_max=2.0)
    crossed = _merge(tiny_models, crossover_program(weights), tmp_path / "crossed")
    child = _merge(
        tiny_models, child_program(crossover_program(weights), mutation), tmp_path / "child"
    )
    base = _read(tiny_models["base"])
    for name in base:
        if base[name].dim() != 2:
            assert torch.equal(child[name], crossed[name]), name
            continue
        merged = crossed[name] - base[name]
        mutated = child[name] - base[name]
        reference = _svd_scale_reference(merged, name, mutation)
        assert torch.allclose(mutated, reference, atol=1e-5), name
        # Each singular value scaled by a factor in [0, w_max]: the k-th largest of the result
        # is at most w_max times the k-th largest of the input.
        before, after = torch.linalg.svdvals(merged), torch.linalg.svdvals(mutated)
        assert bool((after <= mutation.w_max * before + 1e-4).all()), name
        assert not torch.allclose(after, before, atol=1e-4), name


def test_gaussian_noise_has_the_configured_relative_std(tiny_models: dict, tmp_path: Path) -> None:
    weights = [0.4, 0.4, 0.2]
    mutation = Mutation("gaussian", seed=9, gauss_sigma=0.5)
    crossed = _merge(tiny_models, crossover_program(weights), tmp_path / "crossed")
    child = _merge(
        tiny_models, child_program(crossover_program(weights), mutation), tmp_path / "child"
    )
    base = _read(tiny_models["base"])
    for name in base:
        assert not torch.equal(child[name], crossed[name]), name  # vectors too
        if base[name].numel() >= 4096:
            noise = child[name] - crossed[name]
            expected = 0.5 * float((crossed[name] - base[name]).std(correction=0))
            assert float(noise.std()) == pytest.approx(expected, rel=0.1), name
            assert abs(float(noise.mean())) < 0.1 * expected, name
    mutate = _load(child_program(crossover_program([1.0]), mutation), "mutate")
    zeros = torch.zeros(4, 3)
    assert torch.equal(mutate(zeros, name="x", base=zeros), zeros)


def test_mutation_passes_a_bad_crossover_result_to_the_engine(
    tiny_models: dict, tmp_path: Path
) -> None:
    wrong_shape = (
        "import torch\n\ndef merge(task_vectors, *, name, base):\n    return torch.zeros(3)\n"
    )
    with pytest.raises(MergeOutputInvalid, match=r"shape \(3,\)"):
        _merge(
            tiny_models, child_program(wrong_shape, Mutation("svd_noise", seed=0)), tmp_path / "x"
        )


# Determinism


def test_children_are_bit_identical_per_seed_and_differ_across_seeds(
    tiny_models: dict, tmp_path: Path
) -> None:
    crossover = crossover_program([0.6, 0.6, -0.2])
    for kind in ("svd_noise", "svd_scale", "gaussian"):
        first = _merge(
            tiny_models, child_program(crossover, Mutation(kind, seed=1)), tmp_path / f"{kind}1"
        )
        again = _merge(
            tiny_models, child_program(crossover, Mutation(kind, seed=1)), tmp_path / f"{kind}2"
        )
        other = _merge(
            tiny_models, child_program(crossover, Mutation(kind, seed=2)), tmp_path / f"{kind}3"
        )
        assert all(torch.equal(first[n], again[n]) for n in first), kind
        matrices = [n for n in first if first[n].dim() == 2]
        assert all(not torch.equal(first[n], other[n]) for n in matrices), kind


def test_noise_depends_on_the_name_not_on_visiting_order() -> None:
    shape = (16, 12)
    tvs = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    base = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    names = [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "lm_head.weight",
    ]
    for mutation in MUTATIONS:
        source = child_program(crossover_program([0.5, 0.5]), mutation)
        forward = _load(source)
        backward = _load(source)
        ahead = {n: forward(tvs, name=n, base=base) for n in names}
        behind = {n: backward(tvs, name=n, base=base) for n in reversed(names)}
        assert all(torch.equal(ahead[n], behind[n]) for n in names), mutation.kind
        # Same inputs, different names: different noise.
        assert not torch.equal(ahead[names[0]], ahead[names[1]]), mutation.kind
    assert tensor_seed(1, "a") != tensor_seed(2, "a") != tensor_seed(2, "b")
    assert 0 <= tensor_seed(-5, "x" * 1000) < 2**63


# Through the real sandbox


def test_a_child_runs_in_the_process_sandbox(tiny_models: dict, tmp_path: Path) -> None:
    child = child_program(TIES_LIKE, Mutation("svd_noise", seed=3))
    result = ProcessRunner().run(
        MergeJob(child, tiny_models["base"], list(tiny_models["experts"]), tmp_path / "sandboxed")
    )
    assert result.verdict == "ok", result
    in_process = _merge(tiny_models, child, tmp_path / "in_process")
    sandboxed = _read(tmp_path / "sandboxed")
    assert sandboxed.keys() == in_process.keys()
    for name, tensor in sandboxed.items():
        assert torch.allclose(tensor, in_process[name], atol=1e-5), name
