"""Shared core: atomic files, file ownership, run directory, metrics, plots, fault injection."""
