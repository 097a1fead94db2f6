"""A batch whose image host is down is retried with a doubling delay that never exceeds the operator's cap."""
from worker.tasks import backoff_s


def test_backoff_doubles_from_the_base():
    assert [backoff_s(r, 0.5, 600) for r in range(4)] == [0.5, 1.0, 2.0, 4.0]


def test_backoff_stops_at_the_cap():
    assert backoff_s(3, 0.5, 3.0) == 3.0
    assert backoff_s(19, 5.0, 600) == 600
