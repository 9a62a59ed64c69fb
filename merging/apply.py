"""Apply a merge function to a base model and its experts, one tensor at a time.

Per parameter the engine reads the base and the experts from the memory-mapped files straight
into float32 (the contract's dtype; no other copy), builds the task vectors in place, calls the
merge function, checks its result, and adds it to the base straight into the parameter's dtype;
a background thread writes that tensor to its final offset while the next one is computed
(`merging.writer`). Tensors that are not merged go file to file.

The engine's own tensors (the float32 inputs, the outputs waiting to be written) live in
buffers sized for the largest parameter and reused for every one: a fresh 500 MB tensor costs
the kernel ~130 000 page faults before the first value lands in it, more than the arithmetic
on it. So memory is a few times the largest parameter, whatever the model's size.

An elementwise merge function (`merging.contract.ELEMENTWISE`, e.g. built-in task arithmetic)
needs no whole parameter at all: it is called chunk by chunk, and each chunk goes from the
mapped inputs to the output file while it is in cache, in the caller's thread. That path
streams the models at a few times the cost of reading and writing them (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import queue
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from merging.check import check_compatible
from merging.contract import ELEMENTWISE, MergeFn
from merging.io import ModelWeights, TensorInfo, open_weights
from merging.writer import ModelWriter

# Values per chunk of an elementwise merge: a chunk of each input, the sum and the output
# (1 MiB of float32 each) stay in L2 from one step to the next, where a whole parameter (up to
# 545 MB for a 0.5B model's embeddings) would stream through memory once per step.
CHUNK = 1 << 18
# An elementwise merge releases the inputs' pages it has read every this many chunks, so a
# process maps a few MB of each input at a time, not a whole parameter.
_RELEASE_EVERY = 16


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
    device: str | torch.device = "cpu",
) -> MergeStats:
    """Write `base + merge_fn(task_vectors, name=..., base=...)` (the contract of
    `merging.contract`) for every parameter to `out_dir`.

    Task vectors (`expert - base`) and the base are given to `merge_fn` in float32 on `device`
    ("cuda" streams every parameter to the GPU and the result back); the sum is rounded once, to
    the parameter's dtype. A merge function marked elementwise (`merging.contract.ELEMENTWISE`)
    is called on cache-sized 1-D chunks of each parameter instead, on the CPU: no float32 copy
    of a whole parameter is made, and the result is the same bit for bit. Non-floating tensors,
    and tensors whose name does not match the `include` regex (`re.search`), are copied from
    the base unchanged. A result that is not a tensor of the parameter's shape, a merged
    parameter that is not finite, or a merge that modified its inputs raises
    `MergeOutputInvalid`; exceptions raised by `merge_fn` itself propagate unchanged. The output
    dir is written atomically, with the base's config and tokenizer files.
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
    device = torch.device(device)
    # On a GPU a chunk's few kernels cost more to launch than to run: whole parameters there.
    elementwise = getattr(merge_fn, ELEMENTWISE, False) is True and device.type == "cpu"
    check_compatible(base_dir, expert_dirs)

    merged_count = 0
    with ExitStack() as stack:
        base = stack.enter_context(open_weights(base_dir))
        experts = [stack.enter_context(open_weights(d)) for d in expert_dirs]
        models = [base, *experts]
        names = base.names()
        layout = {name: base.info(name) for name in names}
        to_merge = [
            name for name in names
            if layout[name].dtype.is_floating_point and (pattern is None or pattern.search(name))
        ]
        writer = stack.enter_context(ModelWriter(out_dir, template_dir=base_dir, layout=layout))
        buffers = _Buffers([layout[name] for name in to_merge], len(models), device, writer.queue_size + 2)
        merging = set(to_merge)
        for index, name in enumerate(tqdm(names, desc="merging", unit="tensor", disable=not progress)):
            if index + 1 < len(names):  # the kernel reads the next one while this one computes
                following = names[index + 1]
                for weights in models if following in merging else [base]:
                    weights.prefetch(following)
            if name in merging:  # (the inputs' pages are released once copied)
                if elementwise:
                    _merge_elementwise(merge_fn, name, models, buffers, writer, check_inputs_unmodified)
                else:
                    merged, release = _merge_one(merge_fn, name, models, buffers, check_inputs_unmodified)
                    writer.write(name, merged, on_written=release)
                buffers.renew_retained()
                merged_count += 1
            else:  # only the base is read, and only if copy_file_range falls back to memory
                writer.copy(name, base)
                base.release(name)
    return MergeStats(len(names), merged_count, time.perf_counter() - start)


