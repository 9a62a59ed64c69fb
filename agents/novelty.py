"""Novelty filters for task families (AC/DC): is a candidate family new next to the pool?

A filter embeds each family's `signature()`, finds the candidate's top-3 neighbours by cosine
similarity, and rejects it when a neighbour is over the threshold (0.7 as in AC/DC). Two
embeddings: character 3-gram TF-IDF (`LexicalNovelty`, no model needed) and mean-pooled hidden
states of a Hugging Face model (`EmbeddingNovelty`). `LLMNoveltyJudge` adds AC/DC's second
stage: neighbours over the threshold go to an LLM that decides whether the candidate is still
interestingly new.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agents.prompts import PromptDirs, load_prompt
from agents.tasks import TaskFamily

if TYPE_CHECKING:  # only for annotations: this module need not import torch
    from agents.backends import LLMBackend

DEFAULT_THRESHOLD = 0.7
TOP_K = 3
NOVELTY_PROMPT = "task_novelty"

Neighbour = tuple[TaskFamily, float]


class NoveltyFilter(Protocol):
    """Decides whether a candidate family is new enough next to the existing ones."""

    def check(self, candidate: TaskFamily, existing: Sequence[TaskFamily]) -> str | None:
        """None when novel enough, else one line naming the most similar family."""
        ...


class SimilarityFilter(NoveltyFilter, Protocol):
    """A filter that can also list the candidate's neighbours over its threshold."""

    threshold: float

    def neighbours(self, candidate: TaskFamily, existing: Sequence[TaskFamily]) -> list[Neighbour]:
        """The top-3 existing families over the threshold, most similar first."""
        ...


def top_neighbours(
    existing: Sequence[TaskFamily], similarities: Sequence[float], threshold: float
) -> list[Neighbour]:
    """The `TOP_K` most similar families whose similarity reaches `threshold`."""
    ranked = sorted(zip(existing, similarities, strict=True), key=lambda pair: -pair[1])
    return [(family, sim) for family, sim in ranked[:TOP_K] if sim >= threshold]


def too_similar(candidate: TaskFamily, neighbours: list[Neighbour], threshold: float) -> str:
    family, sim = neighbours[0]
    return (
        f"{candidate.name} is too similar to {family.family_id} ({family.name}): "
        f"cosine {sim:.2f} >= {threshold:.2f}"
    )


def _others(candidate: TaskFamily, existing: Sequence[TaskFamily]) -> list[TaskFamily]:
    return [f for f in existing if f.family_id != candidate.family_id]


def char_ngrams(text: str, n: int = 3) -> Counter[str]:
    """Counts of the character n-grams of `text` with whitespace runs folded to one space."""
    text = " ".join(text.split())
    return Counter(text[i : i + n] for i in range(max(0, len(text) - n + 1)))


def tfidf_cosines(candidate: str, others: Sequence[str], n: int = 3) -> list[float]:
    """Cosine similarity of `candidate` to each of `others`: sublinear TF (1 + ln count) of
    character n-grams times smoothed IDF over the candidate and `others` together.

    The IDF is why a pool of templated families works: wording every family shares weighs
    little next to what sets two families apart (their operations, ranges and examples).
    """
    docs = [char_ngrams(text, n) for text in (candidate, *others)]
    df = Counter(gram for doc in docs for gram in doc)
    idf = {gram: math.log((1 + len(docs)) / (1 + count)) + 1 for gram, count in df.items()}
    vectors = []
    for doc in docs:
        vector = {gram: (1 + math.log(count)) * idf[gram] for gram, count in doc.items()}
        norm = math.sqrt(sum(v * v for v in vector.values())) or 1.0
        vectors.append({gram: v / norm for gram, v in vector.items()})
    first = vectors[0]
    return [sum(v * first.get(gram, 0.0) for gram, v in other.items()) for other in vectors[1:]]


class LexicalNovelty:
    """Character 3-gram TF-IDF cosine of the families' signatures (IDF over the candidate and
    the existing families), top-3 neighbours over the threshold."""

    def __init__(self, *, threshold: float = DEFAULT_THRESHOLD, n: int = 3) -> None:
        self.threshold = threshold
        self.n = n

    def neighbours(self, candidate: TaskFamily, existing: Sequence[TaskFamily]) -> list[Neighbour]:
        others = _others(candidate, existing)
        sims = tfidf_cosines(candidate.signature(), [f.signature() for f in others], self.n)
        return top_neighbours(others, sims, self.threshold)

    def check(self, candidate: TaskFamily, existing: Sequence[TaskFamily]) -> str | None:
        found = self.neighbours(candidate, existing)
        return too_similar(candidate, found, self.threshold) if found else None


