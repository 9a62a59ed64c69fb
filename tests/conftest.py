from __future__ import annotations

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
