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


def test_no_recording_for_a_decision_that_never_comes():
    # 22 epochs: spec 21, 22 would open the window of decision 23, after the run's end
    s = D3PSchedule(start=3, period=10, window=3, epochs=22)
    assert [e + 1 for e in range(22) if s.is_recording(e)] == [1, 2, 3, 11, 12, 13]
    assert [e + 1 for e in s.decision_epochs()] == [3, 13]
    # decision 23 falls inside the anneal tail (spec 23..30): its window 21, 22 records nothing
    s = D3PSchedule(start=3, period=10, window=3, epochs=30, anneal_epochs=8)
    assert [e + 1 for e in range(30) if s.is_recording(e)] == [1, 2, 3, 11, 12, 13]
    # a run shorter than the first decision records nothing at all
    assert not any(D3PSchedule(start=3, period=10, window=3, epochs=2).is_recording(e) for e in range(2))


def test_d3p_plans_no_forward_only_pass_in_a_window_without_decision():
    import numpy as np

    from d3p.methods.d3p import D3P

    d3p = D3P(8, D3PSchedule(start=2, period=3, window=2, epochs=4))
    d3p.pruned[:3] = True  # as after the decision at spec epoch 2
    # spec 4 would record for decision 5, which a 4-epoch run never makes
    plan = d3p.plan_epoch(3)
    assert not plan.record_losses and plan.forward_only.size == 0
    assert np.array_equal(plan.kept, np.arange(3, 8))
    assert d3p.end_epoch(3, None) == {}
