"""Build the embedded tiny zoo: base LM, skill experts, task sets and a seed generator.

Layout: `base/`, `experts/<skill>` (discovery), `tasks/`, `transfer/experts/<skill>`,
`transfer/tasks/`, `multitask/` (the ceiling a merge approaches), `generator/`, `zoo.json`.
Everything is deterministic given the seed (and the machine's core count, which sets the
training threads) and is measured on the way, so `coevo zoo info` can show that the zoo is a
real testbed: experts learn their skills, merging pays, there is room above task arithmetic,
the reference merges differ, and the generator writes valid programs of varied quality.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.utils import logging as hf_logging

from agents.answerer import Answerer
from agents.baselines import baseline_merge
from agents.console import progress, say
from agents.generator import FENCE, extract_program, format_exemplars
from agents.judge import exact_scores, mean_score
from agents.loop import run_merge_jobs
from agents.prompts import load_prompt
from agents.tasks import Task, load_tasks, save_tasks
from coevo.zoo.generator import build_generator
from coevo.zoo.skills import DISCOVERY, SKILLS, TRANSFER, base_example, make_tasks
from coevo.zoo.tiny import char_tokenizer, tiny_llama_config
from coevo.zoo.train import encode_pairs, train_lm
from merging.writer import share_readable

ZOO_VERSION = 2
# Sizes and schedules, found by measurement (BENCHMARKS.md, "Finding the regime where merging pays"):
# head_dim 32, so vLLM can serve the zoo's models; the build takes a few minutes on 2 cores.
BASE = dict(hidden_size=128, layers=2, heads=4, intermediate_size=256, max_positions=64)
BASE_STEPS, BASE_LR = 1500, 3e-3
EXPERT_STEPS, EXPERT_LR = 300, 4e-4
# Share of an expert's batches replayed from base pre-training: fine-tunes stay close to the
# base, the regime in which task vectors add up (as for real pretrained LMs).
EXPERT_REPLAY = 0.3
# The multi-task fine-tune (the ceiling a merge approaches) gets every expert's budget.
MULTITASK_STEPS = EXPERT_STEPS * len(DISCOVERY)
GENERATOR_STEPS = 450
N_DEV, N_TEST = 48, 100
GENERATOR_CHECK_SAMPLES = 32
MERGE_METHODS = ("task_arithmetic", "ties", "dare", "model_stock")
BUILD_LIMIT_S = 360


def default_zoo_dir(seed: int) -> Path:
    return Path.home() / ".cache" / "coevo" / f"zoo-v{ZOO_VERSION}-s{seed}"


def zoo_manifest(zoo_dir: Path) -> dict | None:
    path = Path(zoo_dir) / "zoo.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    current = (
        manifest.get("version") == ZOO_VERSION
        and manifest.get("skills") == list(DISCOVERY)
        and manifest.get("transfer_skills") == list(TRANSFER)
    )
    return manifest if current else None  # a zoo of another version or skill set is rebuilt


def ensure_zoo(zoo_dir: Path, *, seed: int, runner_kind: str = "auto") -> Path:
    """The zoo at zoo_dir, built first if it is missing or from another zoo version."""
    if zoo_manifest(zoo_dir) is None:
        say(f"[zoo] building the embedded tiny zoo in {zoo_dir} (first launch only)")
        manifest = build_zoo(zoo_dir, seed=seed, runner_kind=runner_kind)
        for name, passed, detail in zoo_checks(manifest):
            say(f"[zoo] {'PASS' if passed else 'FAIL'} {name}: {detail}")
        older = sorted(p for p in Path(zoo_dir).parent.glob("zoo-v*-s*") if not p.name.startswith(f"zoo-v{ZOO_VERSION}-"))
        if older:
            say(f"[zoo] older zoo versions are still cached and no longer used: {', '.join(map(str, older))} (safe to delete)")
    share_readable(Path(zoo_dir))  # sandbox containers read it as another user
    return Path(zoo_dir)


def _skill_scores(answerer: Answerer, model_dir: Path, tasks: list[Task]) -> dict[str, float]:
    """Accuracy (%) per skill of `tasks`, and their average."""
    answers = answerer.answer_tasks(model_dir, tasks)
    scored = {s.task_id: s for s in exact_scores(tasks, answers)}
    skills = list(dict.fromkeys(t.skill for t in tasks))
    per_skill = {
        skill: mean_score([scored[t.task_id] for t in tasks if t.skill == skill]) for skill in skills
    }
    per_skill["average"] = sum(per_skill.values()) / len(skills)
    return per_skill


def _fine_tune(
    base: LlamaForCausalLM, skills: tuple[str, ...], steps: int, seed: int, held_out: set[str], label: str
) -> LlamaForCausalLM:
    """A copy of base fine-tuned on the full domain of `skills`, with base replay."""
    tokenizer = char_tokenizer()
    model = copy.deepcopy(base)

    def item(rng: random.Random) -> tuple[list[int], list[int]]:
        if rng.random() < EXPERT_REPLAY:
            return encode_pairs(tokenizer, [base_example(rng)], prompt_loss=False)[0]
        while True:
            prompt, answer = SKILLS[rng.choice(skills)].example(rng)
            if prompt not in held_out:
                return encode_pairs(tokenizer, [(prompt, answer)], prompt_loss=False)[0]

    started = time.time()
    with progress(label, steps) as advance:
        loss = train_lm(
            model, item, steps=steps, batch_size=64, lr=EXPERT_LR, seed=seed, pad_id=0,
            on_step=lambda step, loss: advance(info=f"loss {loss:.3f}"),
        )
    say(f"[zoo] {label} fine-tuned in {time.time() - started:.0f}s (loss {loss:.3f})")
    return model


def _save(model: LlamaForCausalLM, out: Path) -> None:
    model.save_pretrained(out)
    char_tokenizer().save_pretrained(out)


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
    _save(base, tmp / "base")
    for index, skill in enumerate(DISCOVERY + TRANSFER):
        where = tmp / "experts" if skill in DISCOVERY else tmp / "transfer" / "experts"
        expert = _fine_tune(base, (skill,), EXPERT_STEPS, seed * 100 + index + 1, held_out, f"expert {skill}")
        _save(expert, where / skill)
    multitask = _fine_tune(base, DISCOVERY, MULTITASK_STEPS, seed * 100 + 99, held_out, "multi-task model")
    _save(multitask, tmp / "multitask")


def _expert_dirs(zoo_dir: Path, skills: tuple[str, ...]) -> list[Path]:
    where = zoo_dir / "experts" if skills == DISCOVERY else zoo_dir / "transfer" / "experts"
    return [where / skill for skill in skills]


def _measure_set(
    answerer: Answerer, zoo_dir: Path, tmp: Path, skills: tuple[str, ...], tasks_dir: Path, methods: tuple[str, ...]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Test accuracy of the base, each expert and each reference merge of one expert set."""
    all_tasks = load_tasks(tasks_dir)
    test = [t for t in all_tasks if t.split == "test"]
    dev = [t for t in all_tasks if t.split == "dev"]
    experts = _expert_dirs(zoo_dir, skills)
    scores = {"base": _skill_scores(answerer, zoo_dir / "base", test)}
    for skill, path in zip(skills, experts, strict=True):
        scores[f"expert:{skill}"] = _skill_scores(answerer, path, test)
    if skills == DISCOVERY:
        scores["multitask"] = _skill_scores(answerer, zoo_dir / "multitask", test)
    params = {}
    for method in methods:
        out = tmp / f"{'discovery' if skills == DISCOVERY else 'transfer'}-{method}"
        params[method] = baseline_merge(method, zoo_dir / "base", experts, out, answerer=answerer, dev_tasks=dev)
        scores[f"merge:{method}"] = _skill_scores(answerer, out, test)
    return scores, params


