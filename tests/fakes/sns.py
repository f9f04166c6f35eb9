"""A fake Amazon SNS: it signs messages as SNS does, serves its signing certificate and takes
subscription confirmations (shared/events.md §3.2-3.4, §3.9).

SNS's certificate URL is ``https://sns.<region>.amazonaws.com/SimpleNotificationService-….pem``;
tests cannot reach AWS, so a receiver is given ``fake.transport()``: it fetches a URL on an SNS
host from this fake instead (recorded in ``fake.fetched`` as the URL asked for), and fails the
test if it is ever asked for any other host: the receiver must refuse those before fetching.

The key is a throwaway RSA key with a self-signed certificate for ``sns.amazonaws.com`` (made
once per test process). The canonical string is built here independently of ratatoskr's::

    async with FakeSns() as sns:
        webhook.transport = sns.transport()
        message = sns.notification(json.dumps(ses_event), version="1")
        sns.confirmation()                      # a SubscriptionConfirmation for sns.topic_arn
        sns.confirmed                           # the ConfirmSubscription GETs that arrived
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import re
import secrets
import time
import uuid
from typing import Any, Self
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from yarl import URL

from ratatoskr.events.sns import FetchFailed

_SNS_HOST = re.compile(r"sns\.[a-zA-Z0-9-]{3,}\.amazonaws\.com(\.cn)?")
_NOTIFICATION = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")


@functools.cache
def signing_material() -> tuple[rsa.RSAPrivateKey, bytes]:
    """A throwaway RSA key and its self-signed certificate (PEM), as SNS's would look."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM)


def iso(at: float) -> str:
    """SNS's time format: UTC with milliseconds and ``Z``."""
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def string_to_sign(message: dict[str, Any]) -> bytes:
    keys = _NOTIFICATION if message["Type"] == "Notification" else _CONFIRMATION
    return "".join(f"{k}\n{message[k]}\n" for k in keys if k in message).encode()


class FakeSns:
    def __init__(
        self, region: str = "eu-west-1", account: str = "111122223333", topic: str = "ses-events"
    ) -> None:
        self.region = region
        self.topic_arn = f"arn:aws:sns:{region}:{account}:{topic}"
        self.host = f"sns.{region}.amazonaws.com"
        self.cert_path = f"/SimpleNotificationService-{secrets.token_hex(16)}.pem"
        self.cert_url = f"https://{self.host}{self.cert_path}"
        self.key, self.cert_pem = signing_material()
        self.fetched: list[str] = []  #: every URL a receiver had this fake fetch, as it asked
        self.confirmed: list[dict[str, str]] = []  #: query of each ConfirmSubscription GET
        self._server: TestServer | None = None

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get(self.cert_path, self._cert)
        app.router.add_get("/", self._action)
        self._server = TestServer(app, host="127.0.0.1")
        await self._server.start_server()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            await self._server.close()

    async def _cert(self, request: web.Request) -> web.Response:
        return web.Response(body=self.cert_pem, content_type="application/x-pem-file")

    async def _action(self, request: web.Request) -> web.Response:
        if request.query.get("Action") != "ConfirmSubscription":
            return web.Response(status=400, text="<ErrorResponse/>")
        self.confirmed.append(dict(request.query))
        arn = f"{request.query.get('TopicArn', '')}:{uuid.uuid4()}"
        xml = f"<SubscriptionArn>{arn}</SubscriptionArn>"
        return web.Response(text=f"<ConfirmSubscriptionResponse>{xml}</ConfirmSubscriptionResponse>")

    def transport(self) -> FakeTransport:
        return FakeTransport(self)

    # -- messages ---------------------------------------------------------------------------------

    def notification(
        self,
        message: str,
        *,
        subject: str | None = "Amazon SES Email Event Notification",
        at: float | None = None,
        message_id: str | None = None,
        topic_arn: str | None = None,
        **signing: Any,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "Type": "Notification",
            "MessageId": message_id or str(uuid.uuid4()),
            "TopicArn": topic_arn or self.topic_arn,
            "Message": message,
            "Timestamp": iso(at if at is not None else time.time()),
            "UnsubscribeURL": f"https://{self.host}/?Action=Unsubscribe&SubscriptionArn={self.topic_arn}:x",
        }
        if subject is not None:
            body["Subject"] = subject
        return self.sign(body, **signing)

    def confirmation(
        self, kind: str = "SubscriptionConfirmation", *, subscribe_url: str | None = None, **signing: Any
    ) -> dict[str, Any]:
        token = secrets.token_hex(64)
        url = subscribe_url or (
            f"https://{self.host}/?Action=ConfirmSubscription&TopicArn={quote(self.topic_arn)}&Token={token}"
        )
        body = {
            "Type": kind,
            "MessageId": str(uuid.uuid4()),
            "Token": token,
            "TopicArn": self.topic_arn,
            "Message": f"You have chosen to subscribe to the topic {self.topic_arn}.\n"
            "To confirm the subscription, visit the SubscribeURL included in this message.",
            "SubscribeURL": url,
            "Timestamp": iso(time.time()),
        }
        return self.sign(body, **signing)

    def sign(
        self,
        body: dict[str, Any],
        *,
        version: str = "2",
        cert_url: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
    ) -> dict[str, Any]:
        """``body`` with ``SignatureVersion``, ``SigningCertURL`` and ``Signature`` (SHA1 for
        "1", else SHA256; an unknown version is signed with SHA256 all the same)."""
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = (key or self.key).sign(string_to_sign(body), padding.PKCS1v15(), algorithm)
        return {
            **body,
            "SignatureVersion": version,
            "Signature": base64.b64encode(signature).decode(),
            "SigningCertURL": cert_url or self.cert_url,
        }


class FakeTransport:
    """Fetches SNS URLs from the fake: the host is swapped for the fake's loopback address."""

    def __init__(self, fake: FakeSns) -> None:
        self.fake = fake

    async def get(self, url: str, *, limit: int) -> bytes:
        parts = urlsplit(url)
        assert parts.scheme == "https" and _SNS_HOST.fullmatch(parts.netloc), f"fetched a non-SNS URL: {url}"
        self.fake.fetched.append(url)
        assert self.fake._server is not None
        local = str(self.fake._server.make_url(parts.path)) + (f"?{parts.query}" if parts.query else "")
        async with aiohttp.ClientSession() as session, session.get(URL(local, encoded=True)) as answer:
            body = await answer.read()
        if answer.status != 200:
            raise FetchFailed(f"answered {answer.status}")
        return body[: limit + 1]
