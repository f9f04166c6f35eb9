"""pytest fixtures that start the fake provider servers on loopback ports.

``fake_mailgun`` and ``fake_mandrill`` each yield a started fake (see :mod:`tests.fakes.mailgun`
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
