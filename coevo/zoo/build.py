"""Build the embedded tiny zoo: base LM, skill experts, task sets and a seed generator.

Everything is deterministic given the seed and is measured on the way, so `coevo zoo info`
can show that the zoo is a real testbed (experts beat the base, merges differ, the
generator writes valid programs).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from agents.answerer import Answerer
from agents.baselines import baseline_merge
from agents.console import progress, say
from agents.generator import FENCE, extract_program, format_exemplars
from agents.judge import exact_scores, mean_score
from agents.loop import run_merge_jobs
from agents.prompts import load_prompt
from agents.tasks import Task, load_tasks, save_tasks
from coevo.zoo.generator import build_generator
from coevo.zoo.skills import SKILLS, base_example, make_tasks
from coevo.zoo.tiny import char_tokenizer, tiny_llama_config
from coevo.zoo.train import encode_pairs, train_lm
from merging.io import share_readable

ZOO_VERSION = 1
# Sizes and schedules, chosen so the build takes a few minutes on 2 CPU cores.
BASE = dict(hidden_size=64, layers=2, heads=4, intermediate_size=128, max_positions=64)
BASE_STEPS, BASE_LR = 1500, 3e-3
EXPERT_STEPS, EXPERT_LR = 400, 5e-4
# Share of an expert's batches replayed from base pre-training: fine-tunes stay close to the
# base, the regime in which task vectors add up (as for real pretrained LMs).
EXPERT_REPLAY = 0.3
GENERATOR_STEPS = 450
N_DEV, N_TEST = 48, 100
GENERATOR_CHECK_SAMPLES = 32
MERGE_METHODS = ("task_arithmetic", "ties", "dare", "model_stock")


def default_zoo_dir(seed: int) -> Path:
    return Path.home() / ".cache" / "coevo" / f"zoo-v{ZOO_VERSION}-s{seed}"


def zoo_manifest(zoo_dir: Path) -> dict | None:
    path = Path(zoo_dir) / "zoo.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("version") == ZOO_VERSION else None


def ensure_zoo(zoo_dir: Path, *, seed: int, runner_kind: str = "auto") -> Path:
    """The zoo at zoo_dir, built first if it is missing or from another zoo version."""
    if zoo_manifest(zoo_dir) is None:
        say(f"[zoo] building the embedded tiny zoo in {zoo_dir} (first launch only)")
        manifest = build_zoo(zoo_dir, seed=seed, runner_kind=runner_kind)
        for name, passed, detail in zoo_checks(manifest):
            say(f"[zoo] {'PASS' if passed else 'FAIL'} {name}: {detail}")
    share_readable(Path(zoo_dir))  # sandbox containers read it as another user
    return Path(zoo_dir)


def _skill_scores(answerer: Answerer, model_dir: Path, tasks: list[Task]) -> dict[str, float]:
    answers = answerer.answer(model_dir, [t.prompt for t in tasks])
    scored = {s.task_id: s for s in exact_scores(tasks, answers)}
    per_skill = {
        skill: mean_score([scored[t.task_id] for t in tasks if t.skill == skill]) for skill in SKILLS
    }
    per_skill["average"] = sum(per_skill.values()) / len(SKILLS)
    return per_skill


def _train_models(tmp: Path, seed: int, held_out: set[str]) -> None:
    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    base = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **BASE))

    def base_item(rng: random.Random) -> tuple[list[int], list[int]]:
        return encode_pairs(tokenizer, [base_example(rng)], prompt_loss=False)[0]

    started = time.time()
    with progress("base LM", BASE_STEPS) as advance:
        loss = train_lm(
            base, base_item, steps=BASE_STEPS, batch_size=64, lr=BASE_LR, seed=seed, pad_id=0,
            on_step=lambda step, loss: advance(info=f"loss {loss:.3f}"),
        )
    say(f"[zoo] base LM trained in {time.time() - started:.0f}s (loss {loss:.3f})")
    base.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")

    for index, skill in enumerate(SKILLS):
        expert = copy.deepcopy(base)

        def skill_item(rng: random.Random, skill: str = skill) -> tuple[list[int], list[int]]:
            if rng.random() < EXPERT_REPLAY:
                return base_item(rng)
            while True:
                prompt, answer = SKILLS[skill](rng)
                if prompt not in held_out:
                    return encode_pairs(tokenizer, [(prompt, answer)], prompt_loss=False)[0]

        started = time.time()
        with progress(f"expert {skill}", EXPERT_STEPS) as advance:
            loss = train_lm(
                expert, skill_item, steps=EXPERT_STEPS, batch_size=64, lr=EXPERT_LR,
                seed=seed * 100 + index + 1, pad_id=0,
                on_step=lambda step, loss: advance(info=f"loss {loss:.3f}"),
            )
        say(f"[zoo] expert {skill} fine-tuned in {time.time() - started:.0f}s (loss {loss:.3f})")
        expert.save_pretrained(tmp / "experts" / skill)
        tokenizer.save_pretrained(tmp / "experts" / skill)


def measure_zoo(zoo_dir: Path, *, runner_kind: str = "auto") -> dict:
    """The testbed's numbers: per-skill test accuracy of base, experts, built-in merges, and
    the share of seed-generator samples that pass the policy and execute in the sandbox."""
    zoo_dir = Path(zoo_dir)
    all_tasks = load_tasks(zoo_dir / "tasks")
    tasks = [t for t in all_tasks if t.split == "test"]
    dev = [t for t in all_tasks if t.split == "dev"]
    experts = [zoo_dir / "experts" / skill for skill in SKILLS]
    answerer = Answerer(zoo_dir / "base", max_new_tokens=8)
    scores: dict[str, dict[str, float]] = {"base": _skill_scores(answerer, zoo_dir / "base", tasks)}
    for skill, path in zip(SKILLS, experts, strict=True):
        scores[f"expert:{skill}"] = _skill_scores(answerer, path, tasks)
    params = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in MERGE_METHODS:
            out = Path(tmp) / method
            params[method] = baseline_merge(method, zoo_dir / "base", experts, out, answerer=answerer, dev_tasks=dev)
            scores[f"merge:{method}"] = _skill_scores(answerer, out, tasks)
        generator = _check_generator(zoo_dir, experts, Path(tmp), runner_kind)
    return {"scores": scores, "merge_params": params, "generator": generator}


def _check_generator(zoo_dir: Path, experts: list[Path], tmp: Path, runner_kind: str) -> dict:
    from agents.backends import TransformersBackend
    from sandbox.jobs import MergeJob, SandboxLimits
    from sandbox.runners import make_runner

    backend = TransformersBackend(zoo_dir / "generator")
    prompt = load_prompt("generator").render(n_experts=len(experts), exemplars=format_exemplars([]))
    completions = backend.generate(
        [prompt], n=GENERATOR_CHECK_SAMPLES, temperature=1.0, max_new_tokens=320, seed=0,
        stop=[FENCE],
    )[0]
    runner = make_runner(runner_kind, SandboxLimits(timeout_s=60, memory_mb=2048))
    jobs = [
        MergeJob(source=extract_program(c), base_dir=zoo_dir / "base", expert_dirs=experts, out_dir=tmp / f"gen{i}")
        for i, c in enumerate(completions)
    ]
    try:
        results = run_merge_jobs(runner, jobs, workers=2, label=f"generator check ({runner.description})")
    finally:
        runner.close()
    verdicts: dict[str, int] = {}
    for result in results:
        verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1
    return {
        "samples": len(results),
        "temperature": 1.0,
        "executable_rate": verdicts.get("ok", 0) / len(results),
        "verdicts": verdicts,
        "runner": runner.name,
    }


def build_zoo(out_dir: Path, *, seed: int = 0, runner_kind: str = "auto") -> dict:
    """Build, measure and atomically install the zoo at out_dir; returns its manifest."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        tasks = make_tasks(seed=seed, n_dev=N_DEV, n_test=N_TEST)
        save_tasks(tasks, tmp / "tasks")
        _train_models(tmp, seed, held_out={t.prompt for t in tasks})
        gen_started = time.time()
        with progress("seed generator", GENERATOR_STEPS) as advance:
            loss = build_generator(
                tmp / "generator", load_prompt("generator"), n_experts=len(SKILLS), seed=seed,
                steps=GENERATOR_STEPS, on_step=lambda step, loss: advance(info=f"loss {loss:.3f}"),
            )
        say(f"[zoo] seed generator trained in {time.time() - gen_started:.0f}s (loss {loss:.3f})")
        train_seconds = time.time() - started
        share_readable(tmp)
        measured = measure_zoo(tmp, runner_kind=runner_kind)
        manifest = {
            "version": ZOO_VERSION,
            "seed": seed,
            "skills": list(SKILLS),
            "build_seconds": round(time.time() - started, 1),
            "train_seconds": round(train_seconds, 1),
            **measured,
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"[zoo] built in {manifest['build_seconds']:.0f}s: {out_dir}")
    return manifest


