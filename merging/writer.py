"""Writing Hugging Face model dirs tensor by tensor, as the tensors are produced.

`ModelWriter` is given the layout up front (every tensor's name, dtype and shape: a merge
writes the base's layout), so each shard's header is written first and every tensor goes
straight to its final offset the moment it is ready, in any order. Nothing is gathered into a
shard in memory; a background thread does the writes while the caller computes the next tensor,
with at most `queue` tensors waiting. Tensors copied unchanged from another safetensors file go
file to file in the kernel (`copy_file_range`).

The dir is built in a hidden temporary sibling and renamed into place on `commit`, so readers
never see a half-written model, and an existing dir is replaced only once the new one is
complete; on an error nothing is left behind.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import torch

from merging.io import DTYPE_CODES, INDEX_FILE, SINGLE_FILE, ModelDirError, ModelWeights, TensorInfo

# Files in a model dir that hold weights; everything else (config, tokenizer...) is copied
# from the template when writing a new model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# Linux writes at most this much per write() call.
_MAX_WRITE = 0x7FFFF000


@dataclass(frozen=True)
class _Write:
    fd: int
    tensor: torch.Tensor
    offset: int
    on_written: Callable[[], None] | None


@dataclass
class _Shard:
    file_name: str
    names: list[str] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)  # absolute, in the file
    size: int = 0
    fd: int = -1


class ModelWriter:
    """Writes the tensors of `layout` (name -> `TensorInfo`) into a model dir at `out_dir`.

    `write(name, tensor)` and `copy(name, weights)` each tensor once, in any order, then
    `commit()` (or use it as a context manager: committed on success, aborted on an error).
    The non-weight files of `template_dir` (config, tokenizer...) are copied alongside.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        template_dir: Path,
        layout: Mapping[str, TensorInfo],
        max_shard_bytes: int = 2_000_000_000,
        queue_size: int = 2,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.template_dir = Path(template_dir)
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        if not layout:
            raise ValueError("no tensors to write")
        if not self.template_dir.is_dir():
            raise ModelDirError(f"model dir '{self.template_dir}' does not exist")
        for name, info in layout.items():
            if info.dtype not in DTYPE_CODES:
                raise ValueError(f"tensor {name}: dtype {info.dtype} has no safetensors code")
        self.layout = dict(layout)
        self.queue_size = queue_size
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{self.out_dir.name}-", dir=self.out_dir.parent))
        self._written: set[str] = set()
        self._error: BaseException | None = None
        self._queue: queue.Queue[_Write | None] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._done = False
        try:
            self._shards = self._plan(max_shard_bytes)
            self._shard_of = {name: shard for shard in self._shards for name in shard.names}
            for shard in self._shards:
                self._create(shard)
        except BaseException:
            self.abort()
            raise

    def _plan(self, max_shard_bytes: int) -> list[_Shard]:
        groups: list[list[str]] = [[]]
        size = 0
        for name, info in self.layout.items():
            if groups[-1] and size + info.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += info.nbytes
        if len(groups) == 1:
            return [_Shard(SINGLE_FILE, groups[0])]
        count = len(groups)
        return [
            _Shard(f"model-{i:05d}-of-{count:05d}.safetensors", names)
            for i, names in enumerate(groups, start=1)
        ]

    def _create(self, shard: _Shard) -> None:
        # As safetensors orders data: widest dtypes first, then by name, so every tensor
        # starts at a multiple of its element size (the header is padded to 8 bytes).
        order = sorted(shard.names, key=lambda n: (-self.layout[n].dtype.itemsize, n))
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        begin = 0
        relative: dict[str, int] = {}
        for name in order:
            info = self.layout[name]
            header[name] = {
                "dtype": DTYPE_CODES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [begin, begin + info.nbytes],
            }
            relative[name] = begin
            begin += info.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        data_start = 8 + len(encoded)
        shard.offsets = {name: data_start + offset for name, offset in relative.items()}
        shard.size = data_start + begin
        shard.fd = os.open(self.tmp_dir / shard.file_name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(shard.fd, memoryview(struct.pack("<Q", len(encoded)) + encoded), 0)
        os.ftruncate(shard.fd, shard.size)

    # -- tensors ----------------------------------------------------------------------------

    def _claim(self, name: str) -> _Shard:
        if self._error is not None:
            raise self._error
        if name not in self.layout:
            raise ValueError(f"tensor {name} is not in the model's layout")
        if name in self._written:
            raise ValueError(f"tensor {name} was given twice")
        self._written.add(name)
        return self._shard_of[name]

    def write(
        self, name: str, tensor: torch.Tensor, *, on_written: Callable[[], None] | None = None
    ) -> None:
        """Queue `tensor` (of the layout's dtype and shape, on any device) for writing; it must
        not change until written. `on_written` is called (in the writer's thread) once the
        tensor's memory is no longer needed, whether the write succeeded or not."""
        info = self.layout.get(name)
        if info is not None and (tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape):
            raise ValueError(
                f"tensor {name}: {tensor.dtype} {tuple(tensor.shape)} does not match the layout's "
                f"{info.dtype} {info.shape}"
            )
        try:
            shard = self._claim(name)
        except BaseException:
            if on_written is not None:
                on_written()
            raise
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="model-writer", daemon=True)
            self._thread.start()
        self._queue.put(_Write(shard.fd, tensor.detach(), shard.offsets[name], on_written))

    def write_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Write `name` from consecutive pieces of it in row-major order (CPU tensors of the
        layout's dtype), each in the caller's thread as soon as it is produced, while it is
        still in cache; nothing is queued, so a piece's memory may be reused once the next
        is asked for. If `pieces` raises, `name` is left unwritten (it may be given again)."""
        info = self.layout.get(name)
        shard = self._claim(name)
        assert info is not None  # _claim checked
        offset, end = shard.offsets[name], shard.offsets[name] + info.nbytes
        try:
            for piece in pieces:
                if piece.dtype != info.dtype or piece.device.type != "cpu":
                    raise ValueError(f"tensor {name}: a piece of {piece.dtype} on {piece.device}")
                data = _bytes_of(piece)
                if offset + data.nbytes > end:
                    raise ValueError(f"tensor {name}: pieces longer than its {info.nbytes} bytes")
                _write_all(shard.fd, data, offset)
                offset += data.nbytes
            if offset != end:
                raise ValueError(f"tensor {name}: pieces of {offset - shard.offsets[name]} bytes, not {info.nbytes}")
        except BaseException:
            self._written.discard(name)
            raise

    def copy(self, name: str, weights: ModelWeights) -> None:
        """Write `name` unchanged from `weights` (same dtype and shape), file to file."""
        source = weights.info(name)
        if source != self.layout.get(name, source):
            raise ValueError(f"tensor {name}: the source's {source} does not match the layout")
        fd, offset, nbytes = weights.file_range(name)
        shard = self._claim(name)
        try:
            _copy_range(fd, offset, shard.fd, shard.offsets[name], nbytes)
        except OSError:  # another file system, or no copy_file_range: through memory
            self._written.discard(name)
            self.write(name, weights.view(name))

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if self._error is None and item.tensor.numel():
                    _write_all(item.fd, _bytes_of(item.tensor), item.offset)
            except BaseException as err:  # raised again in the caller's thread
                self._error = err
            finally:
                if item.on_written is not None:
                    item.on_written()

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    # -- the dir ----------------------------------------------------------------------------

    def commit(self) -> None:
        """Wait for the writes, check every tensor was written, install the dir at `out_dir`."""
        try:
            self._join()
            if self._error is not None:
                raise self._error
            missing = [name for name in self.layout if name not in self._written]
            if missing:
                raise ValueError(f"{len(missing)} tensors were never written, e.g. {missing[0]}")
            self._close_files()
            if len(self._shards) > 1:
                index = {
                    "metadata": {"total_size": sum(info.nbytes for info in self.layout.values())},
                    "weight_map": {
                        name: self._shard_of[name].file_name for name in sorted(self.layout)
                    },
                }
                (self.tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            for path in sorted(self.template_dir.iterdir()):
                if path.is_file() and not _is_weight_file(path.name):
                    shutil.copy2(path, self.tmp_dir / path.name)
            share_readable(self.tmp_dir)
            _replace_dir(self.tmp_dir, self.out_dir)
            self._done = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Stop, and delete everything written so far (`out_dir` is left as it was)."""
        if self._done:
            return
        self._done = True
        self._error = self._error or RuntimeError("aborted")
        self._join()
        self._close_files()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _close_files(self) -> None:
        for shard in getattr(self, "_shards", []):
            if shard.fd >= 0:
                os.close(shard.fd)
                shard.fd = -1

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_weights(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: Path,
    *,
    template_dir: Path,
    max_shard_bytes: int = 2_000_000_000,
) -> None:
    """Write `(name, tensor)` pairs the caller already holds into a model dir at `out_dir`
    (atomically, with `template_dir`'s config and tokenizer files; see `ModelWriter`)."""
    pairs: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name in pairs:
            raise ValueError(f"tensor {name} was given twice")
        pairs[name] = tensor
    layout = {name: TensorInfo(t.dtype, tuple(t.shape)) for name, t in pairs.items()}
    with ModelWriter(
        out_dir, template_dir=template_dir, layout=layout, max_shard_bytes=max_shard_bytes
    ) as writer:
        for name, tensor in pairs.items():
            writer.write(name, tensor)


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


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in row-major order (copied to the host only if on a device)."""
    return tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B")
    while data:
        written = os.pwrite(fd, data[:_MAX_WRITE], offset)
        data = data[written:]
        offset += written


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int) -> None:
    while nbytes > 0:
        copied = os.copy_file_range(src, dst, nbytes, src_offset, dst_offset)
        if copied == 0:
            raise OSError("copy_file_range copied nothing (source shorter than its header says)")
        src_offset += copied
        dst_offset += copied
        nbytes -= copied


def _is_weight_file(file_name: str) -> bool:
    return file_name.endswith(_WEIGHT_SUFFIXES) or file_name.endswith(".index.json")


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