def measure_zoo(zoo_dir: Path, *, runner_kind: str = "auto") -> dict:
    """The testbed's numbers: per-skill test accuracy of the base, the experts, the multi-task
    model and the reference merges, on the discovery and the transfer skills; and the seed
    generator's programs: how many pass the policy and execute, and their dev scores."""
    zoo_dir = Path(zoo_dir)
    answerer = Answerer(zoo_dir / "base", max_new_tokens=8)
    with tempfile.TemporaryDirectory() as tmp:
        scores, params = _measure_set(answerer, zoo_dir, Path(tmp), DISCOVERY, zoo_dir / "tasks", MERGE_METHODS)
        transfer, transfer_params = _measure_set(
            answerer, zoo_dir, Path(tmp), TRANSFER, zoo_dir / "transfer" / "tasks", ("task_arithmetic", "ties")
        )
        dev = [t for t in load_tasks(zoo_dir / "tasks") if t.split == "dev"]
        generator = _check_generator(zoo_dir, Path(tmp), runner_kind, answerer, dev)
    return {
        "scores": scores,
        "merge_params": params,
        "transfer": {"scores": transfer, "merge_params": transfer_params},
        "generator": generator,
    }


def _quartiles(values: list[float]) -> list[float]:
    """min, 25th, 50th, 75th percentile and max (linear interpolation between the data points)."""
    if len(values) < 2:
        return [round(values[0], 1)] * 5
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [round(v, 1) for v in (min(values), q1, median, q3, max(values))]


