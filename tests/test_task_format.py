"""Benchmark-grade task sets: k-shot prompts, chat templates, stops, answer extraction with
numeric equivalence, JSONL / Parquet / `datasets` sources, and one-line errors for bad files.
The formats are checked against real replies of the zoo's models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agents.judge import exact_scores, mean_score
from agents.task_format import (
    PLAIN,
    TaskFormat,
    as_number,
    chat_prompt,
    extract,
    read_reply,
    render_prompt,
    same_answer,
    truncate_at_stop,
)
from agents.tasks import TaskFileError, load_tasks

GSM8K_ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs in 10 boxes?", "answer": "12 * 10 = 120\n#### 120"},
    {"question": "Ann earns $1,250 a week. What in 2 weeks?", "answer": "1250 * 2 = 2500\n#### 2,500"},
    {"question": "It is 5 degrees and falls by 8. What now?", "answer": "5 - 8 = -3\n#### -3"},
    {"question": "Half of 9?", "answer": "9 / 2 = 4.5\n#### 4.5"},
    {"question": "Sam reads 6 pages a day for 7 days. Pages?", "answer": "6 * 7 = 42\n#### 42"},
    {"question": "A pen costs 2 and a book 9. Both?", "answer": "2 + 9 = 11\n#### 11"},
]
GSM8K_FORMAT = """
prompt_field = "question"
answer_field = "answer"

