"""The progress bar shows only meters that hold values: an engine that syncs with the host every print_freq
steps must not show loss=0 before its first flush."""
from util.metrics import MetricLogger, SmoothedValue


def _bar_text(capsys, flush_at: int | None) -> str:
    logger = MetricLogger()
    logger.add_meter("loss", SmoothedValue())
    for i in logger.log_every(range(3), header="Epoch: [0]"):
        if flush_at is not None and i == flush_at:
            logger.update(loss=0.5)
    return capsys.readouterr().err


def test_unflushed_meter_is_not_shown_as_zero(capsys):
    text = _bar_text(capsys, flush_at=None)
    assert "Epoch: [0]" in text and "loss=" not in text


def test_flushed_meter_is_shown(capsys):
    assert "loss=0.5" in _bar_text(capsys, flush_at=0)