def _check_generator(zoo_dir: Path, tmp: Path, runner_kind: str, answerer: Answerer, dev: list[Task]) -> dict:
    from agents.backends import TransformersBackend
    from sandbox.jobs import MergeJob, SandboxLimits
    from sandbox.runners import make_runner

    experts = _expert_dirs(zoo_dir, DISCOVERY)
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
    dev_scores = []
    for job, result in zip(jobs, results, strict=True):
        verdicts[result.verdict] = verdicts.get(result.verdict, 0) + 1
        if result.verdict == "ok":
            dev_scores.append(round(mean_score(exact_scores(dev, answerer.answer_tasks(job.out_dir, dev))), 1))
    return {
        "samples": len(results),
        "temperature": 1.0,
        "executable_rate": verdicts.get("ok", 0) / len(results),
        "verdicts": verdicts,
        "runner": runner.name,
        "dev_scores": dev_scores,
        "dev_quartiles": _quartiles(dev_scores) if dev_scores else None,
    }


def _train_generator(out: Path, seed: int, threads: int, steps: int = GENERATOR_STEPS) -> tuple[float, float]:
    """The seed generator (run in its own process): its final loss and training seconds."""
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    started = time.time()
    loss = build_generator(out, load_prompt("generator"), n_experts=len(DISCOVERY), seed=seed, steps=steps)
    return loss, time.time() - started


