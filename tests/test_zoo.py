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
from coevo.zoo.build import zoo_checks, zoo_manifest
from coevo.zoo.programs import random_program
from coevo.zoo.skills import SKILLS, make_tasks
from sandbox.policy import check_program


@pytest.mark.slow
def test_zoo_layout_loads_with_transformers(zoo_dir: Path) -> None:
    for sub in ["base", "generator", *(f"experts/{s}" for s in SKILLS)]:
        model = AutoModelForCausalLM.from_pretrained(zoo_dir / sub)
        tokenizer = AutoTokenizer.from_pretrained(zoo_dir / sub)
        assert model.config.model_type == "llama"
        assert len(tokenizer) == model.config.vocab_size
    tasks = load_tasks(zoo_dir / "tasks")
    assert {t.skill for t in tasks} == set(SKILLS)
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
    assert "merge:task_arithmetic" in proc.stdout and "[PASS] task arithmetic beats base" in proc.stdout
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