def zoo_checks(manifest: dict) -> list[tuple[str, bool, str]]:
    """The testbed criteria, each as (name, passed, detail)."""
    scores = manifest["scores"]
    base = scores["base"]
    checks = []
    for skill in manifest["skills"]:
        gain = scores[f"expert:{skill}"][skill] - base[skill]
        checks.append((f"expert {skill} beats base on {skill} by >= 20", gain >= 20, f"+{gain:.1f}"))
    ta = scores["merge:task_arithmetic"]["average"]
    checks.append(("task arithmetic beats base on average", ta > base["average"], f"{ta:.1f} vs {base['average']:.1f}"))
    ties = scores["merge:ties"]["average"]
    others = {m: scores[f"merge:{m}"]["average"] for m in MERGE_METHODS if m not in ("task_arithmetic", "ties")}
    # The third method that widens the spread of the three the most.
    third = max(others, key=lambda m: max(ta, ties, others[m]) - min(ta, ties, others[m]))
    trio = [ta, ties, others[third]]
    checks.append(
        (
            "task arithmetic (scale tuned on dev) and TIES differ by >= 3, and with one more method span >= 3",
            abs(ta - ties) >= 3 and max(trio) - min(trio) >= 3,
            f"TA {ta:.1f}, TIES {ties:.1f}, {third} {others[third]:.1f}",
        )
    )
    rate = manifest["generator"]["executable_rate"]
    checks.append(("seed generator: >= 60% of samples at T=1.0 pass policy and execute", rate >= 0.6, f"{100 * rate:.0f}%"))
    checks.append(("build time <= 300 s", manifest["build_seconds"] <= 300, f"{manifest['build_seconds']:.0f}s"))
    return checks


def format_zoo_info(zoo_dir: Path, manifest: dict) -> str:
    scores = manifest["scores"]
    skills = manifest["skills"]
    width = max(len(k) for k in scores) + 2
    lines = [f"zoo {zoo_dir} (version {manifest['version']}, seed {manifest['seed']})", ""]
    lines.append("test accuracy (%)".ljust(width) + "".join(s.rjust(10) for s in [*skills, "average"]))
    for name, row in scores.items():
        lines.append(name.ljust(width) + "".join(f"{row[s]:10.1f}" for s in [*skills, "average"]))
    gen = manifest["generator"]
    lines += [
        "",
        f"seed generator: {gen['samples']} samples at T={gen['temperature']}, "
        f"{100 * gen['executable_rate']:.0f}% executable ({gen['runner']} sandbox; {gen['verdicts']})",
        "merge parameters: " + ", ".join(f"{m} {p}" for m, p in manifest["merge_params"].items() if p),
        f"build time: {manifest['build_seconds']:.0f}s (training {manifest['train_seconds']:.0f}s)",
        "",
    ]
    for name, passed, detail in zoo_checks(manifest):
        lines.append(f"[{'PASS' if passed else 'FAIL'}] {name}: {detail}")
    return "\n".join(lines)