[format]
shots = 2
template = "Question: {prompt}\\nAnswer:"
shot_template = "Question: {prompt}\\nAnswer: {answer}"
separator = "\\n\\n"
stop = ["\\n\\nQuestion:"]
max_new_tokens = 64
extract = "gsm8k"
reference = "gsm8k"
numeric = true
"""


@pytest.mark.parametrize(
    ("reply", "how", "expected"),
    [
        ("15\nadd 1 2=3", "first_line", "15"),
        ("She has 3 + 4 = 7 apples.\n#### 7", "gsm8k", "7"),
        ("so #### 1,234 in all", "gsm8k", "1,234"),
        ("#### -3.5", "gsm8k", "-3.5"),
        ("no marker, 12 then 13", "gsm8k", ""),
        ("3 boxes of 12 make 36 eggs.", "last_number", "36"),
        ("It costs $1,250.50 total", "last_number", "$1,250.50"),
        ("nothing numeric", "last_number", ""),
        ("so \\boxed{\\frac{1}{2}} it is", "boxed", "\\frac{1}{2}"),
        ("reasoning...\nAnswer: 42\n", "answer_line", "42"),
    ],
)
def test_extractors(reply: str, how: str, expected: str) -> None:
    assert extract(reply, how) == expected  # type: ignore[arg-type]


def test_regex_extractor_takes_the_last_match_and_its_first_group() -> None:
    assert extract("The answer is (B). No wait, the answer is (C).", "regex", r"answer is \(([A-D])\)") == "C"
    assert extract("no letter", "regex", r"answer is \(([A-D])\)") == ""


def test_numeric_equivalence() -> None:
    numeric = TaskFormat(numeric=True)
    for answer, reference in [("1,000", "1000"), ("1000.0", "1000"), ("$5", "5"), ("72.", "72"), ("-3", "-3.00"), ("$-4", "-4")]:
        assert same_answer(answer, reference, numeric), (answer, reference)
    assert not same_answer("999", "1000", numeric)
    assert not same_answer("1000.0", "1000", PLAIN)  # exact match unless the format says numeric
    assert same_answer(" abc ", "abc", numeric)  # not numbers: exact match, stripped
    assert as_number("1e400") is not None and as_number("nan") is None and as_number("12 apples") is None


def test_stops_cut_the_reply_at_the_earliest_stop() -> None:
    assert truncate_at_stop("7\n\nQuestion: next", ["Question:", "\n\n"]) == "7"
    fmt = TaskFormat(stop=("\n\nQuestion:",), extract="gsm8k")
    assert read_reply("4 + 4 = 8\n#### 8\n\nQuestion: 2 + 2?\nAnswer: #### 4", fmt) == "8"


def test_k_shot_rendering_is_reproducible_and_never_shows_the_question_itself() -> None:
    pool = [(f"q{i}", f"a{i}") for i in range(10)]
    fmt = TaskFormat(shots=3, template="Q: {prompt}\nA:", shot_template="Q: {prompt}\nA: {answer}", separator="\n\n")
    text = render_prompt("q4", fmt, pool, key="task-1")
    blocks = text.split("\n\n")
    assert len(blocks) == 4 and blocks[-1] == "Q: q4\nA:"
    assert all(b.startswith("Q: q") and "Q: q4\n" not in b + "\n" for b in blocks[:-1])
    assert render_prompt("q4", fmt, pool, key="task-1") == text
    others = {render_prompt("q4", fmt, pool, key=f"task-{i}") for i in range(20)}
    assert len(others) > 1  # exemplars are drawn per task, not one fixed set
    with pytest.raises(ValueError, match="3-shot prompts need 3 exemplars; the pool has 2"):
        render_prompt("q0", fmt, pool[:3], key="x")


def test_bad_formats_are_refused() -> None:
    for bad, message in [
        ({"template": "no placeholder"}, "template must contain"),
        ({"extract": "regex"}, "needs a pattern"),
        ({"extract": "regex", "pattern": "("}, "not a regular expression"),
        ({"extract": "regex", "pattern": "[0-9]+"}, "needs one group"),
        ({"stop": [""]}, "must not be empty"),
        ({"extract": "majority_vote"}, "Input should be"),
    ]:
        with pytest.raises(ValueError, match=message):
            TaskFormat.model_validate(bad)


def _write_gsm8k_dir(root: Path, *, fmt: str = GSM8K_FORMAT) -> Path:
    skill = root / "gsm8k"
    skill.mkdir(parents=True)
    (skill / "shots.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS[:3]))
    (skill / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS[3:5]))
    (skill / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GSM8K_ROWS[5:]))
    (root / "format.toml").write_text(fmt)
    return root


def test_jsonl_task_set_with_a_k_shot_format(tmp_path: Path) -> None:
    tasks = load_tasks(_write_gsm8k_dir(tmp_path / "gsm8k-set"))
    assert [(t.split, t.answer) for t in tasks] == [("dev", "-3"), ("dev", "4.5"), ("test", "42"), ("test", "11")]
    first = tasks[0]
    assert first.prompt.endswith("Question: It is 5 degrees and falls by 8. What now?\nAnswer:")
    assert first.prompt.count("Question:") == 3 and "#### " in first.prompt  # two exemplars with full solutions
    assert first.fmt.extract == "gsm8k" and first.fmt.numeric
    replies = ["5 - 8 = -3\n#### -3\n\nQuestion: more", "9 / 2 = 4.50\n#### 4.50", "#### 41", "2 + 9 = 11 so 11"]
    answers = [read_reply(r, t.fmt) for r, t in zip(replies, tasks, strict=True)]
    assert [s.score for s in exact_scores(tasks, answers)] == [1.0, 1.0, 0.0, 0.0]  # no `####`, no answer


def test_parquet_and_datasets_sources(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _write_gsm8k_dir(tmp_path / "pq")
    for split in ("dev", "test"):
        rows = [json.loads(line) for line in (root / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
        (root / "gsm8k" / f"{split}.jsonl").unlink()
        pq.write_table(pa.Table.from_pylist(rows), root / "gsm8k" / f"{split}.parquet")
    assert [t.answer for t in load_tasks(root)] == ["-3", "4.5", "42", "11"]

    saved = tmp_path / "gsm8k-datasets"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(GSM8K_ROWS[:5]), "test": datasets.Dataset.from_list(GSM8K_ROWS[5:]),
    }).save_to_disk(str(saved))
    spec = tmp_path / "from-datasets"
    spec.mkdir()
    source = f'\n[source]\npath = "{saved}"\nskill = "gsm8k"\nsplits = {{ dev = "train[3:]", test = "test", shots = "train[:3]" }}\n'
    (spec / "format.toml").write_text(GSM8K_FORMAT + source)
    tasks = load_tasks(spec)
    assert [(t.task_id, t.answer) for t in tasks] == [
        ("gsm8k/dev/0000", "-3"), ("gsm8k/dev/0001", "4.5"), ("gsm8k/test/0000", "42"), ("gsm8k/test/0001", "11")]
    assert tasks[0].prompt.count("Question:") == 3


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda root: (root / "format.toml").write_text("[format\nshots = 2"), r"format.toml: not valid TOML"),
        (lambda root: (root / "format.toml").write_text(GSM8K_FORMAT + "colour = 1\n"), r"format.toml: format.colour: Extra inputs"),
        (lambda root: (root / "format.toml").write_text(GSM8K_FORMAT.replace('extract = "gsm8k"', 'extract = "regex"')),
         r"format.toml: format: Value error, extract = 'regex' needs a pattern"),
        (lambda root: (root / "gsm8k" / "dev.jsonl").write_text('{"question": "q"}\n'),
         r"gsm8k/dev.jsonl:1: needs a string field 'answer'"),
        (lambda root: (root / "gsm8k" / "dev.jsonl").write_text('{"question": "q", "answer": "7"}\n'),
         r"gsm8k/dev.jsonl:1: field 'answer' has no answer the 'gsm8k' way"),
        (lambda root: (root / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 7"}\nnot json\n'),
         r"gsm8k/test.jsonl:2: not JSON"),
        (lambda root: (root / "gsm8k" / "shots.jsonl").write_text(json.dumps(GSM8K_ROWS[0]) + "\n"),
         r"gsm8k/dev.jsonl:1: 2-shot prompts need 2 exemplars; the pool has 1"),
        (lambda root: (root / "gsm8k" / "shots.jsonl").unlink(), r"2-shot format but skill 'gsm8k' has no exemplar pool"),
        (lambda root: ((root / "gsm8k" / "test.jsonl").unlink(), (root / "gsm8k" / "test.parquet").write_bytes(b"PAR1 broken")),
         r"gsm8k/test.parquet: not a readable Parquet file"),
        (lambda root: (root / "format.toml").write_text(GSM8K_FORMAT + '[source]\npath = "nowhere-dir/x"\nsplits = { dev = "train" }\n'),
         r"format.toml: source 'nowhere-dir/x' cannot be loaded"),
        (lambda root: (root / "format.toml").write_text(GSM8K_FORMAT + '[source]\npath = "x"\nsplits = { dev = "train[:a]" }\n'),
         r"format.toml: source: Value error, splits.dev = 'train\[:a\]': write a split name"),
    ],
)
def test_bad_task_sets_fail_with_one_line_naming_file_row_and_field(tmp_path: Path, edit, message: str) -> None:
    root = _write_gsm8k_dir(tmp_path / "set")
    edit(root)
    with pytest.raises(TaskFileError, match=message) as caught:
        load_tasks(root)
    assert "\n" not in str(caught.value)


def test_a_missing_datasets_split_is_named(tmp_path: Path) -> None:
    import datasets

    saved = tmp_path / "ds"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(GSM8K_ROWS)}).save_to_disk(str(saved))
    root = tmp_path / "set"
    root.mkdir()
    (root / "format.toml").write_text(GSM8K_FORMAT + f'[source]\npath = "{saved}"\nsplits = {{ dev = "validation", shots = "train" }}\n')
    with pytest.raises(TaskFileError, match=r"splits.dev: .* has no split 'validation' \(it has train\)"):
        load_tasks(root)


# --- against real replies of the zoo's models ----------------------------------------------------


def _zoo_add_set(zoo_dir: Path, root: Path, fmt: str) -> Path:
    """The zoo's `add` tasks as a user's task set, with exemplars from its dev split."""
    rows: dict[str, list[dict[str, str]]] = {split: [] for split in ("shots", "dev", "test")}
    for t in load_tasks(zoo_dir / "tasks"):
        if t.skill != "add":
            continue
        split = "shots" if t.split == "dev" and len(rows["shots"]) < 20 else t.split
        rows[split].append({"prompt": t.prompt, "answer": t.answer})
    (root / "add").mkdir(parents=True)
    for split, split_rows in rows.items():
        (root / "add" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    (root / "format.toml").write_text(fmt)
    return root


@pytest.mark.slow
def test_formats_against_real_zoo_replies(zoo_dir: Path, tmp_path: Path) -> None:
    """The add expert's real greedy replies under the plain format, a 2-shot format with a
    stop and a regex, and a last-number reading, read and scored each way."""
    from agents.answerer import Answerer

    answerer = Answerer(zoo_dir / "base")
    expert = zoo_dir / "experts" / "add"
    plain = [t for t in load_tasks(_zoo_add_set(zoo_dir, tmp_path / "plain", "")) if t.split == "test"]
    plain_score = mean_score(exact_scores(plain, answerer.answer_tasks(expert, plain)))
    assert plain_score >= 80  # the expert knows its skill (zoo checks: >= 30 above the base)
    assert answerer.answer_tasks(expert, plain) == answerer.answer(expert, [t.prompt for t in plain])

    two_shot = """
