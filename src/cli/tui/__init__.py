"""`taskrun tui`: a Textual terminal UI for operators, fed by WatchEvents (no polling)."""
