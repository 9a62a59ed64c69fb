"""Human verdicts on generated algorithms: approve, reject or quarantine, with a note.

A verdict is given while a session may be running, and a running session is the archive's one
writer, so a verdict is first a file in the workdir's inbox (`inbox/reviews/<id>.json`, written
atomically); whoever holds the archive's writer next (the running session before its next
DPO update, a resumed one, or `coevo review` itself when no session runs) records the inbox
in the `reviews` table and empties it. Recording is idempotent (the review id is the key).
"""

from __future__ import annotations

import getpass
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from archive_store.db import ArchiveError
from archive_store.reader import ArchiveReader
from archive_store.store import Archive

VERDICTS = ("approve", "reject", "quarantine")
INBOX = Path("inbox") / "reviews"
NOTE_LIMIT = 2000


def submit_review(workdir: Path, algorithm_id: str, verdict: str, note: str = "", *, reviewer: str | None = None) -> dict[str, Any]:
    """Put one verdict in `workdir`'s inbox; returns its row (review_id, ..., created_at)."""
    if verdict not in VERDICTS:
        raise ArchiveError(f"unknown verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
    if len(note) > NOTE_LIMIT:
        raise ArchiveError(f"a review note is at most {NOTE_LIMIT} characters, got {len(note)}")
    row = {
        "review_id": uuid.uuid4().hex, "algorithm_id": algorithm_id, "verdict": verdict, "note": note,
        "reviewer": reviewer or getpass.getuser(), "created_at": datetime.now(UTC).replace(tzinfo=None).isoformat(),
    }
    inbox = Path(workdir) / INBOX
    inbox.mkdir(parents=True, exist_ok=True)
    partial = inbox / f".{row['review_id']}.partial"
    partial.write_text(json.dumps(row))
    os.replace(partial, inbox / f"{row['review_id']}.json")
    return row


def record_reviews(archive: Archive, workdir: Path) -> int:
    """Record the inbox's verdicts in the archive and empty it; returns how many were new.

    A file that is not a verdict on one of the archive's algorithms is left with a `.bad`
    suffix, its reason beside it, and never read again."""
    inbox = Path(workdir) / INBOX
    files = sorted(inbox.glob("*.json")) if inbox.is_dir() else []
    if not files:
        return 0
    rows, good = [], []
    for path in files:
        try:
            row = json.loads(path.read_text())
            problem = _problem(archive, row)
        except (OSError, ValueError) as exc:
            problem = f"unreadable: {exc}"
        if problem:
            path.with_suffix(".bad").write_text(f"{problem}\n")
            path.unlink()
            continue
        rows.append({**{k: row[k] for k in ("review_id", "algorithm_id", "verdict", "reviewer")},
                     "note": str(row.get("note") or ""), "created_at": datetime.fromisoformat(row["created_at"])})
        good.append(path)
    with archive.transaction() as tx:
        added = tx.add_reviews(rows)
    for path in good:  # after the commit: a crash before this re-records the same ids, harmlessly
        path.unlink(missing_ok=True)
    return added


def _problem(archive: ArchiveReader, row: Any) -> str:
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("review_id", "algorithm_id", "verdict", "reviewer", "created_at")):
        return "not a verdict (needs review_id, algorithm_id, verdict, reviewer, created_at)"
    if row["verdict"] not in VERDICTS:
        return f"unknown verdict {row['verdict']!r}"
    try:
        datetime.fromisoformat(row["created_at"])
    except ValueError:
        return f"created_at {row['created_at']!r} is not an ISO time"
    if not archive.scalar("SELECT count(*) FROM algorithms WHERE algorithm_id = ?", [row["algorithm_id"]]):
        return f"no algorithm {row['algorithm_id']!r} in this archive"
    return ""


def latest_verdicts(archive: ArchiveReader, session_id: str) -> dict[str, str]:
    """algorithm id -> its latest verdict, for a session's reviewed algorithms."""
    return dict(archive.query(
        "SELECT r.algorithm_id, r.verdict FROM latest_reviews r JOIN algorithms a USING (algorithm_id) "
        "WHERE a.session_id = ? ORDER BY r.algorithm_id", [session_id],
    )[1])
