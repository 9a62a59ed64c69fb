"""Compatibility checks between a base model and its experts, from headers only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from merging.io import ModelWeights, open_weights

TOKENIZER_FILE = "tokenizer.json"


class IncompatibleModels(ValueError):
    """An expert cannot be merged with the base (tensors, shapes, dtypes or tokenizer differ)."""


def check_compatible(base_dir: Path, expert_dirs: list[Path]) -> None:
    """Fail with a one-line `IncompatibleModels` unless every expert matches the base.

    Compares the tokenizer vocab (when both dirs have a `tokenizer.json`), tensor names,
    shapes and dtypes. Reads safetensors headers only, never tensor data. An expert is named
    by its directory name. A missing dir raises `ModelDirError`.
    """
    base_dir = Path(base_dir)
    base_vocab = _vocab(base_dir)
    with open_weights(base_dir) as base:
        for expert_dir in map(Path, expert_dirs):
            label = f"expert '{expert_dir.name}'"
            with open_weights(expert_dir) as expert:
                _check_tokenizer(label, base_vocab, _vocab(expert_dir))
                _check_tensors(label, base, expert)


def _check_tokenizer(
    label: str, base_vocab: dict[str, int] | None, expert_vocab: dict[str, int] | None
) -> None:
    # Weights index embeddings by token id, so what must agree is the token -> id mapping;
    # normalizers and pre-tokenizers may differ without making the weights incompatible.
    if base_vocab is None or expert_vocab is None or base_vocab == expert_vocab:
        return
    if len(base_vocab) != len(expert_vocab):
        detail = f"vocab {len(expert_vocab)} vs {len(base_vocab)}"
    else:
        token = next(t for t in sorted(expert_vocab) if base_vocab.get(t) != expert_vocab[t])
        detail = f"vocab {len(expert_vocab)} vs {len(base_vocab)}, token {token!r} differs"
    raise IncompatibleModels(f"{label} tokenizer differs from base ({detail})")


def _check_tensors(label: str, base: ModelWeights, expert: ModelWeights) -> None:
    base_names, expert_names = set(base.names()), set(expert.names())
    if base_names != expert_names:
        problems = []
        if missing := sorted(base_names - expert_names):
            problems.append(f"missing {_some(missing)}")
        if unexpected := sorted(expert_names - base_names):
            problems.append(f"unexpected {_some(unexpected)}")
        raise IncompatibleModels(
            f"{label} has {expert.num_tensors} tensors, base has {base.num_tensors}: "
            + "; ".join(problems)
        )
    for name in base.names():
        base_shape, expert_shape = base.shape(name), expert.shape(name)
        if base_shape != expert_shape:
            raise IncompatibleModels(
                f"{label}: tensor {name} has shape {expert_shape}, base has {base_shape}"
            )
        base_dtype, expert_dtype = base.dtype(name), expert.dtype(name)
        if base_dtype != expert_dtype:
            raise IncompatibleModels(
                f"{label}: tensor {name} has dtype {_dtype_name(expert_dtype)}, "
                f"base has {_dtype_name(base_dtype)}"
            )


def _some(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _vocab(model_dir: Path) -> dict[str, int] | None:
    """The token -> id mapping of a dir's `tokenizer.json` (model vocab plus added tokens)."""
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        spec: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IncompatibleModels(
            f"model dir '{model_dir}': {TOKENIZER_FILE} is not JSON ({err})"
        ) from err
    model_vocab = (spec.get("model") or {}).get("vocab") or {}
    if isinstance(model_vocab, list):  # Unigram: [[token, score], ...], id = position
        vocab = {entry[0]: i for i, entry in enumerate(model_vocab)}
    else:
        vocab = dict(model_vocab)
    for added in spec.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    return vocab
