"""coevo: coevo."""