[format]
shots = 2
shot_template = "{prompt}{answer}"
separator = "\\n"
stop = ["\\n"]
max_new_tokens = 6
extract = "regex"
pattern = '^\\s*(-?\\d+)'
numeric = true
"""
    shot_tasks = [t for t in load_tasks(_zoo_add_set(zoo_dir, tmp_path / "two-shot", two_shot)) if t.split == "test"]
    assert shot_tasks[0].prompt.count("\n") == 2 and shot_tasks[0].prompt.endswith(plain[0].prompt)
    answerer.load(expert)
    replies = answerer.replies([t.prompt for t in shot_tasks], max_new_tokens=6, stop=["\n"])
    assert all("\n" not in r for r in replies)
    answers = answerer.answer_tasks(expert, shot_tasks)
    assert answers == [extract(r, "regex", r"^\s*(-?\d+)") for r in replies]
    expected = [float(a != "" and int(a) == int(t.answer)) for a, t in zip(answers, shot_tasks, strict=True)]
    assert [s.score for s in exact_scores(shot_tasks, answers)] == expected
    # The exemplars reach the model: the zoo's models learned their skills one prompt at a
    # time, and most of their answers change with two solved examples in front.
    plain_answers = answerer.answer_tasks(expert, plain)
    assert sum(a != b for a, b in zip(answers, plain_answers, strict=True)) > len(plain) // 2

    long_reply = TaskFormat(max_new_tokens=12, stop=("=",), extract="last_number")
    reply = answerer.replies([plain[0].prompt], max_new_tokens=12, stop=["="])[0]
    assert "=" not in reply
    assert read_reply(reply, long_reply) == extract(reply, "last_number")


def test_chat_template_needs_a_tokenizer_that_has_one(zoo_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zoo_dir / "base")
    fmt = TaskFormat(chat=True, system="Answer with a number.")
    with pytest.raises(ValueError, match="chat = true.*tokenizer has none"):
        chat_prompt("add 12 3=", fmt, tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    assert chat_prompt("add 12 3=", fmt, tokenizer) == "<system>Answer with a number.\n<user>add 12 3=\n<assistant>"
    assert chat_prompt("add 12 3=", PLAIN, tokenizer) == "add 12 3="


def test_the_gsm8k_recipe_on_a_local_datasets_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """examples/gsm8k as shipped, pointed at a local `datasets` dir shaped like GSM8k."""
    import datasets

    from coevo.cli import main

    def rows(n: int, offset: int) -> list[dict[str, str]]:
        return [{"question": f"What is {i} + {i + 1}?", "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1:,}"}
                for i in range(offset, offset + n)]

    saved = tmp_path / "gsm8k-copy"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(40, 5000)),
                          "test": datasets.Dataset.from_list(rows(130, 0))}).save_to_disk(str(saved))
    recipe = (Path(__file__).parents[1] / "examples" / "gsm8k" / "format.toml").read_text()
    assert 'path = "openai/gsm8k"' in recipe
    task_dir = tmp_path / "gsm8k"
    task_dir.mkdir()
    (task_dir / "format.toml").write_text(recipe.replace('path = "openai/gsm8k"', f'path = "{saved}"'))
    assert main(["tasks", "show", str(task_dir), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "gsm8k dev: 100 tasks" in out and "gsm8k test: 30 tasks" in out
    assert "format: 5-shot, chat off" in out and "extract gsm8k, numeric yes" in out
    tasks = load_tasks(task_dir)
    first_test = next(t for t in tasks if t.split == "test")
    assert first_test.answer == "201" and first_test.prompt.endswith("Question: What is 100 + 101?\nAnswer:")
    assert first_test.prompt.count("#### ") == 5 and "What is 50 +" not in first_test.prompt  # exemplars from train only
    assert exact_scores([first_test], [read_reply("100 + 101 = 201\n#### 201\n\nQuestion: ...", first_test.fmt)])[0].score == 1.0
