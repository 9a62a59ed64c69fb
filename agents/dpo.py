"""DPO update of the generator: preference pairs from scored algorithms, one TRL training run.

Self-Developing (Ishibashi et al., 2025): programs sampled from the same prompt are ranked by
dev score; the top 3 % are chosen, the bottom 10 % (non-executable ones first) rejected, and
every chosen x rejected combination with a strictly better chosen score is a pair.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from agents.config import DPOConfig

log = logging.getLogger(__name__)

SCORED_KEYS = ("algorithm_id", "prompt", "completion", "score")


@dataclass(frozen=True)
class DPOResult:
    """What one DPO run produced."""

    out_dir: Path
    num_pairs: int
    final_loss: float
    duration_s: float
    reward_accuracy: float | None = None
    reward_margin: float | None = None


def _rank_score(item: dict[str, Any]) -> float:
    # A program that did not run is worse than any program that did.
    score = item["score"]
    return -math.inf if score is None else float(score)


def _take(frac: float, n: int) -> int:
    # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, and ceil would give 4.
    return math.ceil(round(frac * n, 9))


def _interleave(groups: list[list[dict[str, Any]]]) -> Iterable[dict[str, Any]]:
    for i in range(max((len(g) for g in groups), default=0)):
        for group in groups:
            if i < len(group):
                yield group[i]


def make_preference_pairs(
    scored: list[dict[str, Any]],
    *,
    top_frac: float,
    bottom_frac: float,
    max_pairs: int | None = None,
) -> list[dict[str, Any]]:
    """Chosen/rejected pairs from scored programs, only between programs of the same prompt.

    Each item is `{"algorithm_id", "prompt", "completion", "score"}` (score None = did not run,
    ranked below every score). Within each prompt's N programs, the top `ceil(top_frac*N)` are
    chosen and the bottom `ceil(bottom_frac*N)` rejected; every chosen x rejected combination
    whose chosen score is strictly higher is a pair. Ties in score are broken by algorithm_id,
    so the output does not depend on input order within a prompt. Pairs come best chosen first,
    each against the worst rejected first; prompts keep their first-seen order. With
    `max_pairs`, prompts are interleaved (the first pair of each, then the second, ...) so no
    prompt is crowded out, and the list is cut there.
    """
    if not 0 < top_frac <= 1 or not 0 < bottom_frac <= 1:
        raise ValueError(
            f"top_frac and bottom_frac must be in (0, 1], got {top_frac} and {bottom_frac}"
        )
    if max_pairs is not None and max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0 or None, got {max_pairs}")
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for i, item in enumerate(scored):
        missing = [k for k in SCORED_KEYS if k not in item]
        if missing:
            raise ValueError(f"scored item {i} lacks {', '.join(missing)}: need {SCORED_KEYS}")
        by_prompt.setdefault(item["prompt"], []).append(item)

    groups: list[list[dict[str, Any]]] = []
    for prompt, items in by_prompt.items():
        ranked = sorted(items, key=lambda it: (-_rank_score(it), str(it["algorithm_id"])))
        chosen = ranked[: _take(top_frac, len(ranked))]
        rejected = ranked[::-1][: _take(bottom_frac, len(ranked))]
        groups.append(
            [
                {
                    "prompt": prompt,
                    "chosen": c["completion"],
                    "rejected": r["completion"],
                    "chosen_id": c["algorithm_id"],
                    "rejected_id": r["algorithm_id"],
                    "chosen_score": c["score"],
                    "rejected_score": r["score"],
                }
                for c in chosen
                for r in rejected
                if _rank_score(c) > _rank_score(r)
            ]
        )
    if max_pairs is None:
        return [pair for group in groups for pair in group]
    return list(_interleave(groups))[:max_pairs]


def human_pairs(
    approved: list[str],
    rejected: list[str],
    bottom: list[str],
    completions: dict[str, str],
    scores: dict[str, float | None],
    prompt: str,
) -> list[dict[str, Any]]:
    """Preference pairs from reviewers' verdicts: every approved program against every rejected
    one and every one of the iteration's `bottom`, all under `prompt` (the one the generator is
    trained on now), in the shape of `make_preference_pairs`'s pairs."""
    losers = list(dict.fromkeys([*rejected, *(b for b in bottom if b not in approved)]))
    return [
        {"prompt": prompt, "chosen": completions[c], "rejected": completions[r], "chosen_id": c, "rejected_id": r,
         "chosen_score": scores.get(c), "rejected_score": scores.get(r)}
        for c in approved
        for r in losers
        if c != r
    ]


def bottom_ids(scored: list[dict[str, Any]], frac: float) -> list[str]:
    """The ids of the bottom `frac` of `scored` items (worst first; None = did not run), as
    `make_preference_pairs` picks its rejected ones."""
    ranked = sorted(scored, key=lambda it: (-_rank_score(it), str(it["algorithm_id"])))
    return [str(it["algorithm_id"]) for it in ranked[::-1][: _take(frac, len(ranked))]]


