"""Giving a verdict on an algorithm, from the CLI (`coevo review approve ...`) or the web app.

A verdict goes into the workdir's inbox first; when no session holds the workdir it is
recorded in the archive at once (and the snapshot republished), otherwise the running session
records it before its next DPO update (`archive_store.reviews`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from archive_store import Archive, queries
from archive_store.reviews import record_reviews, submit_review
from coevo.workdir import SessionError, workdir_lock


def give_verdict(archive_path: Path, algorithm_id: str, verdict: str, note: str = "") -> tuple[dict[str, Any], bool]:
    """(the verdict's row, whether it is in the archive already; False = queued for the
    running session). `algorithm_id` may be the unique end of an id. ArchiveError on bad input."""
    with Archive.open(archive_path, read_only=True) as archive:
        algorithm_id = queries.resolve_algorithm_id(archive, algorithm_id)
    workdir = Path(archive_path).parent
    row = submit_review(workdir, algorithm_id, verdict, note)
    try:
        with workdir_lock(workdir), Archive.open(archive_path) as archive:
            record_reviews(archive, workdir)
            archive.publish_snapshot()
    except SessionError:
        return row, False
    return row, True
