"""search.lanes.in_order: results in the jobs' order whichever lane ran them, a held-up lane
taking fewer jobs, bounded look-ahead, errors at their place, early close stopping the lanes."""
import threading

import pytest

from dwjax.search import lanes


def test_results_come_in_order_and_a_held_up_lane_takes_fewer_jobs():
    released = threading.Event()
    ran = {0: [], 1: []}

    def lane(i):
        def start(job):
            if i == 0 and not ran[0]:
                assert released.wait(timeout=60)  # held until lane 1 has run 5 jobs
            ran[i].append(job)
            if i == 1 and len(ran[1]) == 5:
                released.set()
            return lambda: job * job
        return start

    out = list(lanes.in_order(range(40), [lane(0), lane(1)], ahead=8))
    assert out == [j * j for j in range(40)]
    assert sorted(ran[0] + ran[1]) == list(range(40))
    assert len(ran[1]) >= 5 and ran[0][0] < ran[1][4]


def test_no_more_than_ahead_jobs_are_taken_before_they_are_yielded():
    taken = []

    def jobs():
        for j in range(30):
            taken.append(j)
            yield j

    for got in lanes.in_order(jobs(), [lambda j: lambda: j] * 3, ahead=6):
        assert len(taken) - got <= 6 + 1  # the next ones, at most `ahead` beyond the yielded


def test_a_lane_error_is_raised_at_its_place_and_early_close_stops_the_lanes():
    def run(job):
        if job == 3:
            raise ValueError("job 3")
        if job == 5:
            return lambda: 1 / 0  # a failure while waiting: raised in its place too
        return lambda: job

    got = []
    with pytest.raises(ValueError, match="job 3"):
        for r in lanes.in_order(range(10), [run, run], ahead=4):
            got.append(r)
    assert got == [0, 1, 2]
    with pytest.raises(ZeroDivisionError):
        list(lanes.in_order([0, 1, 2, 4, 5, 6], [run, run], ahead=4))
    it = lanes.in_order(range(1000), [lambda j: lambda: j] * 2, ahead=4)
    assert [next(it), next(it)] == [0, 1]
    it.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("lane-")]
