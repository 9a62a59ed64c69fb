"""The merge engine on real safetensors files: what it writes (against independent reference
computations, and coevo's built-ins against mergekit's definitions tensor by tensor), the
checks it makes without copying inputs, the reader's and the writer's edge cases."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging import methods
from merging.apply import CHUNK, MergeOutputInvalid, merge_models
from merging.contract import ELEMENTWISE
from merging.io import ModelDirError, TensorInfo, open_weights
from merging.methods import kth_largest, make_merge_fn
from merging.writer import ModelWriter

# A parameter above methods._EXACT_BELOW (4M values), so TIES takes the sampled-bracket path.
BIG = (4200, 1100)
SMALL = {"model.norm.weight": (1100,), "model.layers.0.mlp.up_proj.weight": (300, 1100)}


def _save(model_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    model_dir.mkdir(parents=True)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["Test"], "dim": 1100}))
    return model_dir


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A bf16 base with one big parameter and three experts = base + seeded noise, rounded to
    bf16: the task vectors take few distinct values, so magnitudes tie often (the TIES rule at
    ties is exercised), as in real bf16 checkpoints."""
    root = tmp_path_factory.mktemp("bf16")
    generator = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": BIG, **SMALL}
    base = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) for name, shape in shapes.items()}
    base["model.step"] = torch.arange(7, dtype=torch.int64)  # not floating: copied as is
    experts = []
    for i in range(3):
        expert = {
            name: (t.float() + torch.randn(t.shape, generator=generator) * 0.002).to(torch.bfloat16)
            if t.is_floating_point() else t
            for name, t in base.items()
        }
        experts.append(_save(root / f"expert{i}", expert))
    return {"base": _save(root / "base", base), "experts": experts}


# --- mergekit's definitions ----------------------------------------------------------------
# mergekit 0.1.5, merge_methods/generalized_task_arithmetic.py (`merge_group`, `get_mask`) and
# sparsify.py (`magnitude`), with weight 1 per model, `dtype: float32` and no rescaling, as
# they compute; the only change is `stable=True` in the argsort, the order coevo keeps at ties
# (mergekit's unstable argsort keeps an order torch does not define).


def _mergekit_magnitude(tensor: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return tensor
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    topk = torch.argsort(tensor.abs().reshape(-1).float(), descending=True, stable=True)[:k]
    mask[topk] = 1
    return tensor * mask.reshape_as(tensor)


def mergekit_general(
    base: torch.Tensor, experts: list[torch.Tensor], *, lam: float, density: float | None
) -> torch.Tensor:
    deltas = base.new_empty((len(experts), *base.shape))
    for index, expert in enumerate(experts):
        delta = expert - base
        if density is not None:
            delta = _mergekit_magnitude(delta, density)
        deltas[index] = delta
    weights = torch.ones(len(experts)).view(-1, *([1] * base.dim()))
    deltas.mul_(weights)
    if density is not None:  # ties: sign consensus ("sum"), normalized
        sign = deltas.sign()
        majority_sign = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        mask = sign == majority_sign
        mixed_delta = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed_delta /= divisor
    else:  # task_arithmetic: no normalization
        mixed_delta = deltas.sum(dim=0)
    if lam != 1:
        mixed_delta *= lam
    return base + mixed_delta


@pytest.mark.parametrize(
    ("method", "params", "reference"),
    [
        ("task_arithmetic", {"scale": 0.5}, {"lam": 0.5, "density": None}),
        ("task_arithmetic", {"scale": 1.0}, {"lam": 1.0, "density": None}),
        ("ties", {"density": 0.2}, {"lam": 1.0, "density": 0.2}),
        ("ties", {"density": 0.55, "scale": 0.7}, {"lam": 0.7, "density": 0.55}),
        ("ties", {"density": 1.0}, {"lam": 1.0, "density": 1.0}),
    ],
)
@pytest.mark.parametrize("n_experts", [2, 3])
def test_builtins_equal_mergekit_definitions_tensor_by_tensor(
    bf16_models: dict, tmp_path: Path, method: str, params: dict, reference: dict, n_experts: int
) -> None:
    experts = bf16_models["experts"][:n_experts]
    out = tmp_path / "merged"
    merge_models(make_merge_fn(method, **params), bf16_models["base"], experts, out)
    merged = load_file(out / "model.safetensors")  # read back by safetensors itself
    base = load_file(bf16_models["base"] / "model.safetensors")
    loaded = [load_file(d / "model.safetensors") for d in experts]
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            assert torch.equal(merged[name], tensor)
            continue
        expected = mergekit_general(
            tensor.float(), [e[name].float() for e in loaded], **reference
        ).to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        differ = int((merged[name].view(torch.int16) != expected.view(torch.int16)).sum())
        assert differ == 0, f"{name}: {differ} of {tensor.numel()} values differ"


def test_ties_keeps_exactly_k_with_ties_first_in_row_major_order() -> None:
    # Eight magnitudes of 1 compete for k = 4 places (density 0.5 of 8): the first four win.
    tv = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]])
    merged = make_merge_fn("ties", density=0.5)([tv], name="w", base=torch.zeros(2, 4))
    assert torch.equal(merged, torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]))
    # Kept entries that cancel exactly elect + (mergekit's rule): the + one is the mean.
    merged = make_merge_fn("ties", density=1.0)([torch.tensor([2.0]), torch.tensor([-2.0])], name="w", base=torch.zeros(1))
    assert torch.equal(merged, torch.tensor([2.0]))


