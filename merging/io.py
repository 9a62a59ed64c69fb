"""Reading safetensors model dirs one tensor at a time, from memory-mapped files.

`open_weights(dir)` parses the headers only (a single `model.safetensors` or shards with an
index). `view(name)` is a zero-copy tensor over the mapped file: reading it costs page faults
on the page cache, not a copy. `prefetch(name)` asks the kernel to read a tensor ahead
(`MADV_WILLNEED`) while something else computes, and `release(name)` drops its pages from this
process (`MADV_DONTNEED`; the page cache keeps them), so a pass over a model holds about one
tensor's pages at a time instead of the whole model's.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length N, N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}` and
the data, offsets relative to byte 8 + N. Writing is `merging.writer`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# A header larger than this is not a model's (safetensors itself refuses over 100 MB).
MAX_HEADER_BYTES = 100_000_000
PAGE = mmap.PAGESIZE

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}


class ModelDirError(ValueError):
    """A model directory is missing or holds no readable safetensors weights."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's dtype and shape, as a header states them."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    file: _MappedFile
    start: int  # absolute byte offset in the file
    end: int


class _MappedFile:
    """One safetensors file: its parsed header and a read-only shared mapping of it.

    The mapping is shared and read-only (PROT_READ): it adds nothing to the private memory
    that RLIMIT_DATA counts, and no write through it can reach the file.
    """

    def __init__(self, path: Path, where: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.entries = self._parse(where)
            size = os.fstat(self.fd).st_size
            self.map = mmap.mmap(self.fd, size, access=mmap.ACCESS_READ) if size else None
        except BaseException:
            os.close(self.fd)
            raise

    def _parse(self, where: str) -> dict[str, tuple[TensorInfo, int, int]]:
        label = f"{where}: {self.path.name}"
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        if len(head) < 8:
            raise ModelDirError(f"{label} is not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise ModelDirError(f"{label} is not a safetensors file (header length {length})")
        try:
            header = json.loads(os.pread(self.fd, length, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelDirError(f"{label}: header is not JSON ({err})") from err
        if not isinstance(header, dict):
            raise ModelDirError(f"{label}: header is not a JSON object")
        data_start = 8 + length
        entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            code = spec.get("dtype") if isinstance(spec, dict) else None
            if code not in DTYPES:
                raise ModelDirError(f"{label}: tensor {name} has dtype {code}")
            try:
                info = TensorInfo(DTYPES[code], tuple(int(s) for s in spec["shape"]))
                begin, end = (int(o) for o in spec["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise ModelDirError(f"{label}: tensor {name} has a bad shape or data_offsets ({err!r})") from err
            if min(info.shape, default=0) < 0 or end - begin != info.nbytes or begin < 0:
                raise ModelDirError(
                    f"{label}: tensor {name} has data_offsets {[begin, end]} for "
                    f"{info.nbytes} bytes of shape {list(info.shape)}"
                )
            if data_start + end > size:
                raise ModelDirError(f"{label} is truncated: tensor {name} ends past the file")
            entries[name] = (info, data_start + begin, data_start + end)
        return entries

    def view(self, start: int, end: int, info: TensorInfo) -> torch.Tensor:
        if start == end or self.map is None:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():
            # The mapping is read-only on purpose: the tensor is never written (see `view`).
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(self.map, dtype=torch.uint8, count=end - start, offset=start)
        if start % info.dtype.itemsize:  # misaligned data (another writer): a private copy
            raw = raw.clone()
        return raw.view(info.dtype).view(info.shape)

    def advise(self, start: int, end: int, advice: int) -> None:
        # Whole pages inside the range only: neighbours' pages are left alone.
        first = -(-start // PAGE) * PAGE
        last = end // PAGE * PAGE
        if self.map is not None and last > first:
            self.map.madvise(advice, first, last - first)

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # views still alive: the mapping goes when they do
                pass
            self.map = None
        os.close(self.fd)


class ModelWeights:
    """Read-only, memory-mapped view of a model dir's safetensors weights.

    Only headers are parsed on open. `get` returns a private copy of a tensor; `view` a
    zero-copy tensor over the file. Use as a context manager (or call `close`).
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._stack = ExitStack()
        self._entries: dict[str, _Entry] = {}
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        self._names = sorted(self._entries)

    def _open(self) -> None:
        where = f"model dir '{self.model_dir}'"
        if not self.model_dir.is_dir():
            raise ModelDirError(f"{where} does not exist")
        # Same preference as transformers: a single file wins over an index.
        if (self.model_dir / SINGLE_FILE).is_file():
            file = self._open_file(SINGLE_FILE, where)
            self._entries = {name: _Entry(i, file, s, e) for name, (i, s, e) in file.entries.items()}
            return
        index_path = self.model_dir / INDEX_FILE
        if not index_path.is_file():
            raise ModelDirError(f"{where} has no {SINGLE_FILE} or {INDEX_FILE}")
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            weight_map = {str(name): str(shard) for name, shard in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ModelDirError(f"{where}: {INDEX_FILE} has no valid weight_map ({err})") from err
        for file_name in sorted(set(weight_map.values())):
            if not (self.model_dir / file_name).is_file():
                raise ModelDirError(f"{where}: {INDEX_FILE} lists missing shard '{file_name}'")
            file = self._open_file(file_name, where)
            listed = [n for n, f in weight_map.items() if f == file_name and n not in file.entries]
            if listed:
                raise ModelDirError(f"{where}: shard '{file_name}' lacks tensor {listed[0]}")
            for name, (info, start, end) in file.entries.items():
                if weight_map.get(name) == file_name:
                    self._entries[name] = _Entry(info, file, start, end)

    def _open_file(self, file_name: str, where: str) -> _MappedFile:
        file = _MappedFile(self.model_dir / file_name, where)
        self._stack.callback(file.close)
        return file

    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return list(self._names)

    @property
    def num_tensors(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise KeyError(f"model dir '{self.model_dir}' has no tensor {name}")
        return self._entries[name]

    def info(self, name: str) -> TensorInfo:
        """Dtype and shape of `name`, from the header (no data read)."""
        return self._entry(name).info

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of `name`, from the header (no data read)."""
        return self._entry(name).info.shape

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of `name`, from the header (no data read)."""
        return self._entry(name).info.dtype

    def view(self, name: str) -> torch.Tensor:
        """`name` as a zero-copy tensor over the mapped file, valid until `close`.

        The memory is read-only: reading is free of copies, writing into it kills the process
        (SIGSEGV). Hand it to nothing that may write; `get` gives a copy that is safe to.
        """
        entry = self._entry(name)
        return entry.file.view(entry.start, entry.end, entry.info)

    def get(self, name: str) -> torch.Tensor:
        """A private copy of one tensor (writable, still valid after `close`)."""
        return self.view(name).clone()

    def file_range(self, name: str) -> tuple[int, int, int]:
        """`(fd, offset, nbytes)` of `name`'s data, for copying it file to file."""
        entry = self._entry(name)
        return entry.file.fd, entry.start, entry.end - entry.start

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading `name`'s data now (it returns at once)."""
        entry = self._entry(name)
        entry.file.advise(entry.start, entry.end, mmap.MADV_WILLNEED)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop `name`'s pages (those of its data bytes `start:stop`, all by default) from this
        process's memory; the page cache keeps them, and a later read maps them again."""
        entry = self._entry(name)
        end = entry.end if stop is None else min(entry.end, entry.start + stop)
        entry.file.advise(entry.start + start, end, mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ModelWeights:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_weights(model_dir: Path) -> ModelWeights:
    """Open a model dir (single `model.safetensors` or sharded with an index) for reading."""
    return ModelWeights(model_dir)
