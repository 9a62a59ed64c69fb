"""Tests of the weights layer on real tiny Llama models: I/O, checks, methods, merging."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from coevo.zoo.tiny import CHARSET, char_tokenizer, save_tiny_llama
from merging.apply import MergeOutputInvalid, merge_models
from merging.check import IncompatibleModels, check_compatible
from merging.contract import MergeFn
from merging.io import ModelDirError, open_weights
from merging.methods import METHODS, make_merge_fn
from merging.writer import write_weights

NUM_TENSORS = 21  # tiny Llama, 2 layers, untied embeddings
FIRST = "lm_head.weight"  # first tensor name in sorted order


def _base(tiny_models: dict) -> Path:
    return tiny_models["base"]


def _experts(tiny_models: dict) -> list[Path]:
    return tiny_models["experts"]


def _edited_copy(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    """Copy a single-file model dir, editing its tensors in between."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _stray_dirs(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def _assert_same_weights(a: Path, b: Path, *, atol: float = 0.0) -> None:
    with open_weights(a) as wa, open_weights(b) as wb:
        assert wa.names() == wb.names()
        for name in wa.names():
            torch.testing.assert_close(wa.get(name), wb.get(name), atol=atol, rtol=0.0)


# --- io ----------------------------------------------------------------------------------


def test_open_weights_reads_headers_and_tensors(tiny_models: dict) -> None:
    with open_weights(_base(tiny_models)) as weights:
        names = weights.names()
        assert names == sorted(names) and weights.num_tensors == NUM_TENSORS
        assert weights.shape("model.layers.0.mlp.up_proj.weight") == (128, 64)
        assert weights.dtype(FIRST) == torch.float32
        tensor = weights.get("model.norm.weight")
        assert tensor.shape == weights.shape("model.norm.weight")
        assert "model.norm.weight" in weights and "nope" not in weights


def test_open_weights_missing_dir_or_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match=r"^model dir '.*nowhere' does not exist$"):
        open_weights(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError) as err:
        open_weights(tmp_path / "empty")
    assert str(err.value) == (
        f"model dir '{tmp_path / 'empty'}' has no model.safetensors or model.safetensors.index.json"
    )


def test_write_round_trip_single_file(tiny_models: dict, tmp_path: Path) -> None:
    base = _base(tiny_models)
    out = tmp_path / "copy"
    with open_weights(base) as weights:
        write_weights(((n, weights.get(n)) for n in weights.names()), out, template_dir=base)
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= files
    _assert_same_weights(base, out)


def test_write_round_trip_sharded_loads_with_transformers(
    tiny_models: dict, tmp_path: Path
) -> None:
    base = _base(tiny_models)
    out = tmp_path / "sharded"
    with open_weights(base) as weights:
        write_weights(
            ((n, weights.get(n)) for n in weights.names()),
            out,
            template_dir=base,
            max_shard_bytes=40_000,
        )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    _assert_same_weights(base, out)

    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    with open_weights(base) as weights:
        for name in weights.names():
            torch.testing.assert_close(loaded[name], weights.get(name), atol=0.0, rtol=0.0)


def test_write_replaces_existing_dir_atomically(tiny_models: dict, tmp_path: Path) -> None:
    base = _base(tiny_models)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    with open_weights(base) as weights:
        write_weights(((n, weights.get(n)) for n in weights.names()), out, template_dir=base)
    assert not (out / "stale.txt").exists()
    assert _stray_dirs(tmp_path) == []
    _assert_same_weights(base, out)


def test_write_failure_keeps_existing_dir_and_cleans_up(tiny_models: dict, tmp_path: Path) -> None:
    base = _base(tiny_models)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous model")

    def failing() -> object:
        yield "a", torch.zeros(3)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_weights(failing(), out, template_dir=base, max_shard_bytes=4)  # type: ignore[arg-type]
    assert (out / "keep.txt").read_text() == "previous model"
    assert _stray_dirs(tmp_path) == []


# --- check -------------------------------------------------------------------------------


def test_check_compatible_accepts_experts(tiny_models: dict) -> None:
    check_compatible(_base(tiny_models), _experts(tiny_models))


