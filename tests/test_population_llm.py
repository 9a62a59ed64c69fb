"""An acdc session whose task writer, judge, gibberish filter and best-of-N picker are LLMs:
a real local OpenAI-compatible server (scripted replies) over real HTTP, the real zoo models
as the population, and checker code validated in the sandbox."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai_stub import completions_server

from archive_store import Archive

pytestmark = pytest.mark.slow

OPS = {"up": str.upper, "rev": lambda w: w[::-1], "say": lambda w: w}
CHECKERS = {
    "up": 'def check(answer, instance):\n    return answer.strip() == instance["word"].upper()\n',
    "rev": 'def check(answer, instance):\n    return answer.strip() == instance["word"][::-1]\n',
    "say": 'def check(answer, instance):\n    return answer.strip() == instance["word"]\n',
}
WORDS = ["abc", "hij", "bead", "fig", "jab", "cafe", "dig", "hide", "ace", "big", "head", "jig"]


class Scripted:
    """Replies like a capable LLM in each role; counts the prompts each role received."""

    def __init__(self) -> None:
        self.families = 0
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()

    def family(self) -> str:
        with self.lock:
            k = self.families
            self.families += 1
        op = list(OPS)[k % 3]
        words = [WORDS[(k * 5 + i) % len(WORDS)] + "abcdefghij"[k % 10] for i in range(4)]
        spec = {
            "name": f"{op}-family-{k}",
            "instructions": f"Variant {k}: apply `{op}` to a word. The prompt is `{op} <word>=`.",
            "instances": [{"prompt": f"{op} {w}=", "word": w, "solution": OPS[op](w)} for w in words],
        }
        return f"```json\n{json.dumps(spec)}\n```\n\n```python\n{CHECKERS[op]}```\n"

    def reply(self, prompt: str) -> str:
        if prompt.startswith("You design task families"):
            self.seen["writer"] += 1
            return self.family()
        if prompt.startswith("You are grading one answer"):
            self.seen["judge"] += 1
            reference = re.search(r"## Reference answer\n(.*)\n", prompt).group(1).strip()  # type: ignore[union-attr]
            answer = re.search(r"## Answer to grade\n(.*)\n", prompt).group(1).strip()  # type: ignore[union-attr]
            return "Compared with the reference.\nVERDICT: " + ("CORRECT" if answer == reference else "INCORRECT")
        if prompt.startswith("A merged language model answered"):
            self.seen["gibberish"] += 1
            return "Readable attempts.\nVERDICT: OK"
        if "BEST:" in prompt:
            self.seen["best_of_n"] += 1
            return "The first is as good as any.\nBEST: 0"
        match = re.fullmatch(r"(up|rev|say) ([a-z]+)=", prompt.strip())
        self.seen["solver"] += 1
        return OPS[match.group(1)](match.group(2)) if match else "no idea"


@pytest.fixture()
def server() -> Iterator[tuple[str, Scripted]]:
    script = Scripted()
    with completions_server(script.reply) as url:
        yield url, script


def test_acdc_with_llm_roles(tmp_path: Path, zoo_dir: Path, server: tuple[str, Scripted]) -> None:
    url, script = server
    config = tmp_path / "c.toml"
    config.write_text(
        f'mode = "acdc"\nseed = 2\n[zoo]\ndir = "{zoo_dir}"\n'
        "[population]\ngenerations = 2\nchildren = 3\nsize = 4\ngibberish = \"llm\"\n"
        f'[tasks]\nwriter = "llm"\nmodel = "scripted"\nbase_url = "{url}"\nadapt_every = 1\nnew_per_round = 2\ninstances = 4\n'
        f'[judge]\nllm = true\nllm_model = "scripted"\nllm_base_url = "{url}"\nbest_of_n = "llm"\n'
        '[sandbox]\nrunner = "process"\n'
    )
    workdir = tmp_path / "w"
    done = subprocess.run([sys.executable, "-m", "coevo", "launch", str(config), "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Final team" in done.stdout + done.stderr
    assert all(script.seen[role] > 0 for role in ("writer", "judge", "gibberish", "best_of_n", "solver")), script.seen
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        families = archive.records("select * from task_families order by generation, family_id")
        assert {f["origin"] for f in families} == {"llm:openai:scripted"} or all(f["origin"].startswith("llm:") for f in families)
        assert any(f["generation"] >= 1 for f in families)  # the writer adapted the pool
        # each family names the template it came from, archived by hash
        hashes = {f["prompt_hash"] for f in families}
        assert None not in hashes
        assert archive.scalar("select count(*) from prompts where prompt_hash in (select unnest(?))", [list(hashes)]) == len(hashes)
        assert archive.scalar("select count(*) from prompts where role = 'judge'") == 3
        judges = [r[0] for r in archive.query("select distinct judge from evaluations")[1]]
        assert len(judges) == 1 and judges[0].startswith("llm:")
        # the LLM judge's verdicts match exact comparison with the reference solution
        mismatched = archive.scalar(
            "select count(*) from evaluations e join tasks t using (task_id) "
            "where (trim(e.answer) = t.answer) != (e.score = 1)"
        )
        assert mismatched == 0
        assert archive.scalar("select count(*) from generation_metrics") == 3


def test_every_llm_role_uses_the_session_prompts_dir(tmp_path: Path, zoo_dir: Path) -> None:
    """One prompts dir (`prompts_dir`, current config keys) serves every LLM role: the task
    writer, the judge, the gibberish filter and the best-of-N picker all send prompts rendered
    from the edited templates, and the archive holds exactly those templates."""
    from agents.prompts import DEFAULT_PROMPTS_DIR, load_prompt

    edited = ("judge", "gibberish", "best_of_n", "task_writer", "task_writer_harder", "task_writer_novel")
    prompts = tmp_path / "prompts"
    shutil.copytree(DEFAULT_PROMPTS_DIR, prompts)
    for name in edited:
        path = prompts / f"{name}.md"
        path.write_text(path.read_text().rstrip("\n") + f"\nCUSTOM TEMPLATE {name}\n")
    script, requests = Scripted(), []
    with completions_server(script.reply, requests=requests) as url:
        config = tmp_path / "c.toml"
        config.write_text(
            f'mode = "acdc"\nseed = 2\nprompts_dir = "{prompts}"\n[zoo]\ndir = "{zoo_dir}"\n'
            "[population]\ngenerations = 1\nchildren = 2\nsize = 4\ngibberish = \"llm\"\n"
            '[tasks]\nwriter = "llm"\nadapt_every = 1\nnew_per_round = 1\ninstances = 4\n'
            f'[tasks.llm]\nmodel = "scripted"\nbase_url = "{url}"\n'
            '[judge]\nscoring = "llm"\nbest_of_n = "llm"\n'
            f'[judge.llm]\nmodel = "scripted"\nbase_url = "{url}"\n'
            '[sandbox]\nrunner = "process"\n'
        )
        workdir = tmp_path / "w"
        done = subprocess.run([sys.executable, "-m", "coevo", "launch", str(config), "--workdir", str(workdir)],
                              capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[config]" not in done.stdout + done.stderr  # no renamed keys in this config
    sent = [p for r in requests for p in (r["prompt"] if isinstance(r["prompt"], list) else [r["prompt"]])]
    for name in ("judge", "gibberish", "best_of_n", "task_writer"):
        assert any(f"CUSTOM TEMPLATE {name}" in p for p in sent), name
    assert any("CUSTOM TEMPLATE task_writer_harder" in p or "CUSTOM TEMPLATE task_writer_novel" in p for p in sent)
    custom = {name: load_prompt(name, prompts).hash for name in edited}
    default = {name: load_prompt(name).hash for name in edited}
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        archived = dict(archive.query("select prompt_hash, name from prompts where role in ('judge', 'task_writer')")[1])
        assert archived == {h: n for n, h in custom.items()}
        assert not set(default.values()) & {r[0] for r in archive.query("select prompt_hash from prompts")[1]}
        family_hashes = {r[0] for r in archive.query("select prompt_hash from task_families")[1]}
        assert family_hashes <= {custom["task_writer"], custom["task_writer_harder"], custom["task_writer_novel"]}


def test_a_judge_template_edited_mid_session_is_used_from_the_next_generation(tmp_path: Path, zoo_dir: Path) -> None:
    """The judge's template is edited while the session runs (saved into the workdir's prompts
    dir, as `coevo serve` does) during generation 0: generation 0 was judged with the shipped
    template, generations 1 and 2 with the edit, and `prompt_uses` says so."""
    from agents.prompts import DEFAULT_PROMPTS_DIR, load_prompt, save_template

    workdir = tmp_path / "w"
    shipped = (DEFAULT_PROMPTS_DIR / "judge.md").read_text()
    edited = shipped.replace("Reasoning:", "Be strict about whitespace. EDITED\n\nReasoning:")
    script, requests = Scripted(), []
    reply = script.reply

    def reply_and_edit(prompt: str) -> str:
        if "BEST:" in prompt and not (workdir / "prompts" / "judge.md").exists():
            save_template("judge", edited, workdir / "prompts")  # generation 0's measure step
        return reply(prompt)

    with completions_server(reply_and_edit, requests=requests) as url:
        config = tmp_path / "c.toml"
        config.write_text(
            f'mode = "acdc"\nseed = 3\n[zoo]\ndir = "{zoo_dir}"\n'
            "[population]\ngenerations = 2\nchildren = 2\nsize = 4\n"
            '[tasks]\nwriter = "llm"\nadapt_every = 1\nnew_per_round = 1\ninstances = 4\n'
            f'[tasks.llm]\nmodel = "scripted"\nbase_url = "{url}"\n'
            '[judge]\nscoring = "llm"\nbest_of_n = "llm"\n'
            f'[judge.llm]\nmodel = "scripted"\nbase_url = "{url}"\n'
            '[sandbox]\nrunner = "process"\n'
        )
        done = subprocess.run([sys.executable, "-m", "coevo", "launch", str(config), "--workdir", str(workdir)],
                              capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    old, new = load_prompt("judge").hash, load_prompt("judge", [workdir / "prompts"]).hash
    assert f"[prompts] judge template {old} -> {new}" in done.stdout + done.stderr
    sent = [p for r in requests for p in (r["prompt"] if isinstance(r["prompt"], list) else [r["prompt"]])]
    graded = [p for p in sent if p.startswith("You are grading one answer")]
    first_edited = next(i for i, p in enumerate(graded) if "EDITED" in p)
    assert first_edited > 0 and all("EDITED" in p for p in graded[first_edited:])  # never back to the old one
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        uses = dict(archive.query("select generation, prompt_hash from prompt_uses where name = 'judge'")[1])
        assert uses == {0: old, 1: new, 2: new}
        versions = dict(archive.query("select prompt_hash, n_steps from prompt_versions where name = 'judge'")[1])
        assert versions == {old: 1, new: 2}
