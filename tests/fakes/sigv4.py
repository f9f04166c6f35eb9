"""An AWS Signature Version 4 *verifier* for the fake SES, written from the spec with hmac and
hashlib only, deliberately not with botocore: it rebuilds the canonical request from what
arrived on the wire, so a signer that signs other bytes or headers than it sends (or botocore
used wrongly) is caught. It is itself checked against AWS's test vectors (tests/data/sigv4).

:func:`check` returns ``None`` for a good signature, or ``(error name, message)`` as AWS
answers a bad one (shared/providers-more.md §1.12: exact texts marked [U] there).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from urllib.parse import quote, unquote

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<akid>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?"
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)
BAD_SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. Check your "
    "AWS Secret Access Key and signing method. Consult the service documentation for details."
)
INVALID_TOKEN = "The security token included in the request is invalid."

Refusal = tuple[str, str]


def canonical_query(query: str) -> str:
    pairs = []
    for item in query.split("&") if query else []:
        key, _, value = item.partition("=")
        pairs.append((quote(unquote(key), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def canonical_request(
    method: str, path: str, query: str, *, headers: Iterable[tuple[str, str]], signed: list[str], body: bytes
) -> str:
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(" ".join(value.split()))
    lines = [f"{name}:{','.join(values.get(name, []))}" for name in signed]
    return "\n".join(
        [
            method.upper(),
            quote(path or "/", safe="/~"),
            canonical_query(query),
            "\n".join(lines) + "\n",
            ";".join(signed),
            hashlib.sha256(body).hexdigest(),
        ]
    )


def signature(secret: str, stamp: str, region: str, service: str, creq: str) -> tuple[str, str]:
    """(string to sign, hex signature) for canonical request ``creq``."""
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    sts = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(creq.encode()).hexdigest()])
    key = f"AWS4{secret}".encode()
    for part in (stamp[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return sts, hmac.new(key, sts.encode(), hashlib.sha256).hexdigest()


def check(
    method: str,
    path: str,
    query: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    secrets: Callable[[str], tuple[str, str | None] | None],
    region: str,
    service: str,
    now: float,
    skew: float = 15 * 60,
) -> Refusal | None:
    """Verify one request. ``secrets(akid)`` gives ``(secret, session token or None)`` for a
    known access key id, None for an unknown one."""
    lower = {n.lower(): v for n, v in headers}
    authorization = lower.get("authorization", "")
    if not authorization:
        return "MissingAuthenticationTokenException", "Missing Authentication Token"
    match = _AUTH.match(authorization.strip())
    if match is None:
        return (
            "IncompleteSignatureException",
            f"Authorization header requires existence of fields: {authorization[:40]}",
        )
    known = secrets(match["akid"])
    if known is None:
        return "UnrecognizedClientException", INVALID_TOKEN
    secret, token = known
    if match["service"] != service:
        return "InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'."
    if match["region"] != region:
        return (
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{match['region']}'.",
        )
    stamp = lower.get("x-amz-date", "")
    try:
        when = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return "IncompleteSignatureException", "X-Amz-Date is missing or malformed."
    if stamp[:8] != match["date"]:
        return (
            "InvalidSignatureException",
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP.",
        )
    if abs(now - when) > skew:
        return (
            "InvalidSignatureException",
            f"Signature expired: {stamp} is now earlier than "
            f"{datetime.fromtimestamp(now - skew, UTC):%Y%m%dT%H%M%SZ} "
            f"({datetime.fromtimestamp(now, UTC):%Y%m%dT%H%M%SZ} - 15 min.)",
        )
    signed = match["signed"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        return "InvalidSignatureException", "Host and X-Amz-Date must be signed."
    if token is not None and (
        lower.get("x-amz-security-token") != token or "x-amz-security-token" not in signed
    ):
        return "UnrecognizedClientException", INVALID_TOKEN
    creq = canonical_request(method, path, query, headers=headers, signed=signed, body=body)
    _, expected = signature(secret, stamp, region, service, creq)
    if not hmac.compare_digest(expected, match["sig"]):
        return "InvalidSignatureException", BAD_SIGNATURE
    return None
