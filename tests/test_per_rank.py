"""Resume state kept per process: each rank gets its own back, and another process count is refused."""

import pytest

from pipeline.engine import per_rank
from pipeline.engine.per_rank import PerRankState, ResumeStateError


class Averages:
    def __init__(self) -> None:
        self.state = {"mean": 0.0}

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)


@pytest.mark.parametrize("world", [1, 3])
def test_a_state_saved_by_two_processes_is_refused_by_another_count(monkeypatch, world):
    """Three processes had no state for rank 2; one process dropped rank 1's running averages silently."""
    saved = {"ranks": [{"mean": 1.0}, {"mean": 2.0}]}
    monkeypatch.setattr(per_rank, "_rank_and_world", lambda: (0, world))
    with pytest.raises(ResumeStateError, match=rf"saved Averages is for 2 process\(es\); this run has {world}"):
        PerRankState(Averages(), "Averages").load_state_dict(saved)


def test_each_rank_gets_its_own_state_back(monkeypatch):
    monkeypatch.setattr(per_rank, "_rank_and_world", lambda: (1, 2))
    inner = Averages()
    PerRankState(inner, "Averages").load_state_dict({"ranks": [{"mean": 1.0}, {"mean": 2.0}]})
    assert inner.state == {"mean": 2.0}


def test_a_state_that_kept_nothing_resumes_with_any_count(monkeypatch):
    """The loss averages of a loss balance that is off stay at their start: a student resumes on 3 processes."""
    monkeypatch.setattr(per_rank, "_rank_and_world", lambda: (2, 3))
    inner = Averages()
    PerRankState(inner, "Averages").load_state_dict({"ranks": [{"mean": 0.0}, {"mean": 0.0}]})
    assert inner.state == {"mean": 0.0}
