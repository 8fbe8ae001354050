"""Experiments over several runs: summaries (and the compare grid)."""
