"""The example configs validate, and compose.yaml serves what they point at."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from coevo.config import ConfigError, load_config
from coevo.session import make_writer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.toml"))


def served() -> dict[int, str]:
    """host port -> served model name, from compose.yaml."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    out = {}
    for service in compose["services"].values():
        name = next(a.split("=", 1)[1] for a in service["command"] if a.startswith("--served-model-name="))
        for port in service["ports"]:
            host, container = port.split(":")
            assert container == "8000"
            out[int(host)] = name
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    return out


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_validate_and_match_compose(path: Path) -> None:
    notes: list[str] = []
    config = load_config(path, notes=notes)
    assert notes == []  # the examples use the current keys
    servers = served()
    endpoints = [(config.generator.base_url, config.generator.model)]
    if config.mode != "selfdev":
        endpoints += [(config.tasks.llm.base_url, config.tasks.llm.model), (config.judge.llm.base_url, config.judge.llm.model)]
    for url, model in endpoints:
        if url:
            assert servers[urlparse(url).port] == model, (url, model)


def test_examples_are_documented() -> None:
    assert len(EXAMPLES) >= 2
    readme = (ROOT / "README.md").read_text()
    for path in EXAMPLES:
        assert f"examples/{path.name}" in readme


def test_procedural_writer_refuses_user_models(tmp_path: Path) -> None:
    config_path = tmp_path / "c.toml"
    config_path.write_text(
        'mode = "acdc"\n[models]\nbase = "/m/base"\nexperts = ["/m/e1"]\ntasks = "/m/tasks"\n'
    )
    with pytest.raises(ConfigError, match="tasks.writer = 'llm'"):
        make_writer(load_config(config_path), "s", tmp_path)
