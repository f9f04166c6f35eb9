"""AWS Signature Version 4 against AWS's published test vectors (tests/data/sigv4): the signer
ratatoskr uses (botocore, driven by ratatoskr.providers._sigv4.sign) and the fake SES's own
verifier (tests/fakes/sigv4.py, hmac/hashlib) must both reproduce them byte for byte."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from botocore.credentials import ReadOnlyCredentials

from ratatoskr.providers._sigv4 import sign
from tests.fakes import sigv4

VECTORS = sorted((Path(__file__).parent / "data" / "sigv4").glob("*.json"))
ACCESS_KEY = "AKIDEXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # the suite's published example secret
WHEN = datetime(2015, 8, 30, 12, 36, tzinfo=UTC)
REGION, SERVICE = "us-east-1", "service"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def request_headers(case: dict[str, Any]) -> list[tuple[str, str]]:
    """The vector's headers as a client sends them (minus X-Amz-Date, which signing adds)."""
    return [(name, value) for name, value in case["headers"] if name.lower() != "x-amz-date"]


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_botocore_signer_reproduces_the_vector(path: Path) -> None:
    """Our signing call gives exactly the suite's Authorization header (and token header)."""
    case = load(path)
    credentials = ReadOnlyCredentials(ACCESS_KEY, SECRET, case["session_token"])
    headers = dict(request_headers(case))
    url = "https://example.amazonaws.com" + case["path"]
    added = sign(
        case["method"],
        url,
        headers,
        case["body"].encode(),
        credentials,
        region=REGION,
        service=SERVICE,
        when=WHEN,
    )
    assert added["Authorization"] == case["authorization"]
    assert added["X-Amz-Date"] == "20150830T123600Z"
    assert added.get("X-Amz-Security-Token") == case["session_token"]


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_fake_verifier_reproduces_the_vector(path: Path) -> None:
    """The fake's verifier builds the suite's canonical request and string to sign, and
    accepts the suite's signed request, so it can be trusted to refuse a wrong one."""
    case = load(path)
    full, _, query = case["path"].partition("?")
    signed = case["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
    headers = [(n, v) for n, v in case["headers"]]
    if case["session_token"]:
        headers.append(("X-Amz-Security-Token", case["session_token"]))
    creq = sigv4.canonical_request(
        case["method"], full, query, headers=headers, signed=signed, body=case["body"].encode()
    )
    assert creq == case["canonical_request"]
    sts, signature = sigv4.signature(SECRET, "20150830T123600Z", REGION, SERVICE, creq)
    assert sts == case["string_to_sign"]
    assert case["authorization"].endswith(f"Signature={signature}")
    headers.append(("Authorization", case["authorization"]))

    def secrets(akid: str) -> tuple[str, str | None] | None:
        return (SECRET, case["session_token"]) if akid == ACCESS_KEY else None

    common = {"region": REGION, "service": SERVICE, "now": WHEN.timestamp(), "secrets": secrets}
    body = case["body"].encode()
    assert sigv4.check(case["method"], full, query, headers, body, **common) is None
    # One byte more in the body, or a different secret: refused as AWS refuses it.
    refused = sigv4.check(case["method"], full, query, headers, body + b"x", **common)
    assert refused == ("InvalidSignatureException", sigv4.BAD_SIGNATURE)
    late = {**common, "now": WHEN.timestamp() + 16 * 60}
    late_refusal = sigv4.check(case["method"], full, query, headers, body, **late)
    assert late_refusal is not None and late_refusal[1].startswith("Signature expired")
