"""Generator role (Self-Developing): the LLM that writes merge programs.

It is prompted with `prompts/generator.md` and the archive's best algorithms so far with their
dev scores, samples N completions at a temperature that decays over the iterations, and its
programs are cut out of the completions and vetted (static policy, duplicates) before anything
runs. DPO (`agents.dpo`) trains new versions of it (`GeneratorVersion`: a model dir, or weights plus
a LoRA adapter); `backend(version)` follows the current one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.backends import Adapter, VersionedBackend
from agents.config import GeneratorConfig
from agents.console import say
from agents.prompts import Prompt, PromptDirs, reload_prompt
from sandbox.policy import PolicyVerdict, check_program, code_hash

# The generator prompt ends inside a ```python block; its completion ends at this fence.
FENCE = "```"
MAX_PROGRAM_BYTES = 16_000


def format_exemplars(exemplars: list[tuple[str, float]]) -> str:
    """Earlier programs with their dev scores, best first, as shown to the generator."""
    if not exemplars:
        return "(none yet)"
    blocks = [f"Score {score:.1f}:\n```python\n{code.strip()}\n```" for code, score in exemplars]
    return "\n\n".join(blocks)


def extract_program(completion: str) -> str:
    """The program text of a generator completion: up to the closing code fence."""
    return completion.split(FENCE, 1)[0].strip() + "\n"


def completion_text(program: str) -> str:
    """A program as the generator is trained to write it: code, then the closing fence.

    The seed generator's corpus and the DPO pairs both use this form, so DPO trains on
    exactly what the generator emits.
    """
    return program + FENCE + "\n"


@dataclass(frozen=True)
class Vetted:
    """One proposal after vetting: its program, the policy's verdict, and whether it repeats
    an earlier program (same normalised code)."""

    code: str
    verdict: PolicyVerdict
    normalized_hash: str
    duplicate_of: str | None

    @property
    def runnable(self) -> bool:
        return self.verdict.ok and self.duplicate_of is None


@dataclass(frozen=True)
class GeneratorVersion:
    """One version of the generator: a full HF model dir, or the start weights plus a LoRA
    adapter (LoRA DPO), sampled under `served_name` where the backend serves adapters by name."""

    number: int
    weights: Path
    adapter: Path | None = None
    served_name: str | None = None

    @property
    def lora(self) -> Adapter | None:
        if self.adapter is None:
            return None
        return Adapter(self.served_name or self.adapter.name, self.adapter)


def adapter_name(session_id: str, version: int) -> str:
    """The name a LoRA version is served under: unique per session and version."""
    return f"coevo-{session_id}-v{version}"


class Generator:
    """The algorithm writer: its prompt, its sampling schedule and its current version."""

    def __init__(
        self,
        config: GeneratorConfig,
        prompt: Prompt,
        make_backend: Callable[[Path], VersionedBackend],
        *,
        n_experts: int,
        iterations: int,
        prompt_dirs: PromptDirs = None,
    ) -> None:
        self.config = config
        self.prompt = prompt
        self.prompt_dirs = prompt_dirs
        self.make_backend = make_backend
        self.n_experts = n_experts
        self.iterations = iterations
        self._backend: VersionedBackend | None = None

    def backend(self, version: GeneratorVersion) -> VersionedBackend:
        """The backend serving `version`: built on first use; a new version is loaded into it
        (a full model dir reloaded, an adapter merged, passed per request or hot-loaded into
        the server)."""
        if self._backend is None:
            self._backend = self.make_backend(version.weights)
        self._backend.use(version.weights, version.lora)
        return self._backend

    def served_name(self, version: GeneratorVersion) -> str | None:
        """The name `version` is sampled under: the served model or adapter name behind a
        server, the adapter name of an in-process vLLM engine; None for a local model dir."""
        if self.config.backend == "openai":
            return version.lora.name if version.lora else self.config.model
        if self.config.backend == "vllm" and version.lora:
            return version.lora.name
        return None

    def temperature(self, iteration: int) -> float:
        """Linear decay from `temperature_start` to `temperature_end` at the last iteration."""
        g = self.config
        last = max(1, self.iterations - 1)
        return g.temperature_start + (g.temperature_end - g.temperature_start) * min(1.0, iteration / last)

    def reload_prompt(self) -> str | None:
        """Read the template again (from `prompt_dirs`; an edit is used from now on); returns
        a warning when the file on disk is not a valid template (the last good one is kept)."""
        if self.prompt_dirs is None:
            return None
        self.prompt, warning = reload_prompt(self.prompt, self.prompt_dirs)
        return warning

    def render(self, exemplars: list[dict[str, Any]]) -> str:
        """The prompt, showing `exemplars` (archive rows with `code` and `dev_score` in [0, 1])."""
        shown = [(e["code"], 100 * e["dev_score"]) for e in exemplars]
        return self.prompt.render(n_experts=self.n_experts, exemplars=format_exemplars(shown))

    def sample(
        self, version: GeneratorVersion, prompt_text: str, *, temperature: float, seed: int, label: str
    ) -> list[str]:
        """`programs_per_iteration` completions of `prompt_text` from `version`."""
        cfg = self.config
        backend = self.backend(version)
        say(f"{label}: sampling {cfg.programs_per_iteration} programs at T={temperature:.2f} ({backend.name})")
        started = time.time()
        completions = backend.generate(
            [prompt_text], n=cfg.programs_per_iteration, temperature=temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, seed=seed, stop=[FENCE],
        )[0]
        say(f"  sampled in {time.time() - started:.1f}s")
        return completions


def vet(completions: list[tuple[str, str]], seen: dict[str, str]) -> list[Vetted]:
    """Cut the program out of each `(algorithm_id, completion)`, run the static policy and find
    duplicates of earlier programs; `seen` (normalised hash -> first algorithm id) is updated
    with the new runnable ones, so a repeat within the batch is a duplicate too."""
    vetted = []
    for algorithm_id, completion in completions:
        code = extract_program(completion)
        verdict = check_program(code, max_bytes=MAX_PROGRAM_BYTES)
        normalized = code_hash(code)
        duplicate_of = seen.get(normalized) if verdict.ok else None
        if verdict.ok and duplicate_of is None:
            seen[normalized] = algorithm_id
        vetted.append(Vetted(code, verdict, normalized, duplicate_of))
    return vetted
