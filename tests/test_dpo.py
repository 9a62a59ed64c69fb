"""Preference pairs from scored programs, and a real TRL DPO run on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents.config import DPOConfig
from agents.dpo import DPOResult, make_preference_pairs, train_dpo
from coevo.zoo.tiny import save_tiny_llama

PROMPT = "def merge(task_vectors, *, name, base):\n    "
CHOSEN = "return sum(task_vectors) * 0.5"
REJECTED = "return task_vectors[0] * 9.0"


def _item(algorithm_id: str, score: float | None, prompt: str = "p") -> dict[str, Any]:
    return {
        "algorithm_id": algorithm_id,
        "prompt": prompt,
        "completion": f"code {algorithm_id}",
        "score": score,
    }


def _ids(pairs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(p["chosen_id"], p["rejected_id"]) for p in pairs]


# --- make_preference_pairs --------------------------------------------------------------------


def test_pairs_top_against_bottom() -> None:
    scored = [_item(f"a{i}", float(i)) for i in range(10)]
    pairs = make_preference_pairs(scored, top_frac=0.2, bottom_frac=0.3)
    # top ceil(2) = a9, a8; bottom ceil(3) = a0, a1, a2; best chosen first, worst rejected first.
    assert _ids(pairs) == [
        ("a9", "a0"), ("a9", "a1"), ("a9", "a2"),
        ("a8", "a0"), ("a8", "a1"), ("a8", "a2"),
    ]  # fmt: skip
    first = pairs[0]
    assert first == {
        "prompt": "p",
        "chosen": "code a9",
        "rejected": "code a0",
        "chosen_id": "a9",
        "rejected_id": "a0",
        "chosen_score": 9.0,
        "rejected_score": 0.0,
    }


def test_pairs_fraction_rounds_up_without_float_noise() -> None:
    scored = [_item(f"a{i:02d}", float(i)) for i in range(30)]
    # 0.1 * 30 is 3.0000000000000004 in floating point: still 3 rejected, not 4.
    pairs = make_preference_pairs(scored, top_frac=0.03, bottom_frac=0.1)
    assert _ids(pairs) == [("a29", "a00"), ("a29", "a01"), ("a29", "a02")]


def test_pairs_none_scores_are_worst_and_never_paired_together() -> None:
    scored = [_item("ok", 0.0), _item("bad1", None), _item("good", 0.5), _item("bad2", None)]
    pairs = make_preference_pairs(scored, top_frac=0.5, bottom_frac=0.5)
    assert _ids(pairs) == [("good", "bad2"), ("good", "bad1"), ("ok", "bad2"), ("ok", "bad1")]
    assert pairs[0]["rejected_score"] is None
    assert (
        make_preference_pairs([_item("x", None), _item("y", None)], top_frac=1, bottom_frac=1) == []
    )


def test_pairs_ties_are_not_pairs_and_order_is_input_independent() -> None:
    scored = [_item("c", 1.0), _item("a", 1.0), _item("b", 1.0), _item("d", 0.0)]
    pairs = make_preference_pairs(scored, top_frac=0.5, bottom_frac=0.5)
    # top 2 by (score, id) = a, b; bottom 2 = d, c; b-vs-c and a-vs-c are ties.
    assert _ids(pairs) == [("a", "d"), ("b", "d")]
    assert make_preference_pairs(scored[::-1], top_frac=0.5, bottom_frac=0.5) == pairs


def test_pairs_only_within_the_same_prompt() -> None:
    scored = [
        _item("p1-hi", 0.9, "p1"),
        _item("p2-hi", 0.8, "p2"),
        _item("p1-lo", 0.1, "p1"),
        _item("p2-lo", None, "p2"),
        _item("p2-mid", 0.5, "p2"),
    ]
    pairs = make_preference_pairs(scored, top_frac=0.33, bottom_frac=0.33)
    assert _ids(pairs) == [("p1-hi", "p1-lo"), ("p2-hi", "p2-lo")]
    assert [p["prompt"] for p in pairs] == ["p1", "p2"]


def test_pairs_max_pairs_interleaves_prompts() -> None:
    scored = [_item(f"{p}{i}", float(i), p) for p in ("x", "y") for i in range(4)]
    pairs = make_preference_pairs(scored, top_frac=0.5, bottom_frac=0.5, max_pairs=3)
    assert _ids(pairs) == [("x3", "x0"), ("y3", "y0"), ("x3", "x1")]
    assert make_preference_pairs(scored, top_frac=0.5, bottom_frac=0.5, max_pairs=0) == []


def test_pairs_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="top_frac and bottom_frac must be in"):
        make_preference_pairs([_item("a", 1.0)], top_frac=0.0, bottom_frac=0.1)
    with pytest.raises(ValueError, match="scored item 0 lacks score"):
        make_preference_pairs(
            [{"algorithm_id": "a", "prompt": "p", "completion": "c"}], top_frac=1, bottom_frac=1
        )


# --- train_dpo on a real tiny model ---------------------------------------------------------


def _completion_logp(model: Any, tokenizer: Any, prompt: str, completion: str) -> float:
    """Sum of log-probs of `completion` + eos given `prompt`, as TRL scores it."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(prompt + completion + tokenizer.eos_token, add_special_tokens=False)[
        "input_ids"
    ]
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        logprobs = model(input_ids).logits.log_softmax(-1)[0]
    targets = input_ids[0, len(prompt_ids) :]
    return logprobs[len(prompt_ids) - 1 : -1].gather(-1, targets[:, None]).sum().item()


