"""coevo: archive_store."""
