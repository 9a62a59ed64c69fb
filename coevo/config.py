"""The session config: one TOML file, validated at the edge with one-line errors.

Every field has a default that works on a laptop with the embedded zoo, so an empty file (or
no file) is the quickstart. `coevo launch --print-config` shows the resolved values.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from sandbox.runner import Runner


class ConfigError(ValueError):
    """The config file is missing, unparsable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ZooConfig(_Section):
    """The embedded tiny zoo, used when [models] names no base model."""

    dir: str = Field("", description="where the zoo is built / cached; '' = ~/.cache/coevo/zoo-s<seed>")
    seed: int = Field(0, description="the zoo is deterministic given this seed")


class ModelsConfig(_Section):
    """The models to merge. Empty base = the embedded zoo (its base and experts)."""

    base: str = Field("", description="seed model M0: a local HF model dir")
    experts: list[str] = Field(default_factory=list, description="candidate models (dirs); task vectors are expert - base")
    include: str = Field("", description="regex of parameter names to merge ('' = all); others stay as in base")
    tasks: str = Field("", description="tasks dir: <skill>/dev.jsonl and <skill>/test.jsonl with prompt/answer rows")

    @model_validator(mode="after")
    def _experts_need_base(self) -> ModelsConfig:
        if self.experts and not self.base:
            raise ValueError("models.experts given without models.base")
        if self.base and len(self.experts) < 1:
            raise ValueError("models.base given without models.experts")
        if self.base and not self.tasks:
            raise ValueError("models.base given without models.tasks (a tasks dir with <skill>/dev.jsonl)")
        return self


class GeneratorConfig(_Section):
    """The algorithm-writing LLM and how it is sampled."""

    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    model: str = Field("", description="model dir (transformers/vllm) or served model name (openai); '' = zoo generator")
    base_url: str = Field("", description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    api_key: str = ""
    device: str = "cpu"
    programs_per_iteration: int = Field(64, ge=1)
    temperature_start: float = Field(1.0, gt=0, description="paper: 1.2")
    temperature_end: float = Field(0.85, gt=0, description="reached at the last iteration (linear decay)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(320, ge=16)
    exemplars: int = Field(2, ge=0, description="top archive algorithms shown in the prompt")
    prompts_dir: str = Field("", description="'' = the repository's prompts/")


class SessionConfig(_Section):
    iterations: int = Field(2, ge=1)


class SandboxConfig(_Section):
    runner: Literal["auto", "docker", "process"] = Field(
        "auto", description="auto = Docker when a daemon is reachable, else process"
    )
    timeout_s: float = Field(60.0, gt=0)
    memory_mb: int = Field(2048, ge=128)
    workers: int = Field(2, ge=1, description="programs executed in parallel")
    pool_size: int = Field(2, ge=0, description="warm Docker containers; 0 = a cold container per job")
    jobs_per_container: int = Field(50, ge=1, description="a warm container is replaced after this many jobs")
    cpus: float = Field(1.0, gt=0, description="CPU quota per container")
    scratch_mb: int = Field(64, ge=1, description="size of each container's /tmp tmpfs")
    docker_runtime: str = Field("", description="'' = Docker's default; 'runsc' for gVisor")
    gpus: str = Field("", description="'' = none; 'all' or a count: GPUs passed to the containers")

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, value: str) -> str:
        if value not in ("", "all") and not (value.isdigit() and int(value) > 0):
            raise ValueError("must be 'all' or a positive count such as '1'")
        return value

    def make_runner(self, scratch_dir: Path | None = None) -> Runner:
        """The sandbox runner these settings describe (see `sandbox.runner.make_runner`)."""
        from sandbox.runner import SandboxLimits, make_runner

        limits = SandboxLimits(timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        return make_runner(
            self.runner,
            limits,
            pool_size=self.pool_size,
            jobs_per_container=self.jobs_per_container,
            cpus=self.cpus,
            scratch_mb=self.scratch_mb,
            runtime=self.docker_runtime or None,
            gpus=self.gpus or None,
            scratch_dir=scratch_dir,
        )


class JudgeConfig(_Section):
    max_new_tokens: int = Field(8, ge=1)
    batch_size: int = Field(256, ge=1)
    device: str = "cpu"


class DPOConfigSection(_Section):
    enabled: bool = True
    top_frac: float = Field(0.1, gt=0, le=1, description="chosen = top fraction by dev score (paper: 0.03)")
    bottom_frac: float = Field(0.25, gt=0, le=1, description="rejected = bottom fraction (paper: 0.10)")
    max_pairs: int = Field(256, ge=1)
    beta: float = Field(0.1, gt=0, description="paper: 0.01 with LoRA rank 256 on 7B")
    learning_rate: float = Field(5e-5, gt=0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    lora_rank: int = Field(0, ge=0, description="0 = full fine-tune (tiny models); paper: 256")
    max_length: int = Field(1024, ge=64)


class ReportConfig(_Section):
    top_k: int = Field(5, ge=1, description="best algorithms re-scored on the test split")


class Config(_Section):
    mode: Literal["selfdev"] = "selfdev"
    seed: int = 0
    zoo: ZooConfig = ZooConfig()
    models: ModelsConfig = ModelsConfig()
    generator: GeneratorConfig = GeneratorConfig()
    session: SessionConfig = SessionConfig()
    sandbox: SandboxConfig = SandboxConfig()
    judge: JudgeConfig = JudgeConfig()
    dpo: DPOConfigSection = DPOConfigSection()
    report: ReportConfig = ReportConfig()


def _first_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {message}{more}"


def parse_config(data: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error(err, source)) from None


def load_config(path: Path | None) -> Config:
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
    return parse_config(data, str(path))
