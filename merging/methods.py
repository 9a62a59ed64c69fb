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

from merging.contract import ELEMENTWISE, KEYWORD_ONLY, POSITIONAL, MergeFn

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
    elementwise: bool = False  # see merging.contract.ELEMENTWISE


METHODS: dict[str, MethodSpec] = {}


def _register(fn: MethodFn | None = None, *, elementwise: bool = False) -> Any:
    """Register a method (`@_register`, or `@_register(elementwise=True)` for one that is
    elementwise in the sense of `merging.contract.ELEMENTWISE`)."""
    if fn is None:
        return functools.partial(_register, elementwise=elementwise)
    params = inspect.signature(fn).parameters.values()
    defaults = {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _CONTRACT_ARGS
    }
    doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    METHODS[fn.__name__] = MethodSpec(fn.__name__, fn, defaults, doc, elementwise)
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
    merge_fn = functools.partial(spec.fn, **{**spec.defaults, **params})
    setattr(merge_fn, ELEMENTWISE, spec.elementwise)
    return merge_fn


@_register(elementwise=True)
def task_arithmetic(
    task_vectors: list[torch.Tensor], *, name: str, base: torch.Tensor, scale: float = 0.5
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): scale times the sum of the task vectors.

    mergekit's `task_arithmetic` with weight 1 per model and `lambda = scale`, bit for bit.
    """
    merged = task_vectors[0] + task_vectors[1] if len(task_vectors) > 1 else task_vectors[0].clone()
    for tv in task_vectors[2:]:
        merged += tv
    return merged.mul_(scale)


@_register
def ties(
    task_vectors: list[torch.Tensor],
    *,
    name: str,
    base: torch.Tensor,
    density: float = 0.2,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim to top-density magnitudes, elect sign, disjoint mean.

    As mergekit's `ties` (weight 1 per model, `lambda = scale`): each task vector keeps exactly
    k = max(1, int(density * numel)) entries of largest magnitude; the elected sign is that of
    the kept entries' sum, + where the sum is 0; the merge is the mean of the kept entries that
    agree with it. One difference, at ties: where entries of equal magnitude straddle the k-th,
    coevo keeps the ones first in row-major order, mergekit whichever its unstable argsort puts
    first (an order torch does not define).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density must be in (0, 1], got {density}")
    flat = [tv.reshape(-1) for tv in task_vectors]
    numel = base.numel()
    k = max(1, int(density * numel))
    cuts = [_magnitude_cut(tv, k) for tv in flat] if density < 1.0 and numel else []
    merged = torch.empty(numel, dtype=torch.float32, device=base.device)
    # Everything after the thresholds is elementwise: done a cache-sized chunk at a time, the
    # dozen passes it takes stay in cache instead of streaming a parameter-sized temporary each.
    # Masks are float 0/1 (multiplying by them is exact): torch's bool kernels (where,
    # masked_fill, bool to float) run 5-20x slower than its float ones.
    for start in range(0, numel, _CHUNK):
        stop = min(numel, start + _CHUNK)
        kept = [tv[start:stop] for tv in flat]
        for i, cut in enumerate(cuts):
            kept[i] = cut.apply(kept[i])
        total = kept[0] + kept[1] if len(kept) > 1 else kept[0].clone()
        for part in kept[2:]:
            total += part
        elected = total.sign_().add_(1).clamp_(max=1).mul_(2).sub_(1)  # +1 where sum >= 0, else -1
        mixed = torch.zeros_like(total)
        count = torch.zeros_like(total)
        for part in kept:
            agrees = part.sign().mul_(elected).clamp_(min=0)  # 1 where part's sign is elected
            mixed += part * agrees
            count += agrees
        torch.div(mixed, count.clamp_(min=1.0), out=merged[start:stop])
    merged = merged.view(base.shape)
    return merged if scale == 1.0 else merged.mul_(scale)


_CHUNK = 1 << 18  # float32 values per chunk: 1 MiB, a few of them fit in L2


class _MagnitudeCut:
    """Keeps the k largest magnitudes of one task vector, applied chunk by chunk in row-major
    order: every value above the k-th largest magnitude, and of the values equal to it, the
    first `ties` (exactly k in all)."""

    def __init__(self, threshold: torch.Tensor, ties: int) -> None:
        self.threshold = threshold
        self.ties = ties

    def apply(self, part: torch.Tensor) -> torch.Tensor:
        """The next chunk, with what is not kept zeroed."""
        diff = part.abs().sub_(self.threshold)  # exactly 0 where tied, its sign otherwise
        if self.ties > 0:
            is_tied = diff == 0
            tied = int(torch.count_nonzero(is_tied))
            if tied <= self.ties:  # every tie in this chunk is kept
                self.ties -= tied
                return part * diff.sign_().add_(1).clamp_(max=1)
            keep = diff.sign_().clamp_(min=0)
            keep[is_tied.nonzero().flatten()[: self.ties]] = 1.0
            self.ties = 0
            return part * keep
        return part * diff.sign_().clamp_(min=0)


def _magnitude_cut(tv: torch.Tensor, k: int) -> _MagnitudeCut:
    threshold, above = _kth_largest_and_above(tv, k, magnitude=True)
    return _MagnitudeCut(threshold, k - above)


# kth_largest: below this many values one kthvalue is fast enough; above it, a sample brackets
# the answer and kthvalue runs on the values inside the bracket only.
_EXACT_BELOW = 1 << 22
_SAMPLE = 1 << 16
_MARGIN = 1024  # sample ranks either side: ~8 standard deviations of the sample quantile


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a 1-D tensor, exactly (a 0-d tensor).

    `kthvalue` over a whole 136M-element parameter takes seconds (it partitions a copy of it).
    Here a fixed-seed sample of 65 536 values gives a bracket [low, high] that holds the answer
    with overwhelming probability; one counting pass proves it does (fewer than k values above
    high, at least k at or above low) and collects the ~3 % of values inside, where kthvalue
    finds the answer. If the proof fails, it falls back to kthvalue over everything, so the
    answer is always exact.
    """
    return _kth_largest_and_above(values, k)[0]


def _kth_largest_and_above(
    values: torch.Tensor, k: int, *, magnitude: bool = False
) -> tuple[torch.Tensor, int]:
    """`kth_largest` of `values` (of their absolute values with `magnitude`, computed chunk by
    chunk, never all at once) and how many are strictly larger than it."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    values = values.reshape(-1)
    if n > _EXACT_BELOW:
        generator = torch.Generator(device=values.device).manual_seed(0)
        picks = torch.randint(n, (_SAMPLE,), generator=generator, device=values.device)
        sample = values[picks]
        sample = (sample.abs() if magnitude else sample).sort().values
        rank = (n - k) * _SAMPLE // n  # where the answer falls in the sorted sample
        low = sample[max(0, rank - _MARGIN)]
        high = sample[min(_SAMPLE - 1, rank + _MARGIN)]
        above = 0
        inside = []
        for start in range(0, n, _CHUNK):
            part = values[start : start + _CHUNK]
            part = part.abs() if magnitude else part
            above += int(torch.count_nonzero(part > high))
            inside.append(part[(part >= low) & (part <= high)])
        band = torch.cat(inside)
        if above < k <= above + band.numel():
            kth = band.kthvalue(band.numel() - (k - above) + 1).values
            return kth, above + int(torch.count_nonzero(band > kth))
    everything = values.abs() if magnitude else values
    kth = everything.kthvalue(n - k + 1).values
    return kth, int(torch.count_nonzero(everything > kth))


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
