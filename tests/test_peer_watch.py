"""The peer watch's bookkeeping (the heartbeat itself runs in tests/test_multiprocess.py)."""

from pipeline.engine.peer_watch import Silence


def test_a_counter_that_stands_still_for_the_timeout_is_a_process_gone():
    silence = Silence([1, 2], timeout_s=10, own_gap_s=5, now=0)
    found = []
    for now in range(1, 15):
        silence.tick(now)
        found.append(silence.observe(now, {1: now, 2: min(now, 3)}))  # process 2's last beat: second 3
    assert found[:13] == [None] * 13  # silent 10 s at second 13: not yet more than the timeout
    assert found[13] == (2, 11)  # second 14


def test_a_process_that_was_itself_paused_does_not_blame_the_others():
    """A suspended job resumed one process at a time: the first one awake saw the others' counters still."""
    silence = Silence([1], timeout_s=10, own_gap_s=5, now=0)
    silence.tick(1)
    assert silence.observe(1, {1: 1}) is None
    silence.tick(31)  # this process was stopped for 30 s, and so was process 1
    assert silence.observe(31, {1: 1}) is None
    silence.tick(32)
    assert silence.observe(32, {1: 2}) is None  # process 1 woke a second later
    silence.tick(33)
    assert silence.observe(33, {1: 2}) is None


def test_a_process_that_left_on_purpose_is_not_watched():
    silence = Silence([1, 2], timeout_s=2, own_gap_s=5, now=0)
    for now in range(1, 10):
        silence.tick(now)
        assert silence.observe(now, {1: now}) is None  # process 2 said it was done: not in the beats
