"""What a discovery session is told: one typed config per component, validated at the edge.

`DiscoveryConfig` composes them (the front door, `coevo.config`, adds the embedded zoo and
reads TOML). Every field has a default that works on a laptop with the embedded zoo; unset
mode-dependent fields (None) take the mode's defaults from `MODE_DEFAULTS`, the one place they
are written down. Every LLM role (generator, task writer, judge) is reached through the same
`LLMConfig`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sandbox.config import SandboxConfig

Mode = Literal["selfdev", "acdc", "cycleqd"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LLMConfig(Section):
    """Where an LLM role's model lives: in-process (a local HF dir) or behind a server."""

    backend: Literal["transformers", "openai", "vllm"] | None = Field(
        None,
        description="transformers (in-process) | openai (any OpenAI-compatible server, e.g. vllm serve) "
        "| vllm (in-process); unset = openai when base_url is set, else transformers",
    )
    model: str = Field("", description="model dir (transformers, vllm) or served model name (openai)")
    base_url: str = Field("", description="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    api_key: str = ""
    device: str = "cpu"

    @model_validator(mode="after")
    def _backend(self) -> LLMConfig:
        if self.backend is None:
            self.backend = "openai" if self.base_url else "transformers"
        return self


class ModelsConfig(Section):
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


class GeneratorConfig(LLMConfig):
    """The algorithm-writing LLM (model '' = the zoo's seed generator) and how it is sampled.

    Served (backend "openai"), `model` is the served name and `weights` the local HF dir the
    server serves: DPO trains LoRA adapters over those weights and hot-loads each into the
    server. In-process, `model` is that dir itself."""

    weights: str = Field(
        "", description="backend = 'openai': the local HF dir the server serves (what DPO trains); '' = the zoo's seed generator"
    )
    server_workdir: str = Field(
        "", description="backend = 'openai': the session workdir as the server sees it (e.g. its container mount); '' = same path"
    )

    programs_per_iteration: int = Field(64, ge=1)
    temperature_start: float = Field(1.0, gt=0, description="paper: 1.2")
    temperature_end: float = Field(0.85, gt=0, description="reached at the last iteration (linear decay)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(320, ge=16)
    exemplars: int = Field(2, ge=0, description="top archive algorithms shown in the prompt")


class SessionConfig(Section):
    iterations: int = Field(3, ge=1, description="Self-Developing iterations (the paper: 3)")


class JudgeConfig(Section):
    """How answers are produced (the resident model under test) and scored."""

    max_new_tokens: int = Field(8, ge=1, description="answer length of the models under test")
    batch_size: int = Field(256, ge=1)
    device: str = "cpu"
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="the resident model: transformers (CPU, tiny models) or vllm (one engine for the session, "
        "each model's weights swapped in with reload_weights; needs vllm)",
    )
    vllm_memory: float = Field(0.85, gt=0, le=1, description="engine = 'vllm': gpu_memory_utilization (on CPU builds: share of RAM)")
    vllm_max_model_len: int | None = Field(None, ge=16, description="engine = 'vllm': longest prompt + answer (None = the model's)")
    vllm_dtype: str = Field("auto", description="engine = 'vllm': weight dtype")
    vllm_tensor_parallel: int = Field(1, ge=1, description="engine = 'vllm': GPUs per engine")
    scratch_dir: str = Field(
        "", description="selfdev: where merged weights that exist only to be judged are written (e.g. /dev/shm/coevo, "
        "RAM-backed); after judging only the report's top-k are kept (moved into the workdir), the rest deleted. "
        "'' = every merged model is kept in <workdir>/models"
    )
    scoring: Literal["checker", "llm"] = Field(
        "checker", description="population modes: the families' checker code (in the sandbox), or an LLM judge (prompts/judge.md)"
    )
    llm: LLMConfig = Field(
        default_factory=LLMConfig,
        description="the judge LLM: scoring = 'llm', gibberish = 'llm' and best_of_n = 'llm' use it",
    )
    best_of_n: Literal["majority", "llm"] = Field("majority", description="how one answer is picked among the team's")


class DPOConfig(Section):
    """One DPO update of the generator: which pairs, and how they are trained (TRL)."""

    enabled: bool = True
    top_frac: float = Field(0.1, gt=0, le=1, description="chosen = top fraction by dev score (paper: 0.03)")
    bottom_frac: float = Field(0.25, gt=0, le=1, description="rejected = bottom fraction (paper: 0.10)")
    max_pairs: int = Field(256, ge=1)
    beta: float = Field(0.1, gt=0, description="paper: 0.01 with LoRA rank 256 on 7B")
    learning_rate: float = Field(5e-5, gt=0)
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    lora_rank: int = Field(0, description="0 = full fine-tune, a model dir per version (tiny models); > 0 = LoRA, an adapter per version (a served generator needs it); paper: 256")
    max_length: int = Field(1024, ge=64)
    human_weight: int = Field(
        2, ge=0, description="each pair from reviewers' verdicts (approved vs rejected, approved vs the iteration's "
        "bottom) appears this many times in the DPO data; 0 = verdicts do not train"
    )

    @field_validator("lora_rank")
    @classmethod
    def _lora_rank(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tune), got {value}")
        return value


class PopulationConfig(Section):
    """Population modes (acdc, cycleqd): how children are bred and the archive is selected."""

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
    svd_top_k: int = Field(8, ge=1, description="singular values perturbed per 2-D weight; paper: 256 of rank 4096 (6%), 8 of the zoo's rank 128")
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
        "heuristic", description="filter for broken children: heuristic, or an LLM reading 3 answers (judge.llm)"
    )


