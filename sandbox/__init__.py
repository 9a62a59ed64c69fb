"""coevo: sandbox."""
