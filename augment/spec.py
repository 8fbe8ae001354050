"""Policy strings such as ``s4-n2-m10`` parsed into a frozen spec that prints itself back."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

POLICY_NAMES = ("s1", "s2", "s3", "s4")
DEFAULT_JITTER: dict[str, tuple[float, float]] = {
    "s1": (0.8, 1.2),
    "s2": (0.8, 1.2),
    "s3": (0.5, 2.0),
    "s4": (0.5, 2.0),
}
DEFAULT_NUM_OPS = 2
DEFAULT_MAGNITUDE = 10.0
MAX_NUM_OPS = 16
MAX_MAGNITUDE = 10.0
MAX_JITTER = 8.0

VALID_FORMS = (
    "valid forms: s1 | s2 | s3 | s4, optionally followed by options "
    "-nN (s4 only: RandAugment ops per image, integer 0..16, default 2), "
    "-mM (s4 only: RandAugment magnitude on the 0..10 scale, decimals allowed, default 10), "
    "-jLO:HI (any policy: scale-jitter factor range, 0 < LO <= HI <= 8; "
    "default 0.8:1.2 for s1/s2, 0.5:2.0 for s3/s4); "
    "examples: s1, s3-j0.5:2.0, s4-n3-m7, s4-n2-m10-j0.5:2.0"
)

_NUMBER = r"\d+(?:\.\d*)?|\.\d+"
_OPTION = re.compile(rf"(?P<key>[nmj])(?P<value>(?:{_NUMBER})(?::(?:{_NUMBER}))?)")


class PolicyError(ValueError):
    """A policy string (or spec field) that does not describe a valid policy.

    ``problem`` names what was wrong; the message adds the valid forms.
    """

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"invalid augmentation policy {text!r}: {problem}; {VALID_FORMS}")
        self.text = text
        self.problem = problem

    def __reduce__(self) -> tuple[type[PolicyError], tuple[str, str]]:
        return type(self), (self.text, self.problem)


def _fmt(value: float) -> str:
    """Shortest text that parses back to the same float; whole numbers without '.0'."""
    return str(int(value)) if float(value).is_integer() else _positional(float(value))


def _positional(value: float) -> str:
    """repr's shortest digits without an exponent (1e-05 -> 0.00001), which the option syntax cannot read."""
    return format(Decimal(repr(value)), "f")


@dataclass(frozen=True)
class PolicySpec:
    """One augmentation policy. ``num_ops`` / ``magnitude`` are RandAugment's (s4 only, else None)."""

    name: str
    jitter: tuple[float, float]
    num_ops: int | None = None
    magnitude: float | None = None

    def __post_init__(self) -> None:
        problem = self._normalise()
        if problem is not None:
            fields = f"{self.name!r}, jitter={self.jitter!r}, num_ops={self.num_ops!r}, magnitude={self.magnitude!r}"
            raise PolicyError(f"PolicySpec({fields})", problem)

    def _normalise(self) -> str | None:
        """Coerce fields to canonical types; return what is wrong, or None."""
        if self.name not in POLICY_NAMES:
            return f"unknown policy name {self.name!r}"
        try:
            lo, hi = (float(v) for v in self.jitter)
        except (TypeError, ValueError):
            return f"jitter must be a pair of numbers (LO, HI), got {self.jitter!r}"
        if not 0.0 < lo <= hi <= MAX_JITTER:
            return f"jitter range {_fmt(lo)}:{_fmt(hi)} must satisfy 0 < LO <= HI <= {MAX_JITTER:g}"
        object.__setattr__(self, "jitter", (lo, hi))
        if self.name != "s4":
            if self.num_ops is not None or self.magnitude is not None:
                fixed = "has no learnt policy" if self.name == "s1" else "uses AutoAugment's fixed magnitudes"
                return f"-n/-m apply to s4 (RandAugment) only; {self.name} {fixed}"
            return None
        num_ops = self.num_ops
        if isinstance(num_ops, bool) or not isinstance(num_ops, int) or not 0 <= num_ops <= MAX_NUM_OPS:
            return f"-n must be an integer in 0..{MAX_NUM_OPS}, got {self.num_ops!r}"
        try:
            magnitude = float(self.magnitude)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return f"-m must be a number in 0..{MAX_MAGNITUDE:g}, got {self.magnitude!r}"
        if not 0.0 <= magnitude <= MAX_MAGNITUDE:
            return f"-m must be in 0..{MAX_MAGNITUDE:g}, got {_fmt(magnitude)}"
        object.__setattr__(self, "magnitude", magnitude)
        return None

    def __str__(self) -> str:
        parts = [self.name]
        if self.num_ops is not None:
            parts.append(f"n{self.num_ops}")
        if self.magnitude is not None:
            parts.append(f"m{_fmt(self.magnitude)}")
        parts.append(f"j{_positional(self.jitter[0])}:{_positional(self.jitter[1])}")
        return "-".join(parts)


def parse_policy(text: str | PolicySpec) -> PolicySpec:
    """Parse ``s1``..``s4`` with optional ``-nN``, ``-mM``, ``-jLO:HI`` (any order, case-insensitive)."""
    if isinstance(text, PolicySpec):
        return text
    if not isinstance(text, str):
        raise PolicyError(repr(text), f"expected a string or PolicySpec, got {type(text).__name__}")
    name, *options = text.strip().lower().split("-")
    if name not in POLICY_NAMES:
        raise PolicyError(text, f"unknown policy name {name!r}" if name else "empty policy")
    values: dict[str, str] = {}
    for option in options:
        match = _OPTION.fullmatch(option)
        if match is None:
            raise PolicyError(text, f"cannot read option '-{option}'")
        key, value = match["key"], match["value"]
        if key in values:
            raise PolicyError(text, f"option -{key} given twice")
        if (key == "j") != (":" in value):
            raise PolicyError(text, f"option '-{option}' has the wrong shape")
        values[key] = value
    if "n" in values and not values["n"].isdigit():
        raise PolicyError(text, f"-n must be a whole number, got {values['n']!r}")
    jitter = DEFAULT_JITTER[name]
    if "j" in values:
        lo, hi = values["j"].split(":")
        jitter = (float(lo), float(hi))
    randaugment = name == "s4"
    num_ops = int(values["n"]) if "n" in values else (DEFAULT_NUM_OPS if randaugment else None)
    magnitude = float(values["m"]) if "m" in values else (DEFAULT_MAGNITUDE if randaugment else None)
    try:
        return PolicySpec(name=name, jitter=jitter, num_ops=num_ops, magnitude=magnitude)
    except PolicyError as error:  # report against the user's text, not the spec's fields
        raise PolicyError(text, error.problem) from None