def test_check_missing_tensor(tiny_models: dict, tmp_path: Path) -> None:
    expert = _edited_copy(_experts(tiny_models)[0], tmp_path / "math", lambda t: t.pop(FIRST))
    with pytest.raises(IncompatibleModels) as err:
        check_compatible(_base(tiny_models), [expert])
    assert str(err.value) == (
        f"expert 'math' has {NUM_TENSORS - 1} tensors, base has {NUM_TENSORS}: missing {FIRST}"
    )


def test_check_extra_tensor(tiny_models: dict, tmp_path: Path) -> None:
    def add(tensors: dict[str, torch.Tensor]) -> None:
        tensors["extra.bias"] = torch.zeros(2)

    expert = _edited_copy(_experts(tiny_models)[0], tmp_path / "x", add)
    with pytest.raises(IncompatibleModels) as err:
        check_compatible(_base(tiny_models), [expert])
    assert str(err.value) == (
        f"expert 'x' has {NUM_TENSORS + 1} tensors, base has {NUM_TENSORS}: unexpected extra.bias"
    )


def test_check_shape_mismatch(tiny_models: dict, tmp_path: Path) -> None:
    expert = save_tiny_llama(tmp_path / "x", intermediate_size=64)
    with pytest.raises(IncompatibleModels) as err:
        check_compatible(_base(tiny_models), [*_experts(tiny_models), expert])
    assert str(err.value) == (
        "expert 'x': tensor model.layers.0.mlp.down_proj.weight has shape (64, 64), "
        "base has (64, 128)"
    )


def test_check_dtype_mismatch(tiny_models: dict, tmp_path: Path) -> None:
    def to_bf16(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.bfloat16)

    expert = _edited_copy(_experts(tiny_models)[1], tmp_path / "x", to_bf16)
    with pytest.raises(IncompatibleModels) as err:
        check_compatible(_base(tiny_models), [expert])
    assert str(err.value) == (
        "expert 'x': tensor model.norm.weight has dtype bfloat16, base has float32"
    )


def test_check_tokenizer_vocab_size(tiny_models: dict, tmp_path: Path) -> None:
    expert = save_tiny_llama(tmp_path / "x", tokenizer=char_tokenizer(charset=CHARSET[:-2]))
    with pytest.raises(IncompatibleModels) as err:
        check_compatible(_base(tiny_models), [expert])
    assert str(err.value) == "expert 'x' tokenizer differs from base (vocab 98 vs 100)"


def test_check_tokenizer_same_size_other_ids(tiny_models: dict, tmp_path: Path) -> None:
    swapped = "b" + "a" + CHARSET[2:]
    expert = save_tiny_llama(tmp_path / "x", tokenizer=char_tokenizer(charset=swapped))
    with pytest.raises(IncompatibleModels) as err:
        check_compatible(_base(tiny_models), [expert])
    assert str(err.value) == (
        "expert 'x' tokenizer differs from base (vocab 100 vs 100, token 'a' differs)"
    )


def test_check_missing_expert_dir(tiny_models: dict, tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="does not exist"):
        check_compatible(_base(tiny_models), [tmp_path / "gone"])


# --- methods -----------------------------------------------------------------------------


def _tvs(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(row) for row in rows]


BASE4 = torch.zeros(4)


def test_registry_and_make_merge_fn_errors() -> None:
    assert sorted(METHODS) == ["dare", "model_stock", "task_arithmetic", "ties"]
    assert METHODS["ties"].defaults == {"density": 0.2, "scale": 1.0}
    assert METHODS["dare"].defaults == {"drop": 0.5, "scale": 0.5, "seed": 0}
    assert METHODS["model_stock"].defaults == {}
    assert METHODS["task_arithmetic"].doc.startswith("Task arithmetic")
    with pytest.raises(ValueError) as err:
        make_merge_fn("slerp")
    assert str(err.value) == (
        "unknown merge method 'slerp'; choose one of: dare, model_stock, task_arithmetic, ties"
    )
    with pytest.raises(ValueError) as err:
        make_merge_fn("ties", dense=0.3)
    assert str(err.value) == (
        "merge method 'ties' has no parameter 'dense'; its parameters are: density, scale"
    )