class _Buffers:
    """Reused storage for the engine's tensors: one float32 buffer per input (base, each
    expert) on the merge's device, and a few output buffers per output dtype in host memory
    (pinned, for a GPU merge), each as large as the largest merged parameter needs (pages are
    touched only by the path that uses them); outputs go back to the free list once written.
    Chunk-sized ones for elementwise merges."""

    def __init__(self, infos: list[TensorInfo], inputs: int, device: torch.device, outputs: int) -> None:
        self.device = device
        largest = max((info.numel for info in infos), default=0)
        self.inputs = [torch.empty(largest, dtype=torch.float32, device=device) for _ in range(inputs)]
        # An elementwise merge's inputs and sum, a chunk at a time (the big buffers stay untouched).
        self.chunks = [torch.empty(min(largest, CHUNK), dtype=torch.float32) for _ in range(inputs + 1)]
        self.out_chunks: dict[torch.dtype, torch.Tensor] = {}
        self.free: dict[torch.dtype, queue.Queue[torch.Tensor]] = {}
        for dtype in {info.dtype for info in infos}:
            numel = max(info.numel for info in infos if info.dtype == dtype)
            self.free[dtype] = queue.Queue()
            for _ in range(outputs):
                self.free[dtype].put(torch.empty(numel, dtype=dtype, pin_memory=device.type == "cuda"))

    def load(self, name: str, models: list[ModelWeights]) -> list[torch.Tensor]:
        """`name` of every model in float32, in the input buffers (to a GPU it travels in its
        own, narrower dtype). The file's pages leave this process's memory once copied."""
        loaded = []
        for i, weights in enumerate(models):
            view = weights.view(name)
            target = self.inputs[i][: view.numel()].view(view.shape)
            target.copy_(view if self.device.type == "cpu" else view.to(self.device, non_blocking=True))
            del view
            weights.release(name)
            loaded.append(target)
        return loaded

    def out_chunk(self, dtype: torch.dtype) -> torch.Tensor:
        """A chunk-sized buffer of `dtype` (an elementwise merge's output, reused)."""
        if dtype not in self.out_chunks:
            self.out_chunks[dtype] = torch.empty(len(self.chunks[0]), dtype=dtype)
        return self.out_chunks[dtype]

    def renew_retained(self) -> None:
        """Give a fresh buffer for every input the merge function kept a reference to (in a
        global, a closure, a view): what it kept must not change under it."""
        for i, buffer in enumerate(self.inputs):
            if _storage_references(buffer) > 1:
                self.inputs[i] = torch.empty_like(buffer)

    def output(self, info: TensorInfo) -> tuple[torch.Tensor, Callable[[], None]]:
        """A free output buffer shaped for `info` (waiting for the writer to free one), and the
        callable that gives it back."""
        free = self.free[info.dtype]
        buffer = free.get()
        return buffer[: info.numel].view(info.shape), lambda: free.put(buffer)


