"""Named override sets applied before the user's `--set` (plain data, no registry)."""

from __future__ import annotations

from pipeline.config.schema import ConfigError

PRESETS: dict[str, list[str]] = {
    # the whole pipeline in 4-7 minutes on a 2-core CPU (README): a 10,000-image pool, short training
    "quick": ["data.max_unlabeled=10000", "teacher.train.epochs=20", "student.train.epochs=3",
              "student.train.warmup_epochs=0.3", "distill.train.epochs=2", "distill.export.repeats=10"],
}

# where a source cannot cap its pool (an import used as it is, shards used in place)
PRESET_CAP_NOTE = "`--preset quick` sets it to 10000"


def preset_overrides(name: str | None) -> list[str]:
    if name is None:
        return []
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown preset; presets are {', '.join(sorted(PRESETS))}")
    return list(PRESETS[name])