def test_task_arithmetic_exact() -> None:
    tvs = _tvs([1.0, -2.0, 0.5, 0.0], [3.0, 2.0, -0.5, 4.0])
    merged = make_merge_fn("task_arithmetic")(tvs, name="w", base=BASE4)
    assert torch.equal(merged, torch.tensor([2.0, 0.0, 0.0, 2.0]))
    merged = make_merge_fn("task_arithmetic", scale=1.0)(tvs, name="w", base=BASE4)
    assert torch.equal(merged, torch.tensor([4.0, 0.0, 0.0, 4.0]))


def test_ties_known_example() -> None:
    tvs = _tvs([3.0, -1.0, 0.5, 2.0], [-2.0, -4.0, 1.0, 0.1], [1.0, -3.0, 0.2, -5.0])
    # density 0.5 keeps [3,0,0,2], [-2,-4,0,0], [0,-3,0,-5]; sums [1,-7,0,-3] elect
    # signs [+,-,0,-]; disjoint means over agreeing entries: [3, -3.5, 0, -5].
    merged = make_merge_fn("ties", density=0.5)(tvs, name="w", base=BASE4)
    assert torch.equal(merged, torch.tensor([3.0, -3.5, 0.0, -5.0]))
    merged = make_merge_fn("ties", density=0.5, scale=2.0)(tvs, name="w", base=BASE4)
    assert torch.equal(merged, torch.tensor([6.0, -7.0, 0.0, -10.0]))


def test_ties_rejects_bad_density() -> None:
    with pytest.raises(ValueError, match="density"):
        make_merge_fn("ties", density=0.0)(_tvs([1.0]), name="w", base=torch.zeros(1))


def test_dare_deterministic_and_unbiased() -> None:
    ones = [torch.ones(200, 100), torch.ones(200, 100)]
    base = torch.zeros(200, 100)
    dare = make_merge_fn("dare", drop=0.5, scale=1.0)
    first = dare(ones, name="layer.weight", base=base)
    assert torch.equal(first, dare(ones, name="layer.weight", base=base))
    assert not torch.equal(first, dare(ones, name="other.weight", base=base))
    reseeded = make_merge_fn("dare", drop=0.5, scale=1.0, seed=1)
    assert not torch.equal(first, reseeded(ones, name="layer.weight", base=base))
    # Kept entries are rescaled by 1/(1-p): each is 0 or 2, summed over two task vectors.
    assert set(first.unique().tolist()) <= {0.0, 2.0, 4.0}
    assert abs(first.mean().item() - 2.0) < 0.05
    no_drop = make_merge_fn("dare", drop=0.0, scale=0.5)(ones, name="w", base=base)
    assert torch.equal(no_drop, torch.ones(200, 100))


def test_model_stock_formula() -> None:
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    cos = 1 / math.sqrt(2)
    t = 2 * cos / (1 + cos)
    merged = make_merge_fn("model_stock")([a, b], name="bias", base=torch.zeros(3))
    torch.testing.assert_close(merged, t * (a + b) / 2)

    c = torch.tensor([0.0, 1.0, 0.0])
    mean_cos = (cos + 0.0 + cos) / 3
    t3 = 3 * mean_cos / (1 + 2 * mean_cos)
    merged = make_merge_fn("model_stock")([a, b, c], name="bias", base=torch.zeros(3))
    torch.testing.assert_close(merged, t3 * (a + b + c) / 3)


def test_model_stock_edge_cases() -> None:
    merge = make_merge_fn("model_stock")
    same = torch.randn(4, 5)
    torch.testing.assert_close(merge([same, same.clone()], name="w", base=same), same)
    zeros = [torch.zeros(7), torch.zeros(7)]
    assert torch.equal(merge(zeros, name="b", base=torch.zeros(7)), torch.zeros(7))
    opposite = [torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])]
    assert torch.isfinite(merge(opposite, name="b", base=torch.zeros(2))).all()
    with pytest.raises(ValueError, match="at least 2"):
        merge([torch.ones(3)], name="b", base=torch.zeros(3))


