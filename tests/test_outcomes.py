"""The outcome decision: what one round's result does to a message, against a real SQLite queue."""

from __future__ import annotations

from ratatoskr.delivery.outcomes import refused_by
from ratatoskr.queue import Attempt, Outcome


def test_a_revival_forgets_earlier_refusals():
    refused = Attempt(1.0, "a", Outcome.PERMANENT)
    assert refused_by([refused, Attempt(2.0, "b", Outcome.TEMPORARY)]) == {"a"}
    assert refused_by([refused, Attempt.revived(3.0)]) == set()
    assert refused_by([refused, Attempt.revived(3.0), Attempt(4.0, "b", Outcome.PERMANENT)]) == {"b"}
