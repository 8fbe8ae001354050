"""Data plane: import, shards, image sets, loaders, the selected pool."""