# --- apply -------------------------------------------------------------------------------


def test_merge_single_expert_reproduces_it(tiny_models: dict, tmp_path: Path) -> None:
    expert = _experts(tiny_models)[0]
    out = tmp_path / "merged"
    stats = merge_models(
        make_merge_fn("task_arithmetic", scale=1.0), _base(tiny_models), [expert], out
    )
    assert (stats.num_tensors, stats.merged_tensors) == (NUM_TENSORS, NUM_TENSORS)
    assert stats.seconds > 0
    _assert_same_weights(expert, out, atol=1e-6)
    assert _stray_dirs(tmp_path) == []


def test_merge_three_experts_loads_with_transformers(tiny_models: dict, tmp_path: Path) -> None:
    out = tmp_path / "ties"
    merge_models(make_merge_fn("ties"), _base(tiny_models), _experts(tiny_models), out)
    model = AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 100) and torch.isfinite(logits).all()


def test_merge_include_regex_leaves_others_as_base(tiny_models: dict, tmp_path: Path) -> None:
    base, out = _base(tiny_models), tmp_path / "mlp_only"
    stats = merge_models(
        make_merge_fn("task_arithmetic"), base, _experts(tiny_models), out, include=r"\.mlp\."
    )
    assert stats.merged_tensors == 6
    with open_weights(base) as wb, open_weights(out) as wo:
        for name in wb.names():
            same = torch.equal(wb.get(name), wo.get(name))
            assert same != (".mlp." in name), name


def test_merge_bad_include_regex(tiny_models: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a valid regex"):
        merge_models(
            make_merge_fn("task_arithmetic"),
            _base(tiny_models),
            _experts(tiny_models),
            tmp_path / "o",
            include="(",
        )


def _wrong_shape(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    return torch.stack(tvs)


def _nan(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    return tvs[0] * float("nan")


def _not_tensor(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    return 0.0  # type: ignore[return-value]


def _in_place(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    tvs[0].mul_(2.0)
    return tvs[0]


def _in_place_base(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
    base.zero_()
    return tvs[0]


@pytest.mark.parametrize(
    ("merge_fn", "reason"),
    [
        (_wrong_shape, "shape (3, 100, 64) != (100, 64)"),
        (_nan, "6400 of 6400 values are not finite"),
        (_not_tensor, "returned float, not a torch.Tensor"),
        (_in_place, "merge modified its inputs"),
        (_in_place_base, "merge modified its inputs"),
    ],
)
def test_merge_output_invalid(
    tiny_models: dict, tmp_path: Path, merge_fn: MergeFn, reason: str
) -> None:
    out = tmp_path / "bad"
    with pytest.raises(MergeOutputInvalid) as err:
        merge_models(merge_fn, _base(tiny_models), _experts(tiny_models), out)
    assert err.value.param == FIRST
    assert str(err.value) == f"output for {FIRST}: {reason}"
    assert not out.exists() and _stray_dirs(tmp_path) == []


def test_merge_in_place_allowed_when_unchecked(tiny_models: dict, tmp_path: Path) -> None:
    stats = merge_models(
        _in_place,
        _base(tiny_models),
        _experts(tiny_models)[:1],
        tmp_path / "o",
        check_inputs_unmodified=False,
    )
    assert stats.merged_tensors == NUM_TENSORS


def test_merge_fn_exception_propagates(tiny_models: dict, tmp_path: Path) -> None:
    def divide(tvs: list[torch.Tensor], *, name: str, base: torch.Tensor) -> torch.Tensor:
        raise ZeroDivisionError(f"merge divided by zero at {name}")

    with pytest.raises(ZeroDivisionError, match="at lm_head.weight"):
        merge_models(divide, _base(tiny_models), _experts(tiny_models), tmp_path / "o")
    assert _stray_dirs(tmp_path) == []


def test_merge_output_invalid_pickles() -> None:
    err = pickle.loads(pickle.dumps(MergeOutputInvalid("w", "shape (1,) != (2,)")))
    assert (err.param, err.reason, str(err)) == (
        "w",
        "shape (1,) != (2,)",
        "output for w: shape (1,) != (2,)",
    )
