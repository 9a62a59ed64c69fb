"""Safetensors I/O one tensor at a time: memory-mapped reading and streaming, atomic writing."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Files in a model dir that hold weights; everything else (config, tokenizer...) is copied
# from the template when writing a new model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")

_DTYPES: dict[str, torch.dtype] = {
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


class ModelDirError(ValueError):
    """A model directory is missing or holds no readable safetensors weights."""


class ModelWeights:
    """Read-only, memory-mapped view of a model dir's safetensors weights.

    Only headers are parsed on open; `get` reads one tensor's data. Use as a context manager
    (or call `close`) to release the file handles.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._stack = ExitStack()
        self._file_of: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        try:
            self._open()
        except BaseException:
            self._stack.close()
            raise
        self._names = sorted(self._file_of)

    def _open(self) -> None:
        where = f"model dir '{self.model_dir}'"
        if not self.model_dir.is_dir():
            raise ModelDirError(f"{where} does not exist")
        # Same preference as transformers: a single file wins over an index.
        if (self.model_dir / SINGLE_FILE).is_file():
            handle = self._open_file(SINGLE_FILE)
            self._file_of = {name: SINGLE_FILE for name in handle.keys()}
            return
        index_path = self.model_dir / INDEX_FILE
        if not index_path.is_file():
            raise ModelDirError(f"{where} has no {SINGLE_FILE} or {INDEX_FILE}")
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ModelDirError(f"{where}: {INDEX_FILE} has no valid weight_map ({err})") from err
        for file_name in sorted(set(weight_map.values())):
            if not (self.model_dir / file_name).is_file():
                raise ModelDirError(f"{where}: {INDEX_FILE} lists missing shard '{file_name}'")
            keys = set(self._open_file(file_name).keys())
            listed = [n for n, f in weight_map.items() if f == file_name and n not in keys]
            if listed:
                raise ModelDirError(f"{where}: shard '{file_name}' lacks tensor {listed[0]}")
        self._file_of = dict(weight_map)

    def _open_file(self, file_name: str) -> Any:
        handle = self._stack.enter_context(
            safe_open(str(self.model_dir / file_name), framework="pt")
        )
        self._handles[file_name] = handle
        return handle

    def names(self) -> list[str]:
        """Tensor names, sorted."""
        return list(self._names)

    @property
    def num_tensors(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def _slice(self, name: str) -> Any:
        if name not in self._file_of:
            raise KeyError(f"model dir '{self.model_dir}' has no tensor {name}")
        return self._handles[self._file_of[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of `name`, from the header (no data read)."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of `name`, from the header (no data read)."""
        code = self._slice(name).get_dtype()
        if code not in _DTYPES:
            raise ModelDirError(f"model dir '{self.model_dir}': tensor {name} has dtype {code}")
        return _DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        if name not in self._file_of:
            raise KeyError(f"model dir '{self.model_dir}' has no tensor {name}")
        tensor: torch.Tensor = self._handles[self._file_of[name]].get_tensor(name)
        return tensor

    def close(self) -> None:
        self._handles.clear()
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


def write_weights(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: Path,
    *,
    template_dir: Path,
    max_shard_bytes: int = 2_000_000_000,
) -> None:
    """Stream `(name, tensor)` pairs into a Hugging Face model dir at `out_dir`.

    A shard is written as soon as it is full, so peak memory is about one shard. The non-weight
    files of `template_dir` (config, tokenizer...) are copied alongside. The dir is built in a
    hidden temporary sibling and renamed into place, so readers never see a half-written model;
    an existing `out_dir` is replaced only once the new one is complete.
    """
    out_dir = Path(out_dir)
    template_dir = Path(template_dir)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    if not template_dir.is_dir():
        raise ModelDirError(f"model dir '{template_dir}' does not exist")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        _write_shards(tensors, tmp_dir, max_shard_bytes)
        for path in sorted(template_dir.iterdir()):
            if path.is_file() and not _is_weight_file(path.name):
                shutil.copy2(path, tmp_dir / path.name)
        share_readable(tmp_dir)
        _replace_dir(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def share_readable(root: Path) -> None:
    """Make a model dir readable by every user (`chmod -R a+rX`), as sandboxes need.

    Temporary dirs and some writers (mkstemp) create owner-only files; a sandbox container
    runs as another, unprivileged user and mounts model dirs read-only.
    """
    root = Path(root)
    paths = [root, *root.rglob("*")]
    for path in paths:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        wanted = mode | 0o444 | (0o111 if path.is_dir() else 0)
        if wanted != mode:
            os.chmod(path, wanted)


def _is_weight_file(file_name: str) -> bool:
    return file_name.endswith(_WEIGHT_SUFFIXES) or file_name.endswith(".index.json")


def _write_shards(
    tensors: Iterable[tuple[str, torch.Tensor]], tmp_dir: Path, max_shard_bytes: int
) -> None:
    # The shard count is unknown until the stream ends, so shards get provisional names
    # and are renamed to model-0000i-of-0000N.safetensors at the end.
    shard_files: list[Path] = []
    shard_names: list[list[str]] = []
    seen: set[str] = set()
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    total_bytes = 0

    def flush() -> None:
        path = tmp_dir / f"shard-{len(shard_files):05d}.partial"
        save_file(shard, str(path), metadata={"format": "pt"})
        shard_files.append(path)
        shard_names.append(list(shard))
        shard.clear()

    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"tensor {name} was given twice")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor.detach().to("cpu").contiguous()
        shard_bytes += nbytes
        total_bytes += nbytes
    if not seen:
        raise ValueError("no tensors to write")
    flush()

    if len(shard_files) == 1:
        shard_files[0].rename(tmp_dir / SINGLE_FILE)
        return
    count = len(shard_files)
    weight_map: dict[str, str] = {}
    for i, (path, names) in enumerate(zip(shard_files, shard_names, strict=True), start=1):
        final = f"model-{i:05d}-of-{count:05d}.safetensors"
        path.rename(tmp_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _replace_dir(new_dir: Path, out_dir: Path) -> None:
    # rename() cannot replace a non-empty directory, so an existing out_dir is first moved
    # aside, then the new one moved in, and only then the old one deleted. If the second
    # rename fails the old dir is put back.
    if not out_dir.exists():
        os.replace(new_dir, out_dir)
        return
    if not out_dir.is_dir():
        raise ValueError(f"output path '{out_dir}' exists and is not a directory")
    old_dir = Path(tempfile.mkdtemp(prefix=f".old-{out_dir.name}-", dir=out_dir.parent))
    os.replace(out_dir, old_dir)
    try:
        os.replace(new_dir, out_dir)
    except BaseException:
        os.replace(old_dir, out_dir)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)
