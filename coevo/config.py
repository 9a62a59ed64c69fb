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

    def make_runner(self, scratch_dir: Path | None = None, input_roots: list[Path] | None = None) -> Runner:
        """The sandbox runner these settings describe (see `sandbox.runner.make_runner`).

        `input_roots`: dirs under which every model a job reads lies (Docker mounts them
        read-only once, so one warm pool serves any parents drawn from them).
        """
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
            input_roots=input_roots or (),
        )


class JudgeConfig(_Section):
    max_new_tokens: int = Field(8, ge=1, description="answer length of the models under test")
    batch_size: int = Field(256, ge=1)
    device: str = "cpu"
    llm: bool = Field(False, description="population modes: score answers with an LLM judge (prompts/judge.md) instead of checker code")
    llm_backend: Literal["transformers", "openai", "vllm"] = "openai"
    llm_model: str = Field("", description="judge LLM (also reads answers for gibberish = 'llm' and picks best-of-N)")
    llm_base_url: str = ""
    llm_api_key: str = ""
    best_of_n: Literal["majority", "llm"] = Field("majority", description="how one answer is picked among the team's")


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


class PopulationConfig(_Section):
    """Population modes (acdc, cycleqd): how children are bred and the archive is selected.

    Unset fields (None) take the mode's default, shown by `coevo launch --mode M --print-config`.
    """

    generations: int = Field(8, ge=1, description="AC/DC paper: 50; CycleQD: 1200")
    size: int = Field(8, ge=2, description="models kept in the archive (AC/DC paper: 16)")
    children: int = Field(8, ge=1, description="children bred per generation (AC/DC paper: 8)")
    parents: int = Field(2, ge=1, description="parents per child")
    crossover: Literal["paper", "algorithm"] = Field(
        "paper", description="paper = normalised model-wise weights ~ N(mu, sigma); algorithm = a generated merge algorithm"
    )
    crossover_mu: float = 1.0
    crossover_sigma: float = Field(0.5, ge=0)
    algorithm: Literal["best", "sample"] = Field(
        "best", description="crossover = 'algorithm': the archive's best generated algorithm, or one sampled by score"
    )
    algorithms_from: str = Field(
        "", description="archive to draw generated algorithms from; '' = this workdir's archive"
    )
    mutation: Literal["svd_noise", "svd_scale", "gaussian", "none"] | None = Field(
        None, description="acdc: svd_noise (noise on top-k singular values); cycleqd: svd_scale (task-vector SVD scaled by U[0, w_max])"
    )
    svd_top_k: int = Field(4, ge=1, description="singular values perturbed per 2-D weight; paper: 256 of rank 4096 (6%), 4 of the zoo's rank 64")
    svd_sigma: float = Field(0.25, ge=0, description="svd_noise: std of the noise on each top-k singular value")
    w_max: float = Field(2.0, gt=0, description="svd_scale: singular values scaled by U[0, w_max]")
    gauss_sigma: float = Field(0.5, ge=0, description="gaussian: noise std relative to each tensor's std")
    selection: Literal["dns", "random", "map_elites"] | None = Field(
        None, description="acdc: dns (Dominated Novelty Search); cycleqd: map_elites"
    )
    dns_k: int = Field(3, ge=1, description="DNS: nearest fitter neighbours")
    bins: int = Field(15, ge=2, description="MAP-Elites bins per behaviour axis (CycleQD: 15)")
    cyclic: bool = Field(True, description="CycleQD: rotate the quality axis every generation (False = fixed)")
    elite_sampling: bool = Field(True, description="CycleQD: parents by elite sampling (False = uniform)")
    team_size: int = Field(3, ge=1, description="N of the coverage team (AC/DC: 3 or 8)")
    gibberish: Literal["heuristic", "llm", "off"] = Field(
        "heuristic", description="filter for broken children: heuristic, or an LLM reading 3 answers (judge.llm_*)"
    )