@contextmanager
def _no_transformers_bars() -> Iterator[None]:
    """Keep the build's output one line per stage: no weight-loading or shard-writing bars."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def build_zoo(out_dir: Path, *, seed: int = 0, runner_kind: str = "auto") -> dict:
    """Build, measure and atomically install the zoo at out_dir; returns its manifest."""
    with _no_transformers_bars():
        return _build_zoo(Path(out_dir), seed, runner_kind)


def _build_zoo(out_dir: Path, seed: int, runner_kind: str) -> dict:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        tasks = make_tasks(seed=seed, n_dev=N_DEV, n_test=N_TEST, skills=DISCOVERY)
        transfer_tasks = make_tasks(seed=seed, n_dev=N_DEV, n_test=N_TEST, skills=TRANSFER)
        save_tasks(tasks, tmp / "tasks")
        save_tasks(transfer_tasks, tmp / "transfer" / "tasks")
        # Models this small use cores poorly: the seed generator trains in a second process
        # beside the LMs, each on half the cores (same thread counts every build: deterministic).
        threads = max(1, (os.cpu_count() or 2) // 2)
        say(f"[zoo] the seed generator trains in a second process ({threads} thread(s) each)")
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            generator = pool.submit(_train_generator, tmp / "generator", seed, threads)
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                _train_models(tmp, seed, held_out={t.prompt for t in tasks + transfer_tasks})
            finally:
                torch.set_num_threads(previous)
            if not generator.done():
                say("[zoo] waiting for the seed generator")
            loss, seconds = generator.result()
        say(f"[zoo] seed generator trained in {seconds:.0f}s (loss {loss:.3f})")
        train_seconds = time.time() - started
        share_readable(tmp)
        measured = measure_zoo(tmp, runner_kind=runner_kind)
        manifest = {
            "version": ZOO_VERSION,
            "seed": seed,
            "skills": list(DISCOVERY),
            "transfer_skills": list(TRANSFER),
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


# The testbed's acceptance thresholds (issue 11); `coevo zoo info` prints each check.
EXPERT_GAIN = 30.0  # each expert over the base, on its own skill
MERGE_PAYS = 10.0  # task arithmetic over the best single expert, on the experts' average
ROOM = 8.0  # the multi-task ceiling over task arithmetic
METHOD_SPAN = 5.0  # spread of the four reference merges
EXECUTABLE = 0.6  # share of the seed generator's samples that pass the policy and execute
DEV_SPREAD = 10.0  # interquartile range of those programs' dev scores


def _set_checks(scores: dict, skills: list[str], label: str) -> list[tuple[str, bool, str]]:
    base = scores["base"]
    checks = []
    for skill in skills:
        gain = scores[f"expert:{skill}"][skill] - base[skill]
        checks.append(
            (f"{label}expert {skill} beats the base on {skill} by >= {EXPERT_GAIN:.0f}", gain >= EXPERT_GAIN,
             f"{gain:+.1f}")
        )
    ta = scores["merge:task_arithmetic"]["average"]
    best = max(skills, key=lambda s: scores[f"expert:{s}"]["average"])
    lead = ta - scores[f"expert:{best}"]["average"]
    checks.append(
        (f"{label}task arithmetic beats every single expert on the average by >= {MERGE_PAYS:.0f}",
         lead >= MERGE_PAYS, f"{ta:.1f} vs expert:{best} {scores[f'expert:{best}']['average']:.1f} ({lead:+.1f})")
    )
    return checks


def zoo_checks(manifest: dict) -> list[tuple[str, bool, str]]:
    """The testbed criteria, each as (name, passed, detail)."""
    scores = manifest["scores"]
    checks = _set_checks(scores, manifest["skills"], "")
    transfer = manifest["transfer"]["scores"]
    checks += _set_checks(transfer, manifest["transfer_skills"], "transfer: ")
    ta = scores["merge:task_arithmetic"]["average"]
    ceiling = scores["multitask"]["average"]
    checks.append(
        (f"the multi-task model leaves >= {ROOM:.0f} points above task arithmetic", ceiling - ta >= ROOM,
         f"{ceiling:.1f} vs {ta:.1f} ({ceiling - ta:+.1f})")
    )
    merges = {m: scores[f"merge:{m}"]["average"] for m in MERGE_METHODS}
    span = max(merges.values()) - min(merges.values())
    checks.append(
        (f"task arithmetic, TIES, DARE and Model Stock span >= {METHOD_SPAN:.0f} points", span >= METHOD_SPAN,
         ", ".join(f"{m} {v:.1f}" for m, v in merges.items()) + f" (span {span:.1f})")
    )
    gen = manifest["generator"]
    rate = gen["executable_rate"]
    checks.append(
        (f"seed generator: >= {100 * EXECUTABLE:.0f}% of samples at T=1.0 pass the policy and execute",
         rate >= EXECUTABLE, f"{100 * rate:.0f}%")
    )
    quartiles = gen["dev_quartiles"]
    spread = quartiles[3] - quartiles[1] if quartiles else 0.0
    checks.append(
        (f"seed generator: dev scores of executable programs spread (interquartile range >= {DEV_SPREAD:.0f})",
         spread >= DEV_SPREAD,
         "min/q1/median/q3/max " + "/".join(f"{q:.1f}" for q in quartiles) if quartiles else "no executable program")
    )
    build = manifest["build_seconds"]
    checks.append((f"build time <= {BUILD_LIMIT_S} s", build <= BUILD_LIMIT_S, f"{build:.0f}s"))
    return checks


def _table(title: str, scores: dict[str, dict[str, float]], skills: list[str]) -> list[str]:
    width = max(len(k) for k in scores) + 2
    lines = [title.ljust(width) + "".join(s.rjust(10) for s in [*skills, "average"])]
    for name, row in scores.items():
        lines.append(name.ljust(width) + "".join(f"{row[s]:10.1f}" for s in [*skills, "average"]))
    return lines


def format_zoo_info(zoo_dir: Path, manifest: dict) -> str:
    lines = [f"zoo {zoo_dir} (version {manifest['version']}, seed {manifest['seed']})", ""]
    lines += _table("discovery: test accuracy (%)", manifest["scores"], manifest["skills"])
    lines.append("")
    lines += _table("transfer: test accuracy (%)", manifest["transfer"]["scores"], manifest["transfer_skills"])
    gen = manifest["generator"]
    quartiles = gen["dev_quartiles"]
    params = {**manifest["merge_params"], **{f"transfer {m}": p for m, p in manifest["transfer"]["merge_params"].items()}}
    lines += [
        "",
        f"seed generator: {gen['samples']} samples at T={gen['temperature']}, "
        f"{100 * gen['executable_rate']:.0f}% executable ({gen['runner']} sandbox; {gen['verdicts']})",
        "  dev score of executable programs, min/q1/median/q3/max: "
        + ("/".join(f"{q:.1f}" for q in quartiles) if quartiles else "-"),
        "merge parameters: " + ", ".join(f"{m} {p}" for m, p in params.items() if p),
        f"build time: {manifest['build_seconds']:.0f}s (training {manifest['train_seconds']:.0f}s)",
        "",
    ]
    for name, passed, detail in zoo_checks(manifest):
        lines.append(f"[{'PASS' if passed else 'FAIL'}] {name}: {detail}")
    return "\n".join(lines)
