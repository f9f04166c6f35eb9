"""pytest fixtures that start the fake provider servers on loopback ports.

``fake_mailgun``, ``fake_mandrill``, ``fake_ses``, ``fake_sendgrid``, ``fake_postmark``,
``fake_resend`` and ``fake_sparkpost`` each yield a started fake (see :mod:`tests.fakes.mailgun`
and :mod:`tests.fakes.mandrill`): ``.url`` is the provider's ``base_url``, ``.api_key`` the key
it accepts, ``.domain`` (Mailgun) the sending domain, and ``.provider_entry(name=...)`` a ready
``[[providers]]`` table, e.g. ``running_daemon(providers=[fake_mailgun.provider_entry()])``.
Each fails the test at teardown if a request it accepted broke the provider's request schema
(``fake.violations``, from ``tests/schemas``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.mailgun import FakeMailgun
from tests.fakes.mandrill import FakeMandrill
from tests.fakes.postmark import FakePostmark
from tests.fakes.resend import FakeResend
from tests.fakes.sendgrid import FakeSendGrid
from tests.fakes.ses import FakeSes
from tests.fakes.sparkpost import FakeSparkpost


@pytest.fixture
async def fake_mailgun() -> AsyncIterator[FakeMailgun]:
    async with FakeMailgun() as fake:
        yield fake
    assert not fake.violations, fake.violations


@pytest.fixture
async def fake_mandrill() -> AsyncIterator[FakeMandrill]:
    async with FakeMandrill() as fake:
        yield fake
    assert not fake.violations, fake.violations


@pytest.fixture
async def fake_ses() -> AsyncIterator[FakeSes]:
    async with FakeSes() as fake:
        yield fake
    assert not fake.violations, fake.violations


@pytest.fixture
async def fake_sendgrid() -> AsyncIterator[FakeSendGrid]:
    async with FakeSendGrid() as fake:
        yield fake
    assert not fake.violations, fake.violations


@pytest.fixture
async def fake_postmark() -> AsyncIterator[FakePostmark]:
    async with FakePostmark() as fake:
        yield fake
    assert not fake.violations, fake.violations


@pytest.fixture
async def fake_resend() -> AsyncIterator[FakeResend]:
    async with FakeResend() as fake:
        yield fake
    assert not fake.violations, fake.violations


@pytest.fixture
async def fake_sparkpost() -> AsyncIterator[FakeSparkpost]:
    async with FakeSparkpost() as fake:
        yield fake
    assert not fake.violations, fake.violations
