"""Bad input gets one clear line and exit code 2, never a stack trace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agents.generator import extract_program, format_exemplars
from agents.prompts import PromptError, load_prompt
from agents.tasks import TaskFileError, load_tasks
from coevo.config import ConfigError, load_config, parse_config


def coevo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coevo", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]


def test_defaults_are_the_quickstart() -> None:
    config = load_config(None)
    assert config.session.iterations == 3
    assert config.generator.programs_per_iteration == 64
    assert config.dpo.enabled


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"sesion": {"iterations": 2}}, "sesion: unknown key"),
        ({"session": {"iterations": 0}}, "session.iterations: Input should be greater than or equal to 1"),
        ({"generator": {"backend": "gpt"}}, "generator.backend"),
        ({"models": {"experts": ["a"]}}, "models.experts given without models.base"),
        ({"sandbox": {"runner": "vm"}}, "sandbox.runner"),
        ({"generator": {"backend": "openai", "model": "g", "base_url": "http://h:1/v1"}},
         "dpo.lora_rank: a served generator (generator.backend = 'openai') learns through LoRA adapters"),
        ({"generator": {"model": "g", "base_url": "http://h:1/v1"}, "dpo": {"lora_rank": 8},
          "models": {"base": "/b", "experts": ["/e"], "tasks": "/t"}},
         "generator.weights: a served generator that DPO trains needs the local HF dir its server serves"),
    ],
)
def test_invalid_configs_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "my.toml")
    assert str(err.value).startswith("my.toml: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_malformed_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[session\niterations = 2\n")
    assert_one_line_error(coevo("launch", str(bad), "--workdir", str(tmp_path / "w")), "not valid TOML")


def test_cli_unknown_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[generator]\nprograms = 3\n")
    assert_one_line_error(coevo("launch", str(bad), "--workdir", str(tmp_path / "w")), "generator.programs: unknown key")


def test_cli_missing_config_file(tmp_path: Path) -> None:
    assert_one_line_error(coevo("launch", str(tmp_path / "nope.toml")), "not found")


def test_cli_missing_model_dirs(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    tasks = tmp_path / "tasks" / "s"
    tasks.mkdir(parents=True)
    (tasks / "dev.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    (tasks / "test.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    cfg.write_text(
        f'[models]\nbase = "{tmp_path / "missing_base"}"\nexperts = ["{tmp_path / "e1"}"]\n'
        f'tasks = "{tmp_path / "tasks"}"\n[generator]\nmodel = "{tmp_path / "gen"}"\n'
        '[sandbox]\nrunner = "process"\n'
    )
    proc = coevo("launch", str(cfg), "--workdir", str(tmp_path / "w"))
    assert_one_line_error(proc, "missing_base")


def test_cli_mismatched_experts(tmp_path: Path, tiny_models: dict) -> None:
    from coevo.zoo.tiny import save_tiny_llama

    other = save_tiny_llama(tmp_path / "wide", seed=3, hidden_size=32, intermediate_size=64)
    cfg = tmp_path / "c.toml"
    tasks = tmp_path / "tasks" / "s"
    tasks.mkdir(parents=True)
    for split in ("dev", "test"):
        (tasks / f"{split}.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    cfg.write_text(
        f'[models]\nbase = "{tiny_models["base"]}"\nexperts = ["{tiny_models["experts"][0]}", "{other}"]\n'
        f'tasks = "{tmp_path / "tasks"}"\n[generator]\nmodel = "{tmp_path / "gen"}"\n'
        '[sandbox]\nrunner = "process"\n'
    )
    proc = coevo("launch", str(cfg), "--workdir", str(tmp_path / "w"))
    assert_one_line_error(proc, "expert 'wide'")


def test_cli_resume_with_nothing_to_resume(tmp_path: Path) -> None:
    assert_one_line_error(coevo("launch", "--resume", "--workdir", str(tmp_path)), "nothing to resume")


def test_cli_sql_without_archive(tmp_path: Path) -> None:
    assert_one_line_error(coevo("sql", "--workdir", str(tmp_path), "-c", "select 1"), "no archive")


def test_print_config_applies_overrides(tmp_path: Path) -> None:
    proc = coevo("launch", "--print-config", "--iterations", "3", "--programs", "8")
    assert proc.returncode == 0, proc.stderr
    resolved = json.loads(proc.stdout)
    assert resolved["session"]["iterations"] == 3
    assert resolved["generator"]["programs_per_iteration"] == 8


def test_prompts_list_and_show() -> None:
    proc = coevo("prompts", "list")
    assert proc.returncode == 0 and "generator" in proc.stdout and "$exemplars" in proc.stdout
    proc = coevo("prompts", "show", "generator")
    assert proc.returncode == 0 and "def merge" in proc.stdout
    assert_one_line_error(coevo("prompts", "show", "nosuch"), "no prompt 'nosuch'")


def test_prompts_list_shows_the_workdirs_edits(tmp_path: Path) -> None:
    from agents.prompts import DEFAULT_PROMPTS_DIR, save_template

    edited = (DEFAULT_PROMPTS_DIR / "judge.md").read_text() + "\nBe strict.\n"
    saved = save_template("judge", edited, tmp_path / "w" / "prompts")
    proc = coevo("prompts", "list", "--workdir", str(tmp_path / "w"))
    judge = next(line for line in proc.stdout.splitlines() if line.startswith("judge "))
    assert saved.hash in judge and judge.endswith("(edited in the workdir)")
    assert "Be strict." in coevo("prompts", "show", "judge", "--workdir", str(tmp_path / "w")).stdout


def test_prompt_rendering_and_extraction(tmp_path: Path) -> None:
    prompt = load_prompt("generator")
    text = prompt.render(n_experts=3, exemplars=format_exemplars([("def merge(): pass", 41.5)]))
    assert "Score 41.5" in text and text.rstrip().endswith("```python")
    assert extract_program("x = 1\n```\ntrailing") == "x = 1\n"
    (tmp_path / "generator.md").write_text("no placeholders here\n")
    with pytest.raises(PromptError, match="lacks placeholder"):
        load_prompt("generator", tmp_path)


def test_task_files_errors(tmp_path: Path) -> None:
    with pytest.raises(TaskFileError, match="does not exist"):
        load_tasks(tmp_path / "none")
    (tmp_path / "skill").mkdir()
    (tmp_path / "skill" / "dev.jsonl").write_text('{"prompt": "p", "answer": "a"}\nnot json\n')
    (tmp_path / "skill" / "test.jsonl").write_text("")
    with pytest.raises(TaskFileError, match=r"dev.jsonl:2: not JSON"):
        load_tasks(tmp_path)
    (tmp_path / "skill" / "dev.jsonl").write_text('{"prompt": "p", "answer": [3]}\n')
    with pytest.raises(TaskFileError, match=r"dev.jsonl:1: needs a string field 'answer'"):
        load_tasks(tmp_path)
    (tmp_path / "skill" / "dev.jsonl").write_text('{"prompt": "p", "answer": 3}\n')  # numbers read as text
    assert [t.answer for t in load_tasks(tmp_path)] == ["3"]


def test_cli_sandbox_run_json_contract(tmp_path: Path, tiny_models: dict) -> None:
    program = tmp_path / "p.py"
    program.write_text("import torch\n\ndef merge(task_vectors, *, name, base):\n    return sum(task_vectors) * 0.5\n")
    experts = [arg for e in tiny_models["experts"] for arg in ("--expert", str(e))]
    proc = coevo("sandbox", "run", str(program), "--base", str(tiny_models["base"]), *experts,
                 "--out", str(tmp_path / "out"), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["verdict"] == "ok" and result["duration_s"] > 0 and result["peak_memory_mb"] > 0
    assert (tmp_path / "out" / "config.json").is_file()

    program.write_text("import os\n\ndef merge(task_vectors, *, name, base):\n    return base\n")
    proc = coevo("sandbox", "run", str(program), "--base", str(tiny_models["base"]), *experts,
                 "--out", str(tmp_path / "out2"), "--json")
    assert proc.returncode == 0
    result = json.loads(proc.stdout)
    assert result["verdict"] == "rejected_by_policy" and "os" in result["reason"]
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    ("mode", "mutation", "selection", "coevolve"),
    [("acdc", "svd_noise", "dns", True), ("cycleqd", "svd_scale", "map_elites", False)],
)
def test_mode_defaults(mode: str, mutation: str, selection: str, coevolve: bool) -> None:
    config = parse_config({"mode": mode})
    assert (config.population.mutation, config.population.selection, config.tasks.coevolve) == (
        mutation, selection, coevolve,
    )
    # the resolved config round-trips (a resumed session parses what the archive stored)
    assert parse_config(json.loads(json.dumps(config.model_dump()))) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mode": "acdc", "population": {"selection": "map_elites"}}, "map_elites is cycleqd"),
        ({"mode": "cycleqd", "population": {"selection": "dns"}}, "cycleqd mode selects with map_elites"),
        ({"mode": "acdc", "tasks": {"writer": "llm"}}, "needs tasks.llm.model"),
        ({"judge": {"llm": True}}, "needs judge.llm.model"),
        ({"judge": {"scoring": "llm"}}, "needs judge.llm.model"),
        ({"mode": "acdc", "population": {"gibberish": "llm"}}, "needs judge.llm.model"),
        ({"mode": "acdc", "population": {"mutation": "svd"}}, "population.mutation"),
        ({"mode": "evolve"}, "mode"),
        ({"mode": "acdc", "judge": {"scratch_dir": "/dev/shm/x"}}, "judge.scratch_dir: only selfdev sessions"),
    ],
)
def test_invalid_population_configs(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_cli_mode_switch_keeps_explicit_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('mode = "acdc"\n[population]\nmutation = "gaussian"\n')
    done = coevo("launch", str(path), "--mode", "cycleqd", "--generations", "3", "--print-config")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["mode"] == "cycleqd"
    assert printed["population"]["mutation"] == "gaussian"  # the user's choice stays
    assert printed["population"]["selection"] == "map_elites"  # the mode's default follows the mode
    assert printed["tasks"]["coevolve"] is False
    assert printed["population"]["generations"] == 3


def test_renamed_keys_are_read_as_the_new_ones(tmp_path: Path) -> None:
    """A config written for an earlier version keeps working: every renamed key lands on its
    new one, and a note names the new key (also on the command line)."""
    old = tmp_path / "old.toml"
    old.write_text(
        'mode = "acdc"\n'
        '[generator]\nprompts_dir = "/my/prompts"\n'
        '[tasks]\nwriter = "llm"\nbackend = "openai"\nmodel = "w"\nbase_url = "http://h:1/v1"\ndevice = "cuda"\n'
        '[judge]\nllm = true\nllm_model = "j"\nllm_base_url = "http://h:2/v1"\nllm_api_key = "k"\n'
    )
    notes: list[str] = []
    config = load_config(old, notes=notes)
    assert config.prompts_dir == "/my/prompts"
    assert (config.tasks.llm.backend, config.tasks.llm.model, config.tasks.llm.base_url, config.tasks.llm.device) == (
        "openai", "w", "http://h:1/v1", "cuda")
    assert config.judge.scoring == "llm"
    assert (config.judge.llm.model, config.judge.llm.base_url, config.judge.llm.api_key) == ("j", "http://h:2/v1", "k")
    assert config.judge.llm.backend == "openai"  # a base_url without a backend means a server
    assert len(notes) == 9 and any("judge.llm_model is now judge.llm.model" in n for n in notes)
    shown = subprocess.run([sys.executable, "-m", "coevo", "launch", str(old), "--print-config"],
                           capture_output=True, text=True, check=True)
    assert "[config]" in shown.stderr and "tasks.base_url is now tasks.llm.base_url" in shown.stderr
    assert json.loads(shown.stdout)["judge"]["llm"]["model"] == "j"

    both = tmp_path / "both.toml"
    both.write_text('prompts_dir = "/a"\n[generator]\nprompts_dir = "/b"\n')
    with pytest.raises(ConfigError, match="generator.prompts_dir .now prompts_dir. disagrees with prompts_dir"):
        load_config(both)