@pytest.mark.parametrize("n", [1000, 5_000_000])
def test_kth_largest_is_exact_with_ties(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(n)
    values = torch.randint(0, 40, (n,), generator=generator).float()  # ties everywhere
    values[:3] = torch.tensor([1e9, -1e9, 39.5])
    for k in (1, 2, 3, n // 5, n // 2, n - 1, n):
        assert float(kth_largest(values, k)) == float(values.kthvalue(n - k + 1).values)
    kth, above = methods._kth_largest_and_above(values, n // 5, magnitude=True)
    assert float(kth) == float(values.abs().kthvalue(n - n // 5 + 1).values)
    assert above == int((values.abs() > kth).sum())
    # A bracket that misses (no margin) falls back to the full selection, still exact.
    monkeypatch.setattr(methods, "_MARGIN", 0)
    assert float(kth_largest(values, n // 3)) == float(values.kthvalue(n - n // 3 + 1).values)
    with pytest.raises(ValueError, match=r"k must be in \[1, "):
        kth_largest(values, 0)


# --- what the engine writes ------------------------------------------------------------------


def test_engine_rounds_base_plus_merge_once_and_copies_the_rest(bf16_models: dict, tmp_path: Path) -> None:
    def blend(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        assert base.dtype == torch.float32 and all(t.dtype == torch.float32 for t in tvs)
        return tvs[0] * 0.3 + tvs[1] * 0.9 - base * 0.01

    out = tmp_path / "merged"
    stats = merge_models(blend, bf16_models["base"], bf16_models["experts"][:2], out)
    assert (stats.num_tensors, stats.merged_tensors) == (4, 3)
    merged = load_file(out / "model.safetensors")
    base = load_file(bf16_models["base"] / "model.safetensors")
    e0, e1 = (load_file(d / "model.safetensors") for d in bf16_models["experts"][:2])
    for name in SMALL | {"model.embed_tokens.weight": BIG}:
        b = base[name].float()
        expected = (b + blend([e0[name].float() - b, e1[name].float() - b], name=name, base=b)).to(torch.bfloat16)
        assert torch.equal(merged[name], expected), name
    assert torch.equal(merged["model.step"], base["model.step"])
    assert json.loads((out / "config.json").read_text())["dim"] == 1100


def test_a_program_that_keeps_its_inputs_sees_them_unchanged(bf16_models: dict, tmp_path: Path) -> None:
    # The engine reuses its input buffers; what a program keeps (a global, a view) is its own.
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        kept.append((base[:5].clone(), base[:5]))
        kept.append((tvs[1].flatten()[-5:].clone(), tvs[1].flatten()[-5:]))
        return tvs[0]

    merge_models(keep, bf16_models["base"], bf16_models["experts"][:2], tmp_path / "o")
    assert len(kept) == 6
    assert all(torch.equal(copy, view) for copy, view in kept)


def _slice_assign(tvs: list[torch.Tensor], base: torch.Tensor) -> None:
    tvs[0][0] = 1.0


def _out_into_input(tvs: list[torch.Tensor], base: torch.Tensor) -> None:
    torch.add(tvs[0], 1.0, out=tvs[1])


def _view_write(tvs: list[torch.Tensor], base: torch.Tensor) -> None:
    base.view(-1)[:3].zero_()


def _resize(tvs: list[torch.Tensor], base: torch.Tensor) -> None:
    base.resize_(1)


def _set(tvs: list[torch.Tensor], base: torch.Tensor) -> None:
    tvs[0].set_(torch.zeros_like(tvs[0]))


def _masked_fill(tvs: list[torch.Tensor], base: torch.Tensor) -> None:
    tvs[1].masked_fill_(tvs[1] > 0, 0.0)


def _index_put(tvs: list[torch.Tensor], base: torch.Tensor) -> None:
    base.index_put_((torch.tensor([0]),), torch.tensor(2.0))


def _add_then_undo(tvs: list[torch.Tensor], base: torch.Tensor) -> None:
    base.add_(1.0).sub_(1.0)  # values restored, but it was written


@pytest.mark.parametrize(
    "write", [_slice_assign, _out_into_input, _view_write, _resize, _set, _masked_fill, _index_put, _add_then_undo]
)
def test_writes_into_inputs_are_caught_without_copying_them(
    bf16_models: dict, tmp_path: Path, write: Callable[[list[torch.Tensor], torch.Tensor], None]
) -> None:
    def program(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        result = tvs[0].clone()
        write(tvs, base)
        return result

    out = tmp_path / "o"
    with pytest.raises(MergeOutputInvalid, match="merge modified its inputs"):
        merge_models(program, bf16_models["base"], bf16_models["experts"][:2], out)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_overflow_and_non_finite_base_are_told_apart(bf16_models: dict, tmp_path: Path) -> None:
    def huge(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        return torch.full_like(base, 3.4e38)  # finite in float32, not in bfloat16

    with pytest.raises(MergeOutputInvalid) as err:
        merge_models(huge, bf16_models["base"], bf16_models["experts"][:1], tmp_path / "o")
    assert err.value.reason.startswith("base + merge overflows bfloat16: ")
    assert err.value.reason.endswith(f"of {BIG[0] * BIG[1]} values are not finite")

    tensors = load_file(bf16_models["base"] / "model.safetensors")
    tensors["model.norm.weight"][7] = float("inf")
    bad_base = _save(tmp_path / "bad_base", tensors)
    expert = _save(tmp_path / "expert", load_file(bf16_models["experts"][0] / "model.safetensors"))

    def zero(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(base)

    with pytest.raises(MergeOutputInvalid) as err:
        merge_models(zero, bad_base, [expert], tmp_path / "o2", include="norm")
    assert str(err.value) == "output for model.norm.weight: the base's own weights are not finite (1 of 1100 values)"


def _marked(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    setattr(fn, ELEMENTWISE, True)
    return fn


@pytest.mark.parametrize("n_experts", [1, 3])
def test_elementwise_merges_go_chunk_by_chunk_and_write_the_same_bytes(
    bf16_models: dict, tmp_path: Path, n_experts: int
) -> None:
    experts = bf16_models["experts"][:n_experts]
    chunked = make_merge_fn("task_arithmetic", scale=0.7)
    assert getattr(chunked, ELEMENTWISE) is True and getattr(make_merge_fn("ties"), ELEMENTWISE) is False
    whole = make_merge_fn("task_arithmetic", scale=0.7)
    setattr(whole, ELEMENTWISE, False)
    merge_models(chunked, bf16_models["base"], experts, tmp_path / "chunked")
    merge_models(whole, bf16_models["base"], experts, tmp_path / "whole")
    assert (tmp_path / "chunked" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()

    shapes: dict[str, list[tuple[int, ...]]] = {}

    @_marked
    def record(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        shapes.setdefault(name, []).append(tuple(base.shape))
        return tvs[0] * 0.5

    merge_models(record, bf16_models["base"], experts, tmp_path / "recorded")
    big = BIG[0] * BIG[1]
    assert shapes["model.embed_tokens.weight"] == [(CHUNK,)] * (big // CHUNK) + [(big % CHUNK,)]
    assert shapes["model.norm.weight"] == [(1100,)]


@_marked
def _wrong_shape(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    return torch.zeros(3)


@_marked
def _integers(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    return tvs[0].to(torch.int32)


@_marked
def _writes_its_input(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    result = tvs[0].clone()
    base.add_(1.0).sub_(1.0)
    return result


@_marked
def _overflows(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    return torch.full_like(base, 3.4e38)  # finite in float32, not in bfloat16


def _with(value: float) -> Callable[..., torch.Tensor]:
    @_marked
    def one_value(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        result = tvs[0].clone()
        result.view(-1)[5] = value  # in the first chunk
        return result

    return one_value


@pytest.mark.parametrize(
    ("program", "reason"),
    [
        (_wrong_shape, f"shape (3,) != {BIG}"),
        (_with(float("nan")), f"1 of {BIG[0] * BIG[1]} values are not finite"),
        (_with(float("-inf")), f"1 of {BIG[0] * BIG[1]} values are not finite"),
        (_with(float("inf")), f"1 of {BIG[0] * BIG[1]} values are not finite"),
        (_integers, "dtype torch.int32 is not floating point"),
        (_writes_its_input, "merge modified its inputs"),
        (_overflows, f"base + merge overflows bfloat16: {BIG[0] * BIG[1]} of {BIG[0] * BIG[1]} values"),
    ],
)
def test_a_chunk_that_is_not_what_an_elementwise_merge_gives_is_merged_whole(
    bf16_models: dict, tmp_path: Path, program: Callable[..., torch.Tensor], reason: str
) -> None:
    # A function marked elementwise that is not (or misbehaves) is merged the whole way, whose
    # checks name the parameter's own shape and count; nothing is left behind.
    with pytest.raises(MergeOutputInvalid) as err:
        merge_models(program, bf16_models["base"], bf16_models["experts"][:2], tmp_path / "o", include="embed")
    assert err.value.param == "model.embed_tokens.weight"
    assert err.value.reason.startswith(reason)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_the_mark_is_a_promise_the_engine_takes_at_its_word(bf16_models: dict, tmp_path: Path) -> None:
    # A function marked elementwise that is not (here: centred on its input's mean) is called
    # on chunks, so it centres each chunk: the mark is for functions that truly are (the
    # built-ins say so only where it holds, and generated programs cannot set it).
    @_marked
    def centre(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        return tvs[0] - tvs[0].mean()

    merge_models(centre, bf16_models["base"], bf16_models["experts"][:1], tmp_path / "o", include="embed")
    name = "model.embed_tokens.weight"
    merged = load_file(tmp_path / "o" / "model.safetensors")[name].reshape(-1)
    b = load_file(bf16_models["base"] / "model.safetensors")[name].float().reshape(-1)
    tv = load_file(bf16_models["experts"][0] / "model.safetensors")[name].float().reshape(-1) - b
    expected = torch.cat([part - part.mean() for part in tv.split(CHUNK)])
    assert torch.equal(merged, (b + expected).to(torch.bfloat16))


@pytest.mark.gpu
def test_cuda_merge_equals_the_cpu_merge(bf16_models: dict, tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    seen: list[str] = []

    def mean(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        seen.append(base.device.type)
        return torch.stack(tvs).mean(dim=0)

    merge_models(mean, bf16_models["base"], bf16_models["experts"], tmp_path / "gpu", device="cuda")
    merge_models(mean, bf16_models["base"], bf16_models["experts"], tmp_path / "cpu")
    assert set(seen) == {"cuda", "cpu"}
    gpu, cpu = (load_file(tmp_path / d / "model.safetensors") for d in ("gpu", "cpu"))
    for name in cpu:
        assert torch.equal(gpu[name], cpu[name]), name


# --- reading -----------------------------------------------------------------------------------


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_views_are_zero_copy_and_misaligned_data_still_reads(tmp_path: Path) -> None:
    floats = torch.tensor([1.5, -2.25])
    # A U8[3] first puts the F32 at an odd offset (a writer that does not align).
    header = {
        "bytes": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "floats": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    data = bytes([7, 8, 9]) + floats.numpy().tobytes()
    encoded_len = len(json.dumps(header).encode())
    assert (8 + encoded_len + 3) % 4  # the floats really are misaligned
    _raw_file(tmp_path / "m" / "model.safetensors", header, data)
    with open_weights(tmp_path / "m") as weights:
        assert weights.view("bytes").tolist() == [7, 8, 9]
        assert weights.view("bytes").data_ptr() == weights.view("bytes").data_ptr()  # the file's pages
        assert torch.equal(weights.view("floats"), floats)
        assert weights.info("floats") == TensorInfo(torch.float32, (2,))


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        (None, b"\x01\x02\x03", "is not a safetensors file (3 bytes)"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\x00" * 8, "is truncated: tensor w ends past the file"),
        ({"w": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 8, "tensor w has dtype F31"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8, "tensor w has data_offsets [0, 8] for 12 bytes of shape [3]"),
        ({"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}}, b"\x00" * 8, "tensor w has a bad shape or data_offsets"),
        ([1, 2], b"", "header is not a JSON object"),
    ],
)
def test_malformed_safetensors_give_one_line_errors(
    tmp_path: Path, header: object, data: bytes, message: str
) -> None:
    path = tmp_path / "m" / "model.safetensors"
    if header is None:
        path.parent.mkdir()
        path.write_bytes(data)  # shorter than the 8-byte header length
    else:
        _raw_file(path, header, data)  # type: ignore[arg-type]
    with pytest.raises(ModelDirError) as err:
        open_weights(tmp_path / "m")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(f"model dir '{tmp_path / 'm'}': model.safetensors")


def test_header_length_past_the_file_and_non_json(tmp_path: Path) -> None:
    path = tmp_path / "m" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelDirError, match=r"is not a safetensors file \(header length 1000000000000\)$"):
        open_weights(tmp_path / "m")
    path.write_bytes(struct.pack("<Q", 4) + b"\xff{}]")
    with pytest.raises(ModelDirError, match="header is not JSON"):
        open_weights(tmp_path / "m")


# --- writing -----------------------------------------------------------------------------------


def test_writer_streams_shards_in_any_order_and_copies_file_to_file(bf16_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open_weights(bf16_models["base"]) as base:
        layout = {name: base.info(name) for name in base}
        # ~2.3 MB per shard: the big parameter alone, the rest together.
        with ModelWriter(out, template_dir=bf16_models["base"], layout=layout, max_shard_bytes=2_300_000) as writer:
            for name in reversed(base.names()):
                if name == "model.embed_tokens.weight":
                    writer.copy(name, base)
                else:
                    writer.write(name, base.get(name))
        shards = sorted(p.name for p in out.glob("model-*.safetensors"))
        assert len(shards) >= 2
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(layout) and set(index["weight_map"].values()) == set(shards)
        written: dict[str, torch.Tensor] = {}
        for shard in shards:
            written.update(load_file(out / shard))
        for name in base:
            assert torch.equal(written[name], base.get(name)), name
    assert (out / "config.json").is_file()
    assert all(os.stat(p).st_mode & 0o444 == 0o444 for p in out.iterdir())


def test_writer_refuses_what_does_not_fit_and_leaves_nothing(bf16_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    layout = {"a": TensorInfo(torch.float32, (2, 3)), "b": TensorInfo(torch.bfloat16, (4,))}
    with pytest.raises(ValueError, match=r"tensor a: torch.float16 \(2, 3\) does not match the layout's torch.float32 \(2, 3\)"):
        with ModelWriter(out, template_dir=bf16_models["base"], layout=layout) as writer:
            writer.write("a", torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="1 tensors were never written, e.g. b"):
        with ModelWriter(out, template_dir=bf16_models["base"], layout=layout) as writer:
            writer.write("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tensor a was given twice"):
        with ModelWriter(out, template_dir=bf16_models["base"], layout=layout) as writer:
            writer.write("a", torch.zeros(2, 3))
            writer.write("a", torch.zeros(2, 3))
    assert list(tmp_path.iterdir()) == []


def test_writer_takes_a_tensor_in_pieces_and_a_failed_one_can_be_given_again(
    bf16_models: dict, tmp_path: Path
) -> None:
    layout = {"a": TensorInfo(torch.float32, (2, 3)), "b": TensorInfo(torch.bfloat16, (4,))}
    values = torch.arange(6, dtype=torch.float32)

    def pieces(stop: int, fail: bool = False):
        for start in range(0, stop, 2):
            yield values[start : start + 2]
        if fail:
            raise RuntimeError("the producer gave up")

    out = tmp_path / "out"
    with ModelWriter(out, template_dir=bf16_models["base"], layout=layout) as writer:
        with pytest.raises(ValueError, match="tensor a: pieces of 16 bytes, not 24"):
            writer.write_pieces("a", pieces(4))
        with pytest.raises(RuntimeError, match="gave up"):
            writer.write_pieces("a", pieces(6, fail=True))
        with pytest.raises(ValueError, match="tensor b: a piece of torch.float32 on cpu"):
            writer.write_pieces("b", [torch.zeros(4)])
        writer.write_pieces("a", pieces(6))
        writer.write_pieces("b", [torch.ones(2, dtype=torch.bfloat16), torch.full((2,), 2.0, dtype=torch.bfloat16)])
    written = load_file(out / "model.safetensors")
    assert torch.equal(written["a"], values.view(2, 3))
    assert written["b"].tolist() == [1.0, 1.0, 2.0, 2.0]
