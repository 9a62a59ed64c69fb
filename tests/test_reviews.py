"""Reviewers' verdicts on a real DuckDB archive: through the workdir's inbox into `reviews`,
never overwritten, the latest one counting; quarantine keeps an algorithm out of exemplars,
crossover operators and top-k; verdicts become DPO pairs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_archive import SESSION, fill

from agents.dpo import bottom_ids, human_pairs, make_preference_pairs
from archive_store import Archive, ArchiveError, queries
from archive_store.reviews import INBOX, latest_verdicts, record_reviews, submit_review


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    with Archive.open(tmp_path / "archive.duckdb") as archive:
        fill(archive)  # a1 and b3 score dev 1.0, b1 0.75, a0 and b0 0.5
    return tmp_path


def test_verdicts_go_through_the_inbox_and_are_never_overwritten(workdir: Path) -> None:
    first = submit_review(workdir, "b3", "approve", "clean sign election", reviewer="ana")
    second = submit_review(workdir, "b3", "quarantine", "reads the experts twice", reviewer="ben")
    assert sorted(p.name for p in (workdir / INBOX).iterdir()) == sorted(f"{r['review_id']}.json" for r in (first, second))
    with Archive.open(workdir / "archive.duckdb") as archive:
        assert record_reviews(archive, workdir) == 2
        assert record_reviews(archive, workdir) == 0  # the inbox is empty now
        assert list((workdir / INBOX).iterdir()) == []
        rows = archive.query("select verdict, note, reviewer from reviews order by created_at")[1]
        assert rows == [("approve", "clean sign election", "ana"), ("quarantine", "reads the experts twice", "ben")]
        assert latest_verdicts(archive, SESSION) == {"b3": "quarantine"}
        assert [r["verdict"] for r in queries.review_history(archive, "b3")] == ["approve", "quarantine"]


def test_recording_twice_after_a_crash_adds_nothing(workdir: Path) -> None:
    row = submit_review(workdir, "a1", "approve", reviewer="ana")
    saved = (workdir / INBOX / f"{row['review_id']}.json").read_text()
    with Archive.open(workdir / "archive.duckdb") as archive:
        assert record_reviews(archive, workdir) == 1
        (workdir / INBOX / f"{row['review_id']}.json").write_text(saved)  # killed before the unlink
        assert record_reviews(archive, workdir) == 0
        assert archive.scalar("select count(*) from reviews") == 1


def test_bad_inbox_files_are_set_aside_with_their_reason(workdir: Path) -> None:
    inbox = workdir / INBOX
    inbox.mkdir(parents=True)
    (inbox / "x.json").write_text("{not json")
    (inbox / "y.json").write_text(json.dumps({"review_id": "y", "algorithm_id": "nope", "verdict": "approve",
                                              "reviewer": "ana", "created_at": "2026-12-02T00:00:00"}))
    (inbox / "z.json").write_text(json.dumps({"review_id": "z", "algorithm_id": "a1", "verdict": "love",
                                              "reviewer": "ana", "created_at": "2026-12-02T00:00:00"}))
    with Archive.open(workdir / "archive.duckdb") as archive:
        assert record_reviews(archive, workdir) == 0
        assert archive.scalar("select count(*) from reviews") == 0
    assert "unreadable" in (inbox / "x.bad").read_text()
    assert "no algorithm 'nope'" in (inbox / "y.bad").read_text()
    assert "unknown verdict 'love'" in (inbox / "z.bad").read_text()
    with pytest.raises(ArchiveError, match="unknown verdict 'like'"):
        submit_review(workdir, "a1", "like")


def test_quarantine_keeps_an_algorithm_out_of_exemplars_operators_and_top_k(workdir: Path) -> None:
    with Archive.open(workdir / "archive.duckdb") as archive:
        before = [a["algorithm_id"] for a in archive.top_algorithms(SESSION, 3)]
        assert set(before[:2]) == {"a1", "b3"}
        submit_review(workdir, "a1", "quarantine", reviewer="ana")
        record_reviews(archive, workdir)
        assert [a["algorithm_id"] for a in archive.top_algorithms(SESSION, 3)] == [i for i in before + ["a0"] if i != "a1"][:3]
        archive.query("update sessions set mode = 'selfdev'")
        assert "a1" not in {a["algorithm_id"] for a in queries.generated_algorithms(archive)}
        submit_review(workdir, "a1", "approve", "on second thought", reviewer="ana")  # the latest verdict counts
        record_reviews(archive, workdir)
        assert [a["algorithm_id"] for a in archive.top_algorithms(SESSION, 3)] == before


def test_verdicts_become_pairs() -> None:
    scored = [{"algorithm_id": f"s{i}", "prompt": "P", "completion": f"c{i}", "score": s}
              for i, s in enumerate([0.9, 0.5, None, 0.1])]
    assert bottom_ids(scored, 0.5) == ["s2", "s3"]  # as make_preference_pairs picks its rejected
    assert {p["rejected_id"] for p in make_preference_pairs(scored, top_frac=0.25, bottom_frac=0.5)} == {"s2", "s3"}
    completions = {"old": "c-old", "bad": "c-bad", **{s["algorithm_id"]: s["completion"] for s in scored}}
    scores = {"old": 0.4, "bad": 0.8, "s0": 0.9, "s1": 0.5, "s2": None, "s3": 0.1}
    pairs = human_pairs(["old", "s3"], ["bad"], ["s2", "s3"], completions, scores, "P")
    assert [(p["chosen_id"], p["rejected_id"]) for p in pairs] == [
        ("old", "bad"), ("old", "s2"), ("s3", "bad"), ("s3", "s2")]  # an approved one is never a loser
    assert pairs[0] == {"prompt": "P", "chosen": "c-old", "rejected": "c-bad", "chosen_id": "old", "rejected_id": "bad",
                        "chosen_score": 0.4, "rejected_score": 0.8}  # people may prefer a lower score


def test_review_cli_records_at_once_without_a_session(workdir: Path) -> None:
    import subprocess
    import sys

    def review(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "coevo", "review", *args, "--workdir", str(workdir)],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "USER": "carla"})

    done = review("reject", "b2", "--note", "all zeros")
    assert done.returncode == 0 and "reject b2: recorded (by" in done.stdout, done.stdout + done.stderr
    shown = review("show", "b2")
    assert "verdict    reject by" in shown.stdout and ": all zeros" in shown.stdout
    for args, message in ((("approve", "zz"), "no algorithm 'zz'"), (("approve",), "needs an algorithm id")):
        failed = review(*args)
        assert failed.returncode != 0 and message in failed.stderr and "Traceback" not in failed.stderr, failed.stderr
    with Archive.open(workdir / "archive.duckdb", read_only=True) as archive:
        assert archive.query("select algorithm_id, verdict, note from reviews")[1] == [("b2", "reject", "all zeros")]
