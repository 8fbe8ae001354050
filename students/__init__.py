"""Student models with noise, losses (soft CE, KD) and distillation."""
