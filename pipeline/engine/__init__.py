"""Training engine: accelerator and runtime, trainer loop, EMA, prediction, shared stage set-up."""
