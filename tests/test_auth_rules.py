"""Small rules behind AUTH and envelope checks, on injected time."""

from __future__ import annotations

import pytest

from ratatoskr.auth import Accounts, FailureDelay
from ratatoskr.errors import InvalidAddress
from ratatoskr.message import check_addr_spec
from ratatoskr.table import Secret
from tests.conftest import FakeClock


def test_a_client_that_hung_up_still_waits_out_its_penalty():
    clock = FakeClock(0.0)
    delay = FailureDelay(1.0, clock=clock)
    assert delay.remaining("10.0.0.1") == 0
    assert delay.failed("10.0.0.1") == 1.0
    assert delay.remaining("10.0.0.1") == 1.0
    clock.advance(0.4)
    assert delay.remaining("10.0.0.1") == pytest.approx(0.6)
    assert delay.failed("10.0.0.1") == 2.0
    assert delay.remaining("10.0.0.2") == 0


def test_a_user_removed_by_reload_gets_no_wider_sender_rights():
    accounts = Accounts(users={"app": Secret("scrypt$x")}, senders={"app": ("@example.com",)})
    assert accounts.may_send_as("app", "a@example.com")
    assert not accounts.may_send_as("app", "ceo@bank.test")
    assert not accounts.may_send_as("gone", "a@example.com")
    assert accounts.may_send_as(None, "anyone@example.org")


def test_non_utf8_envelope_address_is_a_bad_address():
    with pytest.raises(InvalidAddress, match="UTF-8"):
        check_addr_spec("\udcff@example.com")
