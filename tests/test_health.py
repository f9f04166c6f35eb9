"""Circuit breaker and backoff, on injected time."""

from __future__ import annotations

import pytest

from ratatoskr.delivery.backoff import retry_delay
from ratatoskr.delivery.health import Circuit, ProviderHealth


@pytest.fixture
def changes():
    return []


@pytest.fixture
def health(clock, changes):
    return ProviderHealth(
        "mg",
        failures_to_open=3,
        cooldown=10,
        cooldown_max=40,
        clock=clock,
        on_change=lambda h, up, reason: changes.append((up, reason)),
    )


def test_consecutive_failures_open_the_circuit(health, changes):
    for _ in range(2):
        assert health.acquire()
        health.record_failure("503")
    assert health.up
    health.record_failure("503")
    assert health.circuit is Circuit.OPEN
    assert not health.up and not health.acquire()
    assert changes == [(False, "503")]


def test_success_resets_the_consecutive_count(health):
    for _ in range(5):
        health.record_failure("503")
        health.record_failure("503")
        health.record_success()
    assert health.circuit is Circuit.CLOSED


def test_failure_rate_over_the_window_opens(clock):
    h = ProviderHealth("mg", failures_to_open=100, clock=clock)
    for i in range(20):
        if i % 3 == 0:
            h.record_success()
        else:
            h.record_failure("flaky")
        if h.circuit is Circuit.OPEN:
            break
    assert h.circuit is Circuit.OPEN


def test_unusable_credentials_open_at_once(health):
    health.record_failure("401 Forbidden", unusable=True)
    assert health.circuit is Circuit.OPEN


def test_half_open_lets_exactly_one_trial_through(health, clock, changes):
    health.record_failure("x", unusable=True)
    clock.advance(9)
    assert not health.available() and not health.acquire()
    clock.advance(1)
    assert health.available()
    assert health.acquire()
    assert health.circuit is Circuit.HALF_OPEN
    assert not health.acquire()
    health.record_success()
    assert health.circuit is Circuit.CLOSED and health.up
    assert changes == [(False, "x"), (True, "delivered again")]


def test_failed_trial_reopens_with_a_longer_cooldown(health, clock):
    health.record_failure("x", unusable=True)
    for expected in (20, 40, 40):
        clock.advance(health.reopen_at - clock())
        assert health.acquire()
        health.record_failure("still down")
        assert health.circuit is Circuit.OPEN
        assert health.reopen_at - clock() == expected


def test_rate_limit_pauses_without_opening(health, clock, changes):
    health.record_rate_limit(30, "429")
    assert health.circuit is Circuit.CLOSED
    assert not health.up and not health.available() and not health.acquire()
    assert health.state() == "rate_limited"
    clock.advance(30)
    assert health.available() and health.up
    assert changes == [(False, "rate limited for 30s: 429"), (True, "rate limit pause over")]


def test_rate_limit_without_a_time_uses_a_default_pause(health, clock):
    health.record_rate_limit(None, "420")
    clock.advance(59)
    assert not health.available()
    clock.advance(1)
    assert health.available()


def test_backoff_grows_caps_and_honours_retry_after():
    no_jitter = dict(initial=60, maximum=3600, rand=lambda: 0.0)
    assert [retry_delay(n, **no_jitter) for n in (1, 2, 3, 7, 20)] == [60, 120, 240, 3600, 3600]
    assert retry_delay(1, explicit=900, **no_jitter) == 900
    assert retry_delay(1, explicit=10, **no_jitter) == 60
    assert retry_delay(1, explicit=99999, **no_jitter) == 3600
    jittered = retry_delay(1, initial=60, maximum=3600, rand=lambda: 1.0)
    assert jittered == 45


def test_answers_from_before_the_outage_do_not_reopen_a_recovered_circuit(health, clock):
    """Deliveries in flight when the circuit opened report their failures late; once a trial
    has closed the circuit, one new failure must not open it again."""
    for _ in range(16):  # 16 were in flight; the circuit opens at the third
        health.record_failure("503")
    assert health.circuit is Circuit.OPEN
    clock.advance(health.reopen_at - clock())
    assert health.acquire()
    health.record_success()
    for _ in range(5):
        health.record_success()
    health.record_failure("one blip")
    assert health.circuit is Circuit.CLOSED
