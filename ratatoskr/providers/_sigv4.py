"""AWS Signature Version 4 for the SES provider, on botocore: its canonicalisation, HMAC chain
and credential resolution, none of it written here.

Two jobs:

* :func:`sign` signs one request at an explicit time. It drives botocore's public
  :class:`~botocore.auth.SigV4Auth` steps (canonical request, string to sign, signature) instead
  of ``add_auth`` only because ``add_auth`` reads the wall clock itself: with the time passed in,
  the signer is checked byte for byte against AWS's published test vectors (tests/data/sigv4)
  and the provider's clock can be a test's clock.
* :class:`AwsCredentials` hands out frozen credentials without blocking the event loop. Static
  keys from the config are used as they are. Without them, botocore's default chain (environment,
  shared credentials and config files, web identity, SSO, container and instance roles) is
  resolved in a worker thread, because most of its providers may do network I/O (instance
  metadata, STS, the container endpoint). Temporary credentials are refreshed in a worker thread
  too, by one caller at a time, when botocore says they are about to expire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.exceptions import BotoCoreError

SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"


class NoCredentials(Exception):
    """Neither the config nor the standard AWS chain gave credentials; the text says why."""


def sign(
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: ReadOnlyCredentials,
    *,
    region: str,
    service: str,
    when: datetime,
) -> dict[str, str]:
    """The headers to add to a request so AWS accepts it: ``X-Amz-Date``, ``Authorization`` and
    ``X-Amz-Security-Token`` for temporary credentials.

    ``headers`` must be exactly the headers that will be sent (``Host`` included, or it is taken
    from ``url``) and ``body`` exactly the bytes: both are part of the signature.
    """
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    stamp = when.strftime(SIGV4_TIMESTAMP)
    request.context["timestamp"] = stamp
    added = {"X-Amz-Date": stamp}
    if credentials.token:
        added["X-Amz-Security-Token"] = credentials.token
    for name, value in added.items():
        request.headers[name] = value
    auth = SigV4Auth(credentials, service, region)
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    signed = auth.signed_headers(auth.headers_to_sign(request))
    added["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={auth.scope(request)}, SignedHeaders={signed}, Signature={signature}"
    )
    return added


class AwsCredentials:
    """Credentials for signing: static ones from the config, or botocore's default chain.

    ``resolve`` is how the chain is found (a botocore ``Session().get_credentials`` by default);
    it runs in a worker thread, once, and again after a failure.
    """

    def __init__(
        self,
        access_key_id: str = "",
        secret_access_key: str = "",
        *,
        resolve: Callable[[], Any] | None = None,
    ) -> None:
        self._static = (
            ReadOnlyCredentials(access_key_id, secret_access_key, None)
            if access_key_id and secret_access_key
            else None
        )
        self._resolve = resolve or _default_chain
        self._chain: Credentials | None = None
        self._lock = asyncio.Lock()

    @property
    def static(self) -> bool:
        return self._static is not None

    async def get(self) -> ReadOnlyCredentials:
        """Frozen credentials fit for signing now; raises :class:`NoCredentials`."""
        if self._static is not None:
            return self._static
        chain = self._chain
        if chain is not None and not _needs_refresh(chain):
            return chain.get_frozen_credentials()  # no I/O: nothing to refresh
        async with self._lock:  # one resolution or refresh at a time; the others wait for it
            if self._chain is None:
                self._chain = await asyncio.to_thread(self._find)
            chain = self._chain
            try:
                return await asyncio.to_thread(chain.get_frozen_credentials)
            except BotoCoreError as exc:
                self._chain = None  # start from the chain again next time
                raise NoCredentials(f"cannot refresh AWS credentials: {exc}") from exc

    def forget(self) -> None:
        """Drop the resolved chain (SES said the token expired): the next :meth:`get`
        resolves it again, in a worker thread."""
        self._chain = None

    def _find(self) -> Credentials:
        try:
            found = self._resolve()
        except BotoCoreError as exc:
            raise NoCredentials(f"the AWS credential chain failed: {exc}") from exc
        if found is None:
            raise NoCredentials(
                "no AWS credentials: set access_key_id and secret_access_key (or "
                "secret_access_key_file), or provide them through the standard AWS chain "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, AWS_PROFILE, "
                "a container or instance role)"
            )
        return found  # type: ignore[no-any-return]


def _needs_refresh(credentials: Credentials) -> bool:
    if isinstance(credentials, RefreshableCredentials):
        return bool(credentials.refresh_needed())
    return False


def _default_chain() -> Any:
    from botocore.session import Session

    return Session().get_credentials()