class TasksConfig(Section):
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
    llm: LLMConfig = Field(default_factory=LLMConfig, description="the writer LLM (writer = 'llm')")
    temperature: float = Field(0.7, gt=0)
    max_new_tokens: int = Field(1500, ge=64)


class ClusterConfig(Section):
    """A Ray cluster to run sandbox jobs and judges on (`address` unset: this machine only)."""

    address: str = Field(
        "", description="'' = this machine only (Ray is not imported); 'auto' = the cluster this node belongs to; "
        "'ray://head:10001' = Ray Client"
    )
    workers_per_node: int = Field(0, ge=0, description="sandbox jobs at once on each node; 0 = sandbox.workers")
    judges: int = Field(0, ge=0, description="judge actors; 0 = one per GPU in the cluster, else one per node")
    max_retries: int = Field(2, ge=0, description="times a job or candidate lost with its node is sent elsewhere")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if value and value != "auto" and not value.startswith("ray://") and ":" not in value:
            raise ValueError("must be '', 'auto', 'ray://host:port' or a head node's host:port")
        return value


class ReportConfig(Section):
    top_k: int = Field(5, ge=1, description="best algorithms re-scored on the test split")


# What each mode sets when a field is left unset (None); `--print-config` shows the result.
MODE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "selfdev": {"population": {"mutation": "none", "selection": "dns"}, "tasks": {"coevolve": False}},
    "acdc": {"population": {"mutation": "svd_noise", "selection": "dns"}, "tasks": {"coevolve": True}},
    "cycleqd": {"population": {"mutation": "svd_scale", "selection": "map_elites"}, "tasks": {"coevolve": False}},
}


class DiscoveryConfig(Section):
    """A discovery session: its mode, the models, every role and the sandbox."""

    mode: Mode = Field(
        "selfdev", description="selfdev = evolve the generator (Self-Developing); acdc / cycleqd = evolve a model population"
    )
    seed: int = 0
    prompts_dir: str = Field("", description="templates of every LLM role; '' = the ones shipped with coevo")
    models: ModelsConfig = ModelsConfig()
    generator: GeneratorConfig = GeneratorConfig()
    session: SessionConfig = SessionConfig()
    sandbox: SandboxConfig = SandboxConfig()
    judge: JudgeConfig = JudgeConfig()
    dpo: DPOConfig = DPOConfig()
    report: ReportConfig = ReportConfig()
    population: PopulationConfig = PopulationConfig()
    tasks: TasksConfig = TasksConfig()
    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _mode_defaults(self) -> DiscoveryConfig:
        for section, values in MODE_DEFAULTS[self.mode].items():
            target = getattr(self, section)
            for key, value in values.items():
                if getattr(target, key) is None:
                    setattr(target, key, value)
        if self.mode == "cycleqd" and self.population.selection != "map_elites":
            raise ValueError("population.selection: cycleqd mode selects with map_elites")
        if self.mode == "acdc" and self.population.selection == "map_elites":
            raise ValueError("population.selection: acdc mode selects with dns or random (map_elites is cycleqd)")
        if self.mode != "selfdev" and self.tasks.writer == "llm" and not self.tasks.llm.model:
            raise ValueError("tasks.writer = 'llm' needs tasks.llm.model (and tasks.llm.base_url for an OpenAI-compatible server)")
        if self.judge.scratch_dir and self.mode != "selfdev":
            raise ValueError("judge.scratch_dir: only selfdev sessions judge-and-discard merged weights "
                             "(a population's models are its next parents)")
        g = self.generator
        if self.mode == "selfdev" and g.backend == "openai" and self.dpo.enabled and not self.dpo.lora_rank:
            raise ValueError(
                "dpo.lora_rank: a served generator (generator.backend = 'openai') learns through LoRA adapters "
                "hot-loaded into its server: set dpo.lora_rank (paper: 256), or dpo.enabled = false"
            )
        if self.mode == "selfdev" and g.backend == "openai" and self.dpo.enabled and self.models.base and not g.weights:
            raise ValueError(
                "generator.weights: a served generator that DPO trains needs the local HF dir its server serves"
            )
        if self.judge.scoring == "llm" and not self.judge.llm.model:
            raise ValueError("judge.scoring = 'llm' needs judge.llm.model")
        if (self.population.gibberish == "llm" or self.judge.best_of_n == "llm") and not self.judge.llm.model:
            raise ValueError("an LLM gibberish filter or best-of-N picker needs judge.llm.model")
        return self


def switch_mode(values: dict[str, Any], mode: str) -> dict[str, Any]:
    """A dumped config switched to `mode`: settings still at the old mode's defaults are unset,
    so the new mode's defaults apply (a setting the user changed stays)."""
    switched = {section: dict(fields) if isinstance(fields, dict) else fields for section, fields in values.items()}
    for section, defaults in MODE_DEFAULTS[values.get("mode", "selfdev")].items():
        for key, value in defaults.items():
            if switched[section][key] == value:
                switched[section][key] = None
    switched["mode"] = mode
    return switched