def _merge_one(
    merge_fn: MergeFn,
    name: str,
    models: list[ModelWeights],
    buffers: _Buffers,
    check_inputs_unmodified: bool,
) -> tuple[torch.Tensor, Callable[[], None]]:
    info = models[0].info(name)
    base_f32, *task_vectors = buffers.load(name, models)
    for task_vector in task_vectors:
        task_vector.sub_(base_f32)
    inputs = [base_f32, *task_vectors]
    before = [_fingerprint(t) for t in inputs] if check_inputs_unmodified else []

    merged_tv = merge_fn(task_vectors, name=name, base=base_f32)

    # First: a modified input explains whatever else looks wrong (a base resized to fit).
    if check_inputs_unmodified and [_fingerprint(t) for t in inputs] != before:
        raise MergeOutputInvalid(name, "merge modified its inputs")
    problem = _output_problem(merged_tv, info.shape)
    if problem is not None:
        raise MergeOutputInvalid(name, problem)

    merged_tv = merged_tv.detach().to(device=base_f32.device, dtype=torch.float32)
    merged, release = buffers.output(info)
    # The sum goes into the base's buffer, unless the program kept it or returned a view of it
    # (then a reference more than the buffer's own and `base_f32`): float32 in place, then one
    # rounding to the parameter's dtype, bit for bit `(base + merged).to(dtype)`, and about
    # 8x faster than torch's mixed-dtype `add(..., out=bf16)`.
    in_place = _storage_references(buffers.inputs[0]) == 2
    base_of = (lambda: models[0].view(name).to(torch.float32)) if in_place else (lambda: base_f32)
    try:
        if base_f32.device.type == "cpu":
            if in_place:
                merged.copy_(base_f32.add_(merged_tv))
            else:
                torch.add(base_f32, merged_tv, out=merged)
            _check_finite(name, merged, merged_tv, base_of)
        else:  # summed and checked on the GPU; only the parameter's own bytes come back
            total = base_f32.add_(merged_tv) if in_place else base_f32 + merged_tv
            on_device = total.to(info.dtype)
            _check_finite(name, on_device, merged_tv, base_of)
            merged.copy_(on_device)
    except BaseException:
        release()
        raise
    return merged, release


class _NotElementwise(Exception):
    """A chunk's result is not what an elementwise merge gives: merge the parameter whole."""


def _merge_elementwise(
    merge_fn: MergeFn,
    name: str,
    models: list[ModelWeights],
    buffers: _Buffers,
    writer: ModelWriter,
    check_inputs_unmodified: bool,
) -> None:
    """Merge and write `name` a chunk at a time with an elementwise merge function: each chunk
    of the inputs is converted, the base subtracted, merged, added back, rounded and written
    while it is in cache. Anything unexpected (a result that is not a float tensor of the
    chunk's shape, a modified input, a value that is not finite) merges the parameter again
    the whole way (`_merge_one`), whose checks say exactly what is wrong."""
    try:
        writer.write_pieces(name, _merged_chunks(merge_fn, name, models, buffers, check_inputs_unmodified))
    except _NotElementwise:
        merged, release = _merge_one(merge_fn, name, models, buffers, check_inputs_unmodified)
        writer.write(name, merged, on_written=release)
    for weights in models:
        weights.release(name)


