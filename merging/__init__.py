"""coevo: merging."""