class EmbeddingNovelty:
    """Cosine similarity of mean-pooled last hidden states of a Hugging Face model."""

    def __init__(
        self,
        model_dir: Path,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        device: str = "cpu",
        max_tokens: int = 512,
    ) -> None:
        # Imported here: the lexical filter and the task writer should not pay torch's import.
        import torch
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"embedding model {model_dir} is not a Hugging Face model dir")
        self._torch = torch
        self.threshold = threshold
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model: Any = AutoModel.from_pretrained(model_dir)
        self.model = model.to(device).eval()
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_tokens
        self.max_tokens = min(max_tokens, int(limit))
        self._cache: dict[str, Any] = {}

    def embed(self, texts: Sequence[str]) -> list[Any]:
        """One unit-norm vector per text (cached by text)."""
        todo = sorted({t for t in texts if t not in self._cache})
        torch = self._torch
        for start in range(0, len(todo), 32):
            chunk = todo[start : start + 32]
            enc = self.tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
            for text, vector in zip(chunk, pooled, strict=True):
                self._cache[text] = vector
        return [self._cache[t] for t in texts]

    def neighbours(self, candidate: TaskFamily, existing: Sequence[TaskFamily]) -> list[Neighbour]:
        others = _others(candidate, existing)
        if not others:
            return []
        vectors = self.embed([candidate.signature(), *(f.signature() for f in others)])
        sims = [float(vectors[0] @ v) for v in vectors[1:]]
        return top_neighbours(others, sims, self.threshold)

    def check(self, candidate: TaskFamily, existing: Sequence[TaskFamily]) -> str | None:
        found = self.neighbours(candidate, existing)
        return too_similar(candidate, found, self.threshold) if found else None


class LLMNoveltyJudge:
    """AC/DC's second stage: neighbours over the threshold go to an LLM ("interestingly new?").

    The reply must contain `NOVEL: yes` or `NOVEL: no`, then a reason; a reply with neither is
    a rejection that says so (the similarity stage already found the candidate too close).
    """

    def __init__(
        self,
        inner: SimilarityFilter,
        backend: LLMBackend,
        *,
        prompts_dir: PromptDirs = None,
        max_new_tokens: int = 200,
    ) -> None:
        self.inner = inner
        self.backend = backend
        self.prompt = load_prompt(NOVELTY_PROMPT, prompts_dir)
        self.max_new_tokens = max_new_tokens

    @property
    def threshold(self) -> float:
        return self.inner.threshold

    def check(self, candidate: TaskFamily, existing: Sequence[TaskFamily]) -> str | None:
        found = self.inner.neighbours(candidate, existing)
        if not found:
            return None
        neighbours = "\n\n".join(
            f"### {f.family_id} ({f.name}), similarity {sim:.2f}\n{f.signature()}"
            for f, sim in found
        )
        text = self.prompt.render(candidate=candidate.signature(), neighbours=neighbours)
        reply = self.backend.generate(
            [text], temperature=0.0, max_new_tokens=self.max_new_tokens, seed=0
        )[0][0]
        verdict = re.search(r"NOVEL:\s*(yes|no)\b", reply, flags=re.I)
        closest = too_similar(candidate, found, self.threshold)
        if verdict is None:
            return f"{closest}; the novelty judge's reply has no 'NOVEL: yes|no' line"
        if verdict.group(1).lower() == "yes":
            return None
        reason = re.search(r"REASON:\s*(.+)", reply, flags=re.I)
        why = " ".join(reason.group(1).split()) if reason else "no reason given"
        return f"{closest}; the novelty judge says not interestingly new: {why[:200]}"


def make_novelty(
    kind: str,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    embedding_model: str = "",
    judge_backend: LLMBackend | None = None,
    prompts_dir: PromptDirs = None,
    device: str = "cpu",
) -> NoveltyFilter:
    """A novelty filter by kind, "lexical" or "embedding" (needs `embedding_model`, a model
    dir); with `judge_backend`, neighbours over the threshold go to that LLM as a second stage."""
    inner: SimilarityFilter
    if kind == "lexical":
        inner = LexicalNovelty(threshold=threshold)
    elif kind == "embedding":
        if not embedding_model:
            raise ValueError("novelty kind 'embedding' needs embedding_model: a model dir")
        inner = EmbeddingNovelty(Path(embedding_model), threshold=threshold, device=device)
    else:
        raise ValueError(f"unknown novelty filter {kind!r}: use 'lexical' or 'embedding'")
    if judge_backend is None:
        return inner
    return LLMNoveltyJudge(inner, judge_backend, prompts_dir=prompts_dir)
