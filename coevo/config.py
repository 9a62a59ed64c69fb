"""The session config: one TOML file, validated at the edge with one-line errors.

`Config` is the agents' `DiscoveryConfig` (every role, the sandbox, the mode) plus the
embedded zoo. Every field has a default that works on a laptop with the embedded zoo, so an
empty file (or no file) is the quickstart. `coevo launch --print-config` shows the resolved
values. Keys renamed since earlier versions are still read, with a note naming the new key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from agents.config import DiscoveryConfig, Section


class ConfigError(ValueError):
    """The config file is missing, unparsable or invalid."""


class ZooConfig(Section):
    """The embedded tiny zoo, used when [models] names no base model."""

    dir: str = Field("", description="where the zoo is built / cached; '' = ~/.cache/coevo/zoo-v<version>-s<seed>")
    seed: int = Field(0, description="the zoo is deterministic given this seed")


class Config(DiscoveryConfig):
    zoo: ZooConfig = ZooConfig()


# Renamed keys: (section, old key) -> (section path, new key). `judge.llm` was a bool.
LEGACY_KEYS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("generator", "prompts_dir"): ((), "prompts_dir"),
    ("tasks", "prompts_dir"): ((), "prompts_dir"),
    ("judge", "llm_backend"): (("judge", "llm"), "backend"),
    ("judge", "llm_model"): (("judge", "llm"), "model"),
    ("judge", "llm_base_url"): (("judge", "llm"), "base_url"),
    ("judge", "llm_api_key"): (("judge", "llm"), "api_key"),
    ("tasks", "backend"): (("tasks", "llm"), "backend"),
    ("tasks", "model"): (("tasks", "llm"), "model"),
    ("tasks", "base_url"): (("tasks", "llm"), "base_url"),
    ("tasks", "api_key"): (("tasks", "llm"), "api_key"),
    ("tasks", "device"): (("tasks", "llm"), "device"),
}


def upgrade_keys(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`data` with renamed keys moved to their new place, and a note for each one moved.

    Two old keys meaning one new key must agree (both `prompts_dir`s, say).
    """
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    notes = []
    judge = data.get("judge")
    if isinstance(judge, dict) and isinstance(judge.get("llm"), bool):
        judge["scoring"] = "llm" if judge.pop("llm") else "checker"
        notes.append("judge.llm = true/false is now judge.scoring = 'llm' / 'checker'")
    for (section, key), (path, new_key) in LEGACY_KEYS.items():
        old = data.get(section)
        if not isinstance(old, dict) or key not in old:
            continue
        value = old.pop(key)
        target = data
        for part in path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{'.'.join(path)} must be a table")
        new_name = ".".join((*path, new_key))
        if new_key in target and target[new_key] != value:
            raise ConfigError(f"{section}.{key} (now {new_name}) disagrees with {new_name}: keep one")
        target[new_key] = value
        notes.append(f"{section}.{key} is now {new_name}")
    return data, notes


def _first_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {message}{more}"


def parse_config(data: dict, source: str = "config", *, notes: list[str] | None = None) -> Config:
    """The validated config of `data`; renamed keys are read as their new ones and listed in
    `notes` when a list is given."""
    data, moved = upgrade_keys(data)
    if notes is not None:
        notes += [f"{source}: {note} (read as such; update the file)" for note in moved]
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error(err, source)) from None


def load_config(path: Path | None, *, notes: list[str] | None = None) -> Config:
    """The config at `path`, or the quickstart defaults when path is None."""
    if path is None:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_config(data, str(path), notes=notes)
