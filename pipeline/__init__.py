"""selftrain: staged self-training and distillation pipeline."""
