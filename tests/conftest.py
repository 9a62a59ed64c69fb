from __future__ import annotations

import os
from pathlib import Path

import pytest

from coevo.zoo.tiny import perturbed_copy, save_tiny_llama


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | list[Path]]:
    """A real tiny Llama base and three experts (base plus distinct noise), on disk."""
    root = tmp_path_factory.mktemp("tiny_models")
    base = save_tiny_llama(root / "base", seed=0)
    experts = [perturbed_copy(base, root / f"expert{i}", seed=i + 1) for i in range(3)]
    return {"base": base, "experts": experts}


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real embedded zoo, built once per test run (a few minutes on 2 cores).

    Set COEVO_TEST_ZOO to a directory to reuse a zoo across runs while developing.
    """
    from coevo.zoo.build import ensure_zoo

    cached = os.environ.get("COEVO_TEST_ZOO")
    target = Path(cached) if cached else tmp_path_factory.mktemp("zoo") / "zoo"
    return ensure_zoo(target, seed=0, runner_kind="process")
