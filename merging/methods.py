"""Built-in reference merge methods, with the same contract as generated merge programs.

Each method is one function `fn(task_vectors, *, name, base, **params)` returning the merged
task vector for parameter `name`; its parameters and defaults are its keyword-only
arguments. `make_merge_fn` binds parameters and gives the plain contract of
`merging.contract`.
"""

from __future__ import annotations

import functools
import inspect
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from merging.contract import KEYWORD_ONLY, POSITIONAL, MergeFn

_CONTRACT_ARGS = (*POSITIONAL, *KEYWORD_ONLY)
# A method: the contract's arguments plus its own keyword-only parameters with defaults.
MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: its function, parameter defaults and one-line doc."""

    name: str
    fn: MethodFn
    defaults: dict[str, Any] = field(default_factory=dict)
    doc: str = ""


METHODS: dict[str, MethodSpec] = {}


def _register(fn: MethodFn) -> MethodFn:
    params = inspect.signature(fn).parameters.values()
    defaults = {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _CONTRACT_ARGS
    }
    doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    METHODS[fn.__name__] = MethodSpec(name=fn.__name__, fn=fn, defaults=defaults, doc=doc)
    return fn


def make_merge_fn(method: str, **params: Any) -> MergeFn:
    """The merge function of a built-in `method`, with `params` overriding its defaults."""
    if method not in METHODS:
        raise ValueError(
            f"unknown merge method '{method}'; choose one of: {', '.join(sorted(METHODS))}"
        )
    spec = METHODS[method]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        valid = ", ".join(sorted(spec.defaults)) or "(none)"
        raise ValueError(
            f"merge method '{method}' has no parameter '{unknown[0]}'; its parameters are: {valid}"
        )
    merge_fn: MergeFn = functools.partial(spec.fn, **{**spec.defaults, **params})
    return merge_fn


@_register
def task_arithmetic(
    task_vectors: list[torch.Tensor], *, name: str, base: torch.Tensor, scale: float = 0.5
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): scale times the sum of the task vectors."""
    return scale * torch.stack(task_vectors).sum(dim=0)


@_register
def ties(
    task_vectors: list[torch.Tensor],
    *,
    name: str,
    base: torch.Tensor,
    density: float = 0.2,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim to top-density magnitudes, elect sign, disjoint mean."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density must be in (0, 1], got {density}")
    trimmed = torch.stack([_keep_top_magnitude(tv, density) for tv in task_vectors])
    # The elected sign is that of the summed mass, as in the paper; zero sum elects nothing.
    elected = torch.sign(trimmed.sum(dim=0))
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
    total = (trimmed * agrees).sum(dim=0)
    count = agrees.sum(dim=0)
    return scale * torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _keep_top_magnitude(tv: torch.Tensor, density: float) -> torch.Tensor:
    numel = tv.numel()
    k = max(1, round(density * numel))
    if k >= numel:
        return tv.clone()
    magnitude = tv.abs().flatten()
    # kthvalue gives the threshold without topk's k-sized index tensor; exact ties at the
    # threshold are all kept.
    threshold = magnitude.kthvalue(numel - k + 1).values
    return torch.where(tv.abs() >= threshold, tv, torch.zeros_like(tv))


@_register
def dare(
    task_vectors: list[torch.Tensor],
    *,
    name: str,
    base: torch.Tensor,
    drop: float = 0.5,
    scale: float = 0.5,
    seed: int = 0,
) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop entries at random, rescale by 1/(1-drop), sum, scale.

    The drop mask depends only on `seed`, the parameter name and the device, so a merge is
    reproducible tensor by tensor whatever the order tensors are visited in.
    """
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"dare drop must be in [0, 1), got {drop}")
    device = task_vectors[0].device if task_vectors else base.device
    generator = torch.Generator(device=device)
    generator.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    merged = torch.zeros_like(base, dtype=torch.float32)
    for tv in task_vectors:
        keep = torch.rand(tv.shape, generator=generator, device=tv.device) >= drop
        merged += tv * keep / (1.0 - drop)
    return scale * merged


@_register
def model_stock(task_vectors: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): t * mean task vector, t = N cos / (1 + (N-1) cos).

    cos is the mean pairwise cosine similarity of the task vectors over the whole parameter
    (1-D parameters included), as in mergekit's default.
    """
    n = len(task_vectors)
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 task vectors, got {n}")
    flat = torch.stack([tv.flatten().to(torch.float64) for tv in task_vectors])
    norms = flat.norm(dim=1)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            # A zero task vector has no direction: its cosine is 0 rather than NaN.
            denom = (norms[i] * norms[j]).clamp(min=1e-12)
            cosines.append((flat[i] @ flat[j] / denom).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean()
    denominator = 1.0 + (n - 1) * cos
    # The mean pairwise cosine is >= -1/(N-1), so the denominator is >= 0; it reaches 0 only
    # when the task vectors cancel out, where the merged model is the base.
    t = (n * cos / denominator).item() if denominator > 1e-9 else 0.0
    return t * torch.stack(task_vectors).mean(dim=0)