def _merged_chunks(
    merge_fn: MergeFn,
    name: str,
    models: list[ModelWeights],
    buffers: _Buffers,
    check_inputs_unmodified: bool,
) -> Iterator[torch.Tensor]:
    info = models[0].info(name)
    flat = [weights.view(name).reshape(-1) for weights in models]
    for start in range(0, info.numel, CHUNK):
        stop = min(info.numel, start + CHUNK)
        base, *task_vectors = (chunk[: stop - start] for chunk in buffers.chunks[: len(models)])
        base.copy_(flat[0][start:stop])
        for target, view in zip(task_vectors, flat[1:], strict=True):
            target.copy_(view[start:stop]).sub_(base)
        inputs = [base, *task_vectors]
        before = [_fingerprint(t) for t in inputs] if check_inputs_unmodified else []
        merged_tv = merge_fn(task_vectors, name=name, base=base)
        if (
            (check_inputs_unmodified and [_fingerprint(t) for t in inputs] != before)
            or _output_problem(merged_tv, (stop - start,)) is not None
            or merged_tv.device.type != "cpu"
        ):
            raise _NotElementwise
        # float32 sum in a buffer of its own, then one rounding: bit for bit the whole path's.
        out = buffers.out_chunk(info.dtype)[: stop - start]
        total = torch.add(base, merged_tv.detach().float(), out=buffers.chunks[-1][: stop - start])
        if not _all_finite(out.copy_(total)):
            raise _NotElementwise
        yield out
        if start // CHUNK % _RELEASE_EVERY == _RELEASE_EVERY - 1:  # the inputs' pages read so far
            done = start - (_RELEASE_EVERY - 1) * CHUNK
            for weights in models:
                weights.release(name, done * info.dtype.itemsize, stop * info.dtype.itemsize)


def _storage_references(tensor: torch.Tensor) -> int:
    """How many tensors share `tensor`'s storage (itself included)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # not in this torch build: assume kept, never reuse
        return 2
    # The temporary UntypedStorage object holds one reference of its own.
    return int(use_count(tensor.untyped_storage()._cdata)) - 1


def _fingerprint(tensor: torch.Tensor) -> tuple[Any, ...]:
    # The version counter moves on every in-place write through torch (views, out=, slices,
    # resize_); the layout catches `set_` and `.data =`. The policy bans what bypasses both
    # (`.data`, `apply_`, `map_`), so no input has to be copied to be checked.
    return (
        tensor._version,
        tensor.data_ptr(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.storage_offset(),
        tensor.dtype,
        tensor.device,
    )


def _output_problem(merged_tv: Any, shape: tuple[int, ...]) -> str | None:
    """What makes a merge function's result unusable for a parameter (or chunk) of `shape`."""
    if not isinstance(merged_tv, torch.Tensor):
        return f"returned {type(merged_tv).__name__}, not a torch.Tensor"
    if merged_tv.layout != torch.strided or merged_tv.device.type not in ("cpu", "cuda"):
        return f"a {merged_tv.layout} tensor on {merged_tv.device.type}, not a dense tensor"
    if tuple(merged_tv.shape) != shape:
        return f"shape {tuple(merged_tv.shape)} != {shape}"
    if not merged_tv.is_floating_point():
        return f"dtype {merged_tv.dtype} is not floating point"
    return None


def _all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, in one min/max pass (the two extremes are judged in
    Python: three more torch ops on 0-d tensors cost a 0.5B model's chunked merge ~0.4 s)."""
    if values.numel() == 0:
        return True
    try:
        low, high = torch.aminmax(values)
    except (RuntimeError, NotImplementedError):  # float8: no aminmax kernel
        low, high = torch.aminmax(values.to(torch.float32))
    return math.isfinite(low.item()) and math.isfinite(high.item())


def _check_finite(
    name: str, merged: torch.Tensor, merged_tv: torch.Tensor, base_of: Callable[[], torch.Tensor]
) -> None:
    """Raise unless every value written is finite (one min/max pass; counts only on failure,
    when `base_of()` gives the base's values to tell an overflow from a bad base)."""
    if _all_finite(merged):
        return
    total = merged.numel()
    if not bool(torch.isfinite(merged_tv).all()):
        bad = int((~torch.isfinite(merged_tv)).sum())
        raise MergeOutputInvalid(name, f"{bad} of {total} values are not finite")
    bad = int((~torch.isfinite(merged)).sum())
    if not bool(torch.isfinite(base_of()).all()):
        raise MergeOutputInvalid(name, f"the base's own weights are not finite ({bad} of {total} values)")
    raise MergeOutputInvalid(
        name, f"base + merge overflows {str(merged.dtype).removeprefix('torch.')}: "
        f"{bad} of {total} values are not finite",
    )
