"""Configuration: strict schema, the config sections, presets."""
