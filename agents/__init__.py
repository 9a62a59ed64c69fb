"""coevo: agents."""
