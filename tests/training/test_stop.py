"""util/stop.py's StopAgreement (issue 28, item 3): all ranks stop at the same optimizer-step boundary, at most
`lag` (2) boundaries after the first one at which any rank's flag is up, without waiting at each boundary."""
import json

import pytest

from conftest import run_torchrun
from util.stop import StopAgreement


class Flag:
    """A stop flag that is up from boundary `raise_at` on; the test loop sets `now` before each boundary."""

    def __init__(self, raise_at):
        self.raise_at, self.now = raise_at, 0

    def __call__(self) -> bool:
        return self.raise_at is not None and self.now >= self.raise_at


def phase(agreement: StopAgreement, flag: Flag, boundaries: int) -> tuple[int | None, bool]:
    """-> (the boundary at which at_boundary returned True or None, end()'s answer)."""
    agreement.begin()
    for b in range(boundaries):
        flag.now = b
        if agreement.at_boundary():
            return b, agreement.end()
    return None, agreement.end()


# ------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("raise_at, expected", [(0, 0), (3, 3), (7, 7), (None, None)])
def test_one_process_stops_at_the_first_boundary_with_the_flag_up(raise_at, expected):
    flag = Flag(raise_at)
    agreement = StopAgreement(flag)
    assert agreement.group is None  # torch.distributed is not initialised here: no collective
    stopped_at, ended = phase(agreement, flag, 8)
    assert stopped_at == expected and agreement.stopped_at == expected
    assert ended is (expected is not None)


def test_phases_are_independent_and_a_stopped_phase_refuses_another_boundary():
    flag = Flag(2)
    agreement = StopAgreement(flag)
    assert phase(agreement, flag, 5) == (2, True)
    flag.raise_at = None
    assert phase(agreement, flag, 5) == (None, False)  # begin() forgot the earlier stop
    assert agreement.boundaries == 5
    flag.raise_at = 0
    agreement.begin()
    assert agreement.at_boundary()
    with pytest.raises(RuntimeError, match="already agreed to stop at boundary 0.*Fix: leave the loop"):
        agreement.at_boundary()


def test_no_stop_callable_never_stops_and_a_negative_lag_is_refused():
    agreement = StopAgreement(None)
    agreement.begin()
    assert not any(agreement.at_boundary() for _ in range(4))
    assert agreement.end() is False
    with pytest.raises(ValueError, match="lag must be >= 0.*Fix"):
        StopAgreement(Flag(None), lag=-1)


# ------------------------------------------------------------------------------------------- two ranks
def expected_results() -> dict:
    """Per case of tests/stop_agreement_worker.py: (stopped_at, boundaries run, end()); the same on both ranks."""
    expected = {f"rank1_at_{j}": (j + 2, j + 3, True) for j in (0, 1, 3, 6)}  # j + lag, flag on rank 1 only
    expected.update({
        "both_at_4_and_2": (4, 5, True),  # rank 1's flag at 2 decides: 2 + 2, also on rank 0, whose flag came later
        "no_flag": (None, 10, False),
        "raised_at_the_last_boundary": (None, 5, True),  # the phase ended first: end() reports the stop
        "one_boundary_phase": (None, 1, True),  # shorter than lag: end() drains and reports
        "empty_phase": (None, 0, False),
        "lag1_rank1_at_3": (4, 5, True),
    })
    return expected


def test_two_ranks_stop_at_the_same_boundary_lag_boundaries_after_the_flag(tmp_path):
    res = run_torchrun(2, ["tests/stop_agreement_worker.py", str(tmp_path)], timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    results = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    for name, (stopped_at, ran, ended) in expected_results().items():
        for rank in (0, 1):
            assert results[rank][name] == {"stopped_at": stopped_at, "ran": ran, "end": ended}, (name, rank)
    # rank 1 came to each boundary 1 s late: with the default lag 1, rank 0's first boundary did not wait for it
    # (pipelined), the second read boundary 0's all-reduce and so waited for rank 1's first boundary
    seconds = results[0]["behind_rank"]["seconds"]
    assert seconds[0] < 0.3 and seconds[1] > 0.5, seconds
    assert results[0]["one_side_group"]["same"] and results[1]["one_side_group"]["same"]
