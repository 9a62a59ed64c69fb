"""coevo's DuckDB archive: schema + migrations, batched writer, read API, SQL shell."""

from archive_store.shell import run_sql, schema_of, tables_and_views
from archive_store.store import (
    POPULATION_VIEWS,
    SCHEMA_VERSION,
    VIEWS,
    Archive,
    ArchiveError,
    prompt_hash,
    snapshot_path,
)

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
