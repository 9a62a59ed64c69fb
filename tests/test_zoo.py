"""The embedded zoo is a real testbed: loadable HF dirs, measured criteria, determinism."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents.tasks import load_tasks
from coevo.zoo import build
from coevo.zoo.build import zoo_checks, zoo_manifest
from coevo.zoo.programs import random_program
from coevo.zoo.skills import DISCOVERY, SKILLS, TRANSFER, base_example, make_tasks
from sandbox.policy import check_program


@pytest.mark.slow
def test_zoo_layout_loads_with_transformers(zoo_dir: Path) -> None:
    models = ["base", "multitask", *(f"experts/{s}" for s in DISCOVERY), *(f"transfer/experts/{s}" for s in TRANSFER)]
    assert sorted(p.name for p in (zoo_dir / "experts").iterdir()) == sorted(DISCOVERY)
    for sub in [*models, "generator"]:
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / sub)
        tokenizer = AutoTokenizer.from_pretrained(zoo_dir / sub)
        assert model.config.model_type == "llama"
        assert len(tokenizer) == model.config.vocab_size
        # vLLM serves head_dim 32 and up
        assert model.config.hidden_size // model.config.num_attention_heads >= 32, sub
    for tasks_dir, skills in [(zoo_dir / "tasks", DISCOVERY), (zoo_dir / "transfer" / "tasks", TRANSFER)]:
        tasks = load_tasks(tasks_dir)
        assert {t.skill for t in tasks} == set(skills)
        dev = {t.prompt for t in tasks if t.split == "dev"}
        test = {t.prompt for t in tasks if t.split == "test"}
        assert dev and test and not dev & test


@pytest.mark.slow
def test_zoo_meets_its_testbed_criteria(zoo_dir: Path) -> None:
    manifest = zoo_manifest(zoo_dir)
    assert manifest is not None
    failed = [f"{name}: {detail}" for name, passed, detail in zoo_checks(manifest) if not passed and "build time" not in name]
    assert not failed, failed


@pytest.mark.slow
def test_zoo_info_cli(zoo_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "coevo", "zoo", "info", str(zoo_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "merge:task_arithmetic" in proc.stdout and "[PASS] task arithmetic beats every single expert" in proc.stdout
    assert "transfer: test accuracy" in proc.stdout and "min/q1/median/q3/max" in proc.stdout
    assert json.loads((zoo_dir / "zoo.json").read_text())["version"] == manifest_version()


def manifest_version() -> int:
    from coevo.zoo.build import ZOO_VERSION

    return ZOO_VERSION


def test_task_sets_are_deterministic_and_disjoint() -> None:
    a = make_tasks(seed=0, n_dev=20, n_test=30)
    b = make_tasks(seed=0, n_dev=20, n_test=30)
    assert a == b
    assert make_tasks(seed=1, n_dev=20, n_test=30) != a
    prompts = [t.prompt for t in a]
    assert len(prompts) == len(set(prompts))
    for task in a:
        if task.skill == "reverse":
            assert task.answer == task.prompt[4:-1][::-1]
    transfer = make_tasks(seed=0, n_dev=20, n_test=30, skills=TRANSFER)
    assert {t.skill for t in transfer} == set(TRANSFER) and not {t.prompt for t in transfer} & set(prompts)
    for task in transfer:
        if task.skill == "sub":
            a_, b_ = task.prompt[4:-1].split()
            assert task.answer == str(int(a_) - int(b_))


def test_pretraining_mixture_holds_every_skill_only_latent_or_narrow() -> None:
    """The base sees each skill fully in its latent notation, and only the narrow slice in the
    tested one: what the experts add is real, and no test prompt is in pre-training."""
    rng = random.Random(0)
    examples = [base_example(rng) for _ in range(4000)]
    tested = {t.prompt for t in make_tasks(seed=0, n_dev=48, n_test=100, skills=DISCOVERY + TRANSFER)}
    for skill in SKILLS.values():
        tested_form = [p for p, _ in examples if p.startswith(f"{skill.keyword} ")]
        latent_form = [p for p, _ in examples if p.startswith(f"{skill.latent}(")]
        assert tested_form and latent_form, skill.name
        assert all(skill.narrow(p[len(skill.keyword) + 1 : -1]) for p in tested_form), skill.name
        assert any(not skill.narrow(p[len(skill.latent) + 1 : -2]) for p in latent_form), skill.name
    narrow_tests = {p for p in tested if any(p.startswith(f"{s.keyword} ") and s.narrow(p[len(s.keyword) + 1 : -1]) for s in SKILLS.values())}
    assert tested - narrow_tests, "most test prompts lie outside the base's narrow slice"


def test_training_is_deterministic_from_the_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, same files: the base, every expert and the multi-task model (few steps)."""
    monkeypatch.setattr(build, "BASE_STEPS", 4)
    monkeypatch.setattr(build, "EXPERT_STEPS", 3)
    monkeypatch.setattr(build, "MULTITASK_STEPS", 3)
    for run in ("a", "b"):
        build._train_models(tmp_path / run, seed=0, held_out=set())
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 2 + len(DISCOVERY) + len(TRANSFER)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_corpus_programs_pass_policy_and_run() -> None:
    rng = random.Random(0)
    for _ in range(100):
        source = random_program(rng)
        assert check_program(source).ok, source
        namespace: dict = {}
        exec(compile(source, "<corpus>", "exec"), namespace)  # our own corpus, not generated code
        for shape in [(7,), (6, 5)]:
            out = namespace["merge"]([torch.randn(shape) for _ in range(3)], name="model.layers.0.mlp.up_proj.weight", base=torch.randn(shape))
            assert out.shape == torch.Size(shape) and torch.isfinite(out).all()


