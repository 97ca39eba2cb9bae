import pytest

from d3p.schedule import D3PSchedule, validate_schedule


def test_paper_schedule_spec_epochs():
    s = D3PSchedule(start=3, period=10, window=3, epochs=40)
    # spec counts from 1; code from 0
    assert [e + 1 for e in s.decision_epochs()] == [3, 13, 23, 33]
    assert [e + 1 for e in range(40) if s.is_recording(e)] == [1, 2, 3, 11, 12, 13, 21, 22, 23, 31, 32, 33]
    assert [s.window_slot(e - 1) for e in (11, 12, 13)] == [0, 1, 2]


def test_anneal_stops_pruning_and_recording():
    s = D3PSchedule(start=3, period=10, window=3, epochs=30, anneal_epochs=8)
    assert s.is_annealing(22) and not s.is_annealing(21)  # spec epochs 23..30
    assert [e + 1 for e in s.decision_epochs()] == [3, 13]
    assert not s.is_recording(21 + 1)


@pytest.mark.parametrize("s,p,n,msg", [(2, 10, 3, "<= --d3p_start"), (5, 2, 3, "<= --d3p_period"), (3, 10, 0, ">= 1")])
def test_invalid_combinations(s, p, n, msg):
    assert any(msg in m for m in validate_schedule(s, p, n))
    with pytest.raises(ValueError, match="d3p_"):
        D3PSchedule(s, p, n, 100)