def _last_logged(history: list[dict[str, Any]], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return float(entry[key])
    return None


def train_dpo(
    model_dir: Path,
    pairs: list[dict[str, Any]],
    out_dir: Path,
    settings: DPOConfig,
    *,
    seed: int = 0,
    adapter: Path | None = None,
) -> DPOResult:
    """Train the model in `model_dir` (plus the LoRA `adapter`, if any) on `pairs` with DPO.

    `settings.lora_rank` 0 is a full fine-tune, saved as a plain HF model dir; the DPO
    reference is a frozen copy of the start model. Otherwise LoRA (alpha = 2 * rank) and only
    the adapter is saved (a PEFT adapter dir over `model_dir`'s weights, megabytes where the
    model is gigabytes): a new adapter of rank `lora_rank`, or, given `adapter` (the current
    version), that adapter trained further, against a frozen copy of it as the reference, so
    every version stays one adapter over the same weights a server already holds. `out_dir`
    appears only once it is complete.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if adapter is not None and not settings.lora_rank:
        raise ValueError("train_dpo got a LoRA adapter to continue but lora_rank 0 (a full fine-tune)")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter dir: no adapter_config.json")
    if not pairs:
        raise ValueError(
            "train_dpo got no preference pairs: score more programs or widen fractions"
        )
    if out_dir.exists():
        raise FileExistsError(f"DPO output dir {out_dir} already exists: pick a new version dir")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model dir: no config.json")
    rows = [
        {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs
    ]

    start = time.perf_counter()
    on_gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    use_cache = model.config.use_cache
    peft_config = None
    if adapter is not None:
        # TRL copies this adapter into a frozen "ref" one: the reference is the current version.
        with warnings.catch_warnings():  # PEFT still calls a deprecated transformers alias
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning)
            model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
    elif settings.lora_rank:
        peft_config = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=2 * settings.lora_rank,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )

    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    # transformers 5.20 renamed gradient_checkpointing to activation_checkpointing; vLLM's
    # environments pin older ones.
    names = {f.name for f in dataclasses.fields(TRLDPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    on_gpu_flags: dict[str, Any] = {checkpointing: on_gpu}
    try:
        with tempfile.TemporaryDirectory(prefix="coevo-dpo-") as scratch, warnings.catch_warnings():
            # TRL 1.16 still calls transformers 5's deprecated gradient_checkpointing* aliases.
            warnings.filterwarnings(
                "ignore", message=".*gradient_checkpointing.*deprecated", category=FutureWarning
            )
            args = TRLDPOConfig(
                output_dir=scratch,
                use_cpu=not on_gpu,
                # TRL defaults bf16 to True; on CPU that autocasts a float32 model to bf16.
                bf16=on_gpu and torch.cuda.is_bf16_supported(),
                # Trades compute for memory: worth it on a GPU, only slower on CPU-sized models.
                **on_gpu_flags,
                per_device_train_batch_size=settings.batch_size,
                num_train_epochs=settings.epochs,
                learning_rate=settings.learning_rate,
                beta=settings.beta,
                max_length=settings.max_length,
                seed=seed,
                data_seed=seed,
                report_to=[],
                save_strategy="no",
                logging_steps=1,
                disable_tqdm=True,
            )
            trainer = DPOTrainer(
                model=model,
                ref_model=None,
                args=args,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tokenizer,
                peft_config=peft_config,
            )
            # With tqdm off, Trainer prints every log dict to stdout; we log one summary line.
            trainer.remove_callback(PrinterCallback)
            output = trainer.train()
            history = list(trainer.state.log_history)
            trained = trainer.accelerator.unwrap_model(trainer.model)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()

    if settings.lora_rank:
        if "ref" in trained.peft_config:
            trained.delete_adapter("ref")
        _save_atomically(trained, None, out_dir)
    else:
        # Trainer sets config.use_cache = False for training; saved as is, generation would be slow.
        trained.config.use_cache = use_cache
        _save_atomically(trained, tokenizer, out_dir)

    duration = time.perf_counter() - start
    final_loss = _last_logged(history, "loss")
    result = DPOResult(
        out_dir=out_dir,
        num_pairs=len(pairs),
        final_loss=final_loss if final_loss is not None else float(output.training_loss),
        duration_s=duration,
        reward_accuracy=_last_logged(history, "rewards/accuracies"),
        reward_margin=_last_logged(history, "rewards/margins"),
    )
    log.info(
        "DPO: %d pairs, final loss %.4f, reward accuracy %s, %.1f s -> %s",
        result.num_pairs,
        result.final_loss,
        "n/a" if result.reward_accuracy is None else f"{result.reward_accuracy:.2f}",
        result.duration_s,
        out_dir,
    )
    return result


def _save_atomically(model: Any, tokenizer: Any | None, out_dir: Path) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