def _preference_margin(model_dir: Path, adapter: Path | None = None) -> float:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    return _completion_logp(model, tokenizer, PROMPT, CHOSEN) - _completion_logp(
        model, tokenizer, PROMPT, REJECTED
    )


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("dpo") / "gen0", seed=0, max_positions=256)


def _pairs() -> list[dict[str, Any]]:
    scored = [
        {"algorithm_id": f"good{i}", "prompt": PROMPT, "completion": CHOSEN, "score": 0.8}
        for i in range(4)
    ] + [
        {"algorithm_id": f"bad{i}", "prompt": PROMPT, "completion": REJECTED, "score": 0.1}
        for i in range(4)
    ]
    return make_preference_pairs(scored, top_frac=0.5, bottom_frac=0.5)


def test_full_dpo_prefers_chosen_and_saves_a_model_dir(generator_dir: Path, tmp_path: Path) -> None:
    pairs = _pairs()
    assert len(pairs) == 16
    out_dir = tmp_path / "gen1"
    settings = DPOConfig(learning_rate=1e-3, epochs=2, batch_size=8, lora_rank=0)
    result = train_dpo(generator_dir, pairs, out_dir, settings)

    assert isinstance(result, DPOResult)
    assert result.out_dir == out_dir and result.num_pairs == 16
    assert math.isfinite(result.final_loss) and result.duration_s > 0
    assert result.reward_accuracy is not None
    assert _preference_margin(out_dir) > _preference_margin(generator_dir) + 0.1
    # A plain HF model dir: no adapter files, loads with Auto*, generation cache left on.
    assert not (out_dir / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.use_cache is True
    assert AutoTokenizer.from_pretrained(out_dir).eos_token == "</s>"
    assert [p.name for p in tmp_path.iterdir()] == ["gen1"]  # no temp dir left behind


def test_lora_dpo_saves_only_the_adapter_and_continues_it(generator_dir: Path, tmp_path: Path) -> None:
    """LoRA DPO writes an adapter dir (no weights copy); the next update trains that adapter
    further against a frozen copy of it, so every version is one adapter over the same weights."""
    settings = DPOConfig(learning_rate=1e-3, epochs=2, batch_size=8, lora_rank=4)
    v1 = train_dpo(generator_dir, _pairs(), tmp_path / "v1", settings).out_dir
    files = sorted(p.name for p in v1.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    weights = sum(f.stat().st_size for f in generator_dir.glob("*.safetensors"))
    assert (v1 / "adapter_model.safetensors").stat().st_size < weights / 2
    margin0, margin1 = _preference_margin(generator_dir), _preference_margin(generator_dir, v1)
    assert margin1 > margin0 + 0.1

    v2 = train_dpo(generator_dir, _pairs(), tmp_path / "v2", settings, adapter=v1).out_dir
    config = json.loads((v2 / "adapter_config.json").read_text())
    assert config["r"] == 4
    with safe_open(str(v2 / "adapter_model.safetensors"), "pt") as f:
        assert not any(".ref." in k for k in f.keys())  # TRL's reference copy is not saved
    assert _preference_margin(generator_dir, v2) > margin1 + 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1", "v2"]
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter dir"):
        train_dpo(generator_dir, _pairs(), tmp_path / "v3", settings, adapter=generator_dir)
    with pytest.raises(ValueError, match="lora_rank 0"):
        train_dpo(generator_dir, _pairs(), tmp_path / "v3", DPOConfig(lora_rank=0), adapter=v1)


def test_train_dpo_refuses_bad_calls(generator_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no preference pairs"):
        train_dpo(generator_dir, [], tmp_path / "out", DPOConfig())
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        train_dpo(generator_dir, _pairs(), tmp_path / "exists", DPOConfig())
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        DPOConfig(lora_rank=-1)