def _manifest(discovery: dict[str, list[float]], transfer: dict[str, list[float]], quartiles: list[float]) -> dict:
    def table(rows: dict[str, list[float]], skills: list[str]) -> dict:
        return {name: {**dict(zip(skills, v, strict=True)), "average": sum(v) / len(v)} for name, v in rows.items()}

    return {
        "skills": list(DISCOVERY), "transfer_skills": list(TRANSFER), "build_seconds": 300.0,
        "scores": table(discovery, list(DISCOVERY)),
        "transfer": {"scores": table(transfer, list(TRANSFER))},
        "generator": {"executable_rate": 0.9, "dev_quartiles": quartiles},
    }


TRANSFER_OK = {
    "base": [40, 30, 35], "expert:sym": [100, 30, 35], "expert:sub": [40, 85, 35], "expert:rotate": [40, 30, 100],
    "merge:task_arithmetic": [80, 60, 90], "merge:ties": [70, 40, 45],
}


def test_zoo_checks_fail_where_merging_does_not_pay() -> None:
    """Zoo v1's numbers (seed 0): every expert beat every merge. The checks must say so."""
    v1 = _manifest(
        {"base": [23, 36, 52], "expert:upper": [100, 36, 51], "expert:reverse": [23, 72, 51],
         "expert:add": [23, 36, 98], "multitask": [99, 41, 93], "merge:task_arithmetic": [23, 39, 66],
         "merge:ties": [23, 34, 58], "merge:dare": [23, 37, 61], "merge:model_stock": [23, 36, 52]},
        TRANSFER_OK, [30.0, 31.0, 32.0, 33.0, 40.0],
    )
    failed = {name for name, passed, _ in zoo_checks(v1) if not passed}
    assert failed == {
        "task arithmetic beats every single expert on the average by >= 10",
        "seed generator: dev scores of executable programs spread (interquartile range >= 10)",
    }


def test_zoo_checks_fail_where_merging_leaves_nothing_to_discover() -> None:
    too_easy = _manifest(
        {"base": [23, 36, 45], "expert:upper": [100, 36, 45], "expert:reverse": [23, 100, 45],
         "expert:add": [23, 36, 98], "multitask": [100, 100, 99], "merge:task_arithmetic": [98, 96, 90],
         "merge:ties": [60, 40, 50], "merge:dare": [60, 45, 55], "merge:model_stock": [23, 36, 47]},
        TRANSFER_OK, [20.0, 35.0, 45.0, 55.0, 70.0],
    )
    failed = [name for name, passed, _ in zoo_checks(too_easy) if not passed]
    assert failed == ["the multi-task model leaves >= 8 points above task arithmetic"]


@pytest.mark.slow
def test_zoo_manifest_numbers_are_reproduced_by_a_fresh_measurement(zoo_dir: Path) -> None:
    """zoo.json tells the truth: the base, an expert and the multi-task model, re-scored."""
    from agents.answerer import Answerer

    manifest = zoo_manifest(zoo_dir)
    assert manifest is not None
    test = [t for t in load_tasks(zoo_dir / "tasks") if t.split == "test"]
    answerer = Answerer(zoo_dir / "base")
    for name, path in [("base", "base"), ("expert:upper", "experts/upper"), ("multitask", "multitask")]:
        answers = answerer.answer_tasks(zoo_dir / path, test)
        for skill in DISCOVERY:
            pairs = [(a, t.answer) for a, t in zip(answers, test, strict=True) if t.skill == skill]
            accuracy = 100 * sum(a == ref for a, ref in pairs) / len(pairs)
            assert accuracy == pytest.approx(manifest["scores"][name][skill]), (name, skill)


def test_seed_generator_is_deterministic_across_processes(tmp_path: Path) -> None:
    """The build trains the generator in a fresh process: same seed, same weights, every time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    for run in ("a", "b"):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(build._train_generator, tmp_path / run, 0, 1, 2).result()
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_generator_dev_quartiles() -> None:
    assert build._quartiles([40.0, 10.0, 30.0, 20.0, 50.0]) == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert build._quartiles([1.0, 2.0]) == [1.0, 1.2, 1.5, 1.8, 2.0]
    assert build._quartiles([7.0]) == [7.0] * 5


def test_a_cached_zoo_of_another_skill_set_is_not_used(tmp_path: Path) -> None:
    """The first zoo v2 had `shift` among its transfer skills; its cache must be rebuilt, not
    read as today's zoo."""
    manifest = {"version": build.ZOO_VERSION, "skills": list(DISCOVERY), "transfer_skills": list(TRANSFER)}
    (tmp_path / "zoo.json").write_text(json.dumps(manifest))
    assert zoo_manifest(tmp_path) == manifest
    (tmp_path / "zoo.json").write_text(json.dumps({**manifest, "transfer_skills": ["shift", "sub", "rotate"]}))
    assert zoo_manifest(tmp_path) is None
    (tmp_path / "zoo.json").write_text(json.dumps({**manifest, "version": build.ZOO_VERSION - 1}))
    assert zoo_manifest(tmp_path) is None
    assert SKILLS["sym"].answer("abj") == "!#^" and "shift" not in SKILLS
