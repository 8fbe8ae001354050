"""Stages: the declared stage graph, the runner, one module per stage."""
