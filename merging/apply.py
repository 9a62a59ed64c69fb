"""Apply a merge function to a base model and its experts, one tensor at a time."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from merging.check import check_compatible
from merging.contract import MergeFn
from merging.io import ModelWeights, open_weights, write_weights


@dataclass(frozen=True)
class MergeStats:
    """What a merge did: tensors written, tensors passed to the merge function, wall time."""

    num_tensors: int
    merged_tensors: int
    seconds: float


class MergeOutputInvalid(Exception):
    """A merge function returned something unusable for parameter `param`."""

    def __init__(self, param: str, reason: str) -> None:
        super().__init__(f"output for {param}: {reason}")
        self.param = param
        self.reason = reason

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        # Keeps the exception picklable across process boundaries (sandbox runners).
        return (type(self), (self.param, self.reason))


def merge_models(
    merge_fn: MergeFn,
    base_dir: Path,
    expert_dirs: list[Path],
    out_dir: Path,
    *,
    include: str | None = None,
    progress: bool = False,
    check_inputs_unmodified: bool = True,
) -> MergeStats:
    """Write `base + merge_fn(task_vectors, name=..., base=...)` (the contract of
    `merging.contract`) for every parameter to `out_dir`.

    Task vectors (`expert - base`) and the base are given to `merge_fn` in float32; the result
    is cast back to the parameter's dtype. Non-floating tensors, and tensors whose name does not
    match the `include` regex (`re.search`), are copied from the base unchanged. A result that
    is not a finite tensor of the parameter's shape, or a merge that modified its inputs,
    raises `MergeOutputInvalid`; exceptions raised by `merge_fn` itself propagate unchanged.
    The output dir is written atomically, with the base's config and tokenizer files.
    """
    start = time.perf_counter()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    expert_dirs = [Path(d) for d in expert_dirs]
    if not expert_dirs:
        raise ValueError("merge_models needs at least one expert dir")
    try:
        pattern = re.compile(include) if include is not None else None
    except re.error as err:
        raise ValueError(f"include pattern {include!r} is not a valid regex: {err}") from err
    check_compatible(base_dir, expert_dirs)

    merged_count = 0
    with ExitStack() as stack:
        base = stack.enter_context(open_weights(base_dir))
        experts = [stack.enter_context(open_weights(d)) for d in expert_dirs]

        def merged_tensors() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal merged_count
            for name in tqdm(base.names(), desc="merging", unit="tensor", disable=not progress):
                base_tensor = base.get(name)
                if not base_tensor.is_floating_point() or (
                    pattern is not None and not pattern.search(name)
                ):
                    yield name, base_tensor
                    continue
                yield (
                    name,
                    _merge_one(merge_fn, name, base_tensor, experts, check_inputs_unmodified),
                )
                merged_count += 1

        write_weights(merged_tensors(), out_dir, template_dir=base_dir)
        num_tensors = base.num_tensors
    return MergeStats(num_tensors, merged_count, time.perf_counter() - start)


def _merge_one(
    merge_fn: MergeFn,
    name: str,
    base_tensor: torch.Tensor,
    experts: list[ModelWeights],
    check_inputs_unmodified: bool,
) -> torch.Tensor:
    base_f32 = base_tensor.to(torch.float32)
    task_vectors = [expert.get(name).to(torch.float32) - base_f32 for expert in experts]
    inputs = [base_f32, *task_vectors]
    copies = [t.clone() for t in inputs] if check_inputs_unmodified else []

    merged_tv = merge_fn(task_vectors, name=name, base=base_f32)

    if not isinstance(merged_tv, torch.Tensor):
        raise MergeOutputInvalid(name, f"returned {type(merged_tv).__name__}, not a torch.Tensor")
    if merged_tv.layout != torch.strided or merged_tv.device.type not in ("cpu", "cuda"):
        raise MergeOutputInvalid(
            name, f"a {merged_tv.layout} tensor on {merged_tv.device.type}, not a dense tensor"
        )
    if merged_tv.shape != base_f32.shape:
        raise MergeOutputInvalid(name, f"shape {tuple(merged_tv.shape)} != {tuple(base_f32.shape)}")
    if not merged_tv.is_floating_point():
        raise MergeOutputInvalid(name, f"dtype {merged_tv.dtype} is not floating point")
    bad = int((~torch.isfinite(merged_tv)).sum())
    if bad:
        raise MergeOutputInvalid(name, f"{bad} of {merged_tv.numel()} values are not finite")
    if check_inputs_unmodified and not all(map(_same_bits, inputs, copies)):
        raise MergeOutputInvalid(name, "merge modified its inputs")

    merged = base_f32 + merged_tv.to(device=base_f32.device, dtype=torch.float32)
    return merged.to(base_tensor.dtype)


def _same_bits(tensor: torch.Tensor, copy: torch.Tensor) -> bool:
    # Bitwise, so a NaN already present in an input does not read as a modification.
    if tensor.shape != copy.shape or tensor.dtype != copy.dtype:
        return False
    return torch.equal(tensor.contiguous().view(torch.int32), copy.view(torch.int32))
