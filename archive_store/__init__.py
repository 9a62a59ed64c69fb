"""coevo's DuckDB archive: schema + migrations, batched writer, named queries, SQL shell.

- `archive_store.store`: `Archive`, the one writer (and readers of the published snapshot);
- `archive_store.reader`: the reads every archive has; `archive_store.queries`: named reads
  for the loops, reports, the CLI and tools;
- `archive_store.db`: the file, its schema (`schema/NNN_*.sql`) and migrations;
  `archive_store.summaries`: the running totals kept beside the big tables;
- `archive_store.shell`: `coevo sql` (one-shot and interactive);
- `archive_store.reviews`: reviewers' verdicts, through the workdir's inbox into `reviews`.
"""

from archive_store.db import SCHEMA_VERSION, ArchiveError, prompt_hash
from archive_store.shell import run_sql, schema_of, tables_and_views
from archive_store.store import POPULATION_VIEWS, VIEWS, Archive, snapshot_path

__all__ = [
    "POPULATION_VIEWS",
    "SCHEMA_VERSION",
    "VIEWS",
    "Archive",
    "ArchiveError",
    "prompt_hash",
    "run_sql",
    "schema_of",
    "snapshot_path",
    "tables_and_views",
]