class TasksConfig(_Section):
    """The task pool of population modes and the task-writer agent that evolves it."""

    writer: Literal["procedural", "llm"] = Field(
        "procedural", description="procedural = parameterised families over the zoo's skills; llm = prompts/task_writer*.md"
    )
    coevolve: bool | None = Field(None, description="adapt the pool to the population (acdc: true; cycleqd: false)")
    adapt_every: int = Field(2, ge=1, description="generations between adaptations (AC/DC paper: 5)")
    new_per_round: int = Field(4, ge=1, description="new families written per adaptation")
    max_active: int = Field(24, ge=1, description="active families kept (AC/DC paper: 250 tasks)")
    instances: int = Field(12, ge=2, description="instances per family")
    harder_above: float = Field(0.5, ge=0, le=1, description="pass rate above which a parent gets a harder child")
    reflection_rounds: int = Field(3, ge=1, description="attempts per new family (validation feedback in between)")
    novelty: Literal["lexical", "embedding"] = "lexical"
    novelty_threshold: float = Field(0.7, gt=0, le=1)
    embedding_model: str = Field("", description="model dir for novelty = 'embedding'")
    llm_novelty_judge: bool = Field(False, description="ask the writer LLM whether near-duplicates are interestingly new")
    backend: Literal["transformers", "openai", "vllm"] = "openai"
    model: str = Field("", description="writer LLM: model dir or served model name")
    base_url: str = ""
    api_key: str = ""
    device: str = "cpu"
    temperature: float = Field(0.7, gt=0)
    max_new_tokens: int = Field(1500, ge=64)
    prompts_dir: str = Field("", description="'' = the repository's prompts/")


class ReportConfig(_Section):
    top_k: int = Field(5, ge=1, description="best algorithms re-scored on the test split")


MODE_DEFAULTS: dict[str, dict[str, dict[str, object]]] = {
    "selfdev": {"population": {"mutation": "none", "selection": "dns"}, "tasks": {"coevolve": False}},
    "acdc": {"population": {"mutation": "svd_noise", "selection": "dns"}, "tasks": {"coevolve": True}},
    "cycleqd": {"population": {"mutation": "svd_scale", "selection": "map_elites"}, "tasks": {"coevolve": False}},
}


class Config(_Section):
    mode: Literal["selfdev", "acdc", "cycleqd"] = Field(
        "selfdev", description="selfdev = evolve the generator (Self-Developing); acdc / cycleqd = evolve a model population"
    )
    seed: int = 0
    zoo: ZooConfig = ZooConfig()
    models: ModelsConfig = ModelsConfig()
    generator: GeneratorConfig = GeneratorConfig()
    session: SessionConfig = SessionConfig()
    sandbox: SandboxConfig = SandboxConfig()
    judge: JudgeConfig = JudgeConfig()
    dpo: DPOConfigSection = DPOConfigSection()
    report: ReportConfig = ReportConfig()
    population: PopulationConfig = PopulationConfig()
    tasks: TasksConfig = TasksConfig()

    @model_validator(mode="after")
    def _mode_defaults(self) -> Config:
        for section, values in MODE_DEFAULTS[self.mode].items():
            target = getattr(self, section)
            for key, value in values.items():
                if getattr(target, key) is None:
                    setattr(target, key, value)
        if self.mode == "cycleqd" and self.population.selection != "map_elites":
            raise ValueError("population.selection: cycleqd mode selects with map_elites")
        if self.mode == "acdc" and self.population.selection == "map_elites":
            raise ValueError("population.selection: acdc mode selects with dns or random (map_elites is cycleqd)")
        if self.mode != "selfdev" and self.tasks.writer == "llm" and not self.tasks.model:
            raise ValueError("tasks.writer = 'llm' needs tasks.model (and tasks.base_url for an OpenAI-compatible server)")
        if self.judge.llm and not self.judge.llm_model:
            raise ValueError("judge.llm = true needs judge.llm_model")
        if (self.population.gibberish == "llm" or self.judge.best_of_n == "llm") and not self.judge.llm_model:
            raise ValueError("an LLM gibberish filter or best-of-N picker needs judge.llm_model")
        return self


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
