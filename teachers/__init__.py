"""Teacher models, checkpoints, labeling (logits -> pseudo-labels) and selection."""
