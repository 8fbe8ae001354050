"""Policy strings -> frozen specs -> canonical strings, and the errors for bad strings."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from augment import PolicyError, PolicySpec, parse_policy


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("s1", "s1-j0.8:1.2"),
        ("s2", "s2-j0.8:1.2"),
        ("s3", "s3-j0.5:2.0"),
        ("s4", "s4-n2-m10-j0.5:2.0"),
        ("s4-n2-m10", "s4-n2-m10-j0.5:2.0"),
        ("s4-n3-m7", "s4-n3-m7-j0.5:2.0"),
        ("s4-m7.5", "s4-n2-m7.5-j0.5:2.0"),
        ("s3-j0.5:2.0", "s3-j0.5:2.0"),
        ("s1-j1:1", "s1-j1.0:1.0"),
        ("  S4-J0.25:3-M0-N0 ", "s4-n0-m0-j0.25:3.0"),
    ],
)
def test_parse_gives_canonical_string_that_round_trips(text: str, canonical: str) -> None:
    spec = parse_policy(text)
    assert str(spec) == canonical
    assert parse_policy(str(spec)) == spec


def test_spec_fields_and_defaults() -> None:
    spec = parse_policy("s4-n3-m7")
    assert (spec.name, spec.num_ops, spec.magnitude, spec.jitter) == ("s4", 3, 7.0, (0.5, 2.0))
    s2 = parse_policy("s2")
    assert (s2.num_ops, s2.magnitude, s2.jitter) == (None, None, (0.8, 1.2))


def test_spec_is_frozen_hashable_and_picklable() -> None:
    spec = parse_policy("s4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "s1"  # type: ignore[misc]
    assert {spec: 1}[parse_policy("s4-n2-m10")] == 1
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert parse_policy(spec) is spec


def test_spec_constructed_directly_is_validated_and_normalised() -> None:
    spec = PolicySpec(name="s4", jitter=[1, 2], num_ops=2, magnitude=5)  # type: ignore[arg-type]
    assert spec.jitter == (1.0, 2.0) and spec.magnitude == 5.0
    with pytest.raises(PolicyError, match="-m must be in 0..10"):
        PolicySpec(name="s4", jitter=(0.5, 2.0), num_ops=2, magnitude=12.0)
    with pytest.raises(PolicyError, match="s4 \\(RandAugment\\) only"):
        PolicySpec(name="s1", jitter=(0.8, 1.2), num_ops=2)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("s5", "unknown policy name 's5'"),
        ("", "empty policy"),
        ("randaugment", "unknown policy name"),
        ("s1-n2", "s4 (RandAugment) only"),
        ("s3-m5", "s4 (RandAugment) only"),
        ("s4-n2.5", "-n must be a whole number"),
        ("s4-n17", "-n must be an integer in 0..16"),
        ("s4-m11", "-m must be in 0..10"),
        ("s4-m-1", "cannot read option '-m'"),
        ("s3-j2:1", "jitter range 2:1"),
        ("s3-j0:1", "jitter range 0:1"),
        ("s3-j0.5", "wrong shape"),
        ("s4-n2:3", "wrong shape"),
        ("s4-x3", "cannot read option '-x3'"),
        ("s4-n2-n3", "option -n given twice"),
        ("s4--n2", "cannot read option '-'"),
    ],
)
def test_bad_strings_are_rejected_with_valid_forms(text: str, problem: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    message = str(info.value)
    assert problem in message
    assert repr(text) in message  # names the offending string
    assert "valid forms: s1 | s2 | s3 | s4" in message and "-nN" in message and "-jLO:HI" in message


def test_policy_error_is_a_value_error_and_pickles() -> None:
    with pytest.raises(ValueError):
        parse_policy(42)  # type: ignore[arg-type]
    error = PolicyError("s9", "unknown policy name 's9'")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.problem == error.problem
