"""POST /v1/messages and the API documents, over real HTTP against a running daemon."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator, Callable, Mapping
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from ratatoskr.api import schema
from ratatoskr.daemon import Daemon
from ratatoskr.mime import html_to_text
from tests.conftest import wait_until

DOCS = Path(__file__).parent.parent / "docs"
PDF = b"%PDF-1.4\n\x00\x01\x02binary\xff"
LOGO = b"\x89PNG\r\n\x1a\nfake"

VALID: dict[str, Any] = {
    "from": "Ada Lovelace <ada@example.com>",
    "to": ["bob@example.net", "Carol <carol@example.org>"],
    "cc": ["dave@example.com"],
    "bcc": ["hidden@example.org"],
    "reply_to": "support@example.com",
    "subject": "Hello from the API",
    "html": "<h1>Welcome</h1><p>Hello <b>Bob</b>, see <a href='https://example.com/'>this</a>.</p>",
    "headers": {"X-Campaign": "nov"},
    "attachments": [
        {"filename": "a.pdf", "content_type": "application/pdf", "content": base64.b64encode(PDF).decode()},
    ],
    "tags": ["welcome", "nov"],
}


def minimal(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "from": "ada@example.com",
        "to": ["bob@example.net"],
        "subject": "Hi",
        "text": "plain",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(daemon: Daemon, path: str) -> str:
    return f"http://127.0.0.1:{daemon.http_port}{path}"


async def post(
    http: aiohttp.ClientSession, daemon: Daemon, body: Any, **kwargs: Any
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url(daemon, "/v1/messages"), data=data, **kwargs) as response:
        return response.status, await response.json(), response.headers


def read_eml(path: Path) -> EmailMessage:
    return cast(EmailMessage, BytesParser(policy=policy.default).parsebytes(path.read_bytes()))


def lf(text: str) -> str:
    """Text parts of a CRLF message read back with CRLF line ends."""
    return text.replace("\r\n", "\n")


async def delivered(outbox: Path, qid: str) -> tuple[EmailMessage, dict[str, Any]]:
    eml = outbox / f"{qid}.eml"
    await wait_until(eml.exists, what=f"{eml} to be written")
    return read_eml(eml), json.loads((outbox / f"{qid}.json").read_text())


async def queued(daemon: Daemon) -> int:
    counts, _ = await daemon.spool.stats()
    return sum(counts.values())


# -- accepted ----------------------------------------------------------------------------------


async def test_valid_message_is_accepted_and_delivered(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """202 with the queue id; the outbox gets the composed message with every field in place."""
    daemon = await running_daemon()
    status, answer, _ = await post(http, daemon, VALID)
    assert status == 202, answer
    assert set(answer) == {"id"}

    msg, envelope = await delivered(tmp_path / "outbox", answer["id"])
    assert msg["From"] == "Ada Lovelace <ada@example.com>"
    assert msg["To"] == "bob@example.net, Carol <carol@example.org>"
    assert msg["Cc"] == "dave@example.com"
    assert msg["Reply-To"] == "support@example.com"
    assert msg["Subject"] == "Hello from the API"
    assert msg["X-Campaign"] == "nov"
    assert msg["X-Tag"] == "welcome, nov"
    assert msg["Date"] and msg["Message-ID"]
    assert f"with HTTP id {answer['id']}" in msg["Received"]
    assert msg["Bcc"] is None and b"hidden@example.org" not in msg.as_bytes()
    assert envelope == {
        "sender": "ada@example.com",
        "recipients": ["bob@example.net", "carol@example.org", "dave@example.com", "hidden@example.org"],
    }


async def test_html_only_gets_a_derived_text_part_and_attachments_keep_their_bytes(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """text/plain is html2text of the HTML; the attachment decodes to the bytes that were sent."""
    daemon = await running_daemon()
    _, answer, _ = await post(http, daemon, VALID)
    msg, _ = await delivered(tmp_path / "outbox", answer["id"])

    assert msg.get_content_type() == "multipart/mixed"
    text = msg.get_body(preferencelist=("plain",))
    html = msg.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    assert lf(text.get_content()) == html_to_text(VALID["html"])
    assert "**Bob**" in text.get_content()
    assert html.get_content().strip() == VALID["html"]
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_filename() == "a.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == PDF


async def test_text_and_html_are_alternatives_and_content_id_parts_are_inline(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Both bodies kept as given; a part with content_id sits next to the HTML, inline."""
    daemon = await running_daemon()
    body = minimal(
        text="Plain words",
        html='<p>Logo: <img src="cid:logo@ada"></p>',
        attachments=[
            {"filename": "logo.png", "content": base64.b64encode(LOGO).decode(), "content_id": "logo@ada"}
        ],
    )
    _, answer, _ = await post(http, daemon, body)
    msg, _ = await delivered(tmp_path / "outbox", answer["id"])

    assert msg.get_content_type() == "multipart/alternative"
    plain = msg.get_body(preferencelist=("plain",))
    assert plain is not None and lf(plain.get_content()) == "Plain words\n"
    related = msg.get_body(preferencelist=("related",))
    assert related is not None
    inline = [p for p in related.iter_parts() if p.get_content_type() == "image/png"]
    assert [p["Content-ID"] for p in inline] == ["<logo@ada>"]
    assert inline[0].get_content_disposition() == "inline"
    assert inline[0].get_content() == LOGO


async def test_bcc_only_message_is_accepted(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """Bcc alone is enough recipients; duplicates across fields are sent once."""
    daemon = await running_daemon()
    body = minimal(to=None, bcc=["Hidden@example.org", "hidden@example.org"])
    status, answer, _ = await post(http, daemon, body)
    assert status == 202
    msg, envelope = await delivered(tmp_path / "outbox", answer["id"])
    assert envelope["recipients"] == ["Hidden@example.org"]
    assert msg["To"] is None and msg["Bcc"] is None


# -- refused: 400 ------------------------------------------------------------------------------

INVALID = [
    pytest.param(minimal(to=None), "/to", "recipient", id="missing-to"),
    pytest.param(minimal(to=[], cc=[], bcc=[]), "/to", "recipient", id="empty-recipients"),
    pytest.param(minimal(to=["bob@"]), "/to/0", "bad address", id="bad-address"),
    pytest.param(
        minimal(to=["ok@example.net", "not an address"]), "/to/1", "bad address", id="bad-second-address"
    ),
    pytest.param(minimal(**{"from": "Ada <ada@example..com>"}), "/from", "bad address", id="bad-from"),
    pytest.param(minimal(**{"from": None}), "/from", "required", id="missing-from"),
    pytest.param(minimal(to=["a" * 999]), "/to/0", "at most 998", id="huge-address"),
    pytest.param(minimal(subject=None), "/subject", "required", id="missing-subject"),
    pytest.param(minimal(text=None), "/text", "text, html", id="missing-text-and-html"),
    pytest.param(minimal(priority="high"), "/priority", "unknown field", id="unknown-field"),
    pytest.param(
        minimal(attachments=[{"filename": "a", "content": "aGk", "size": 2}]),
        "/attachments/0/size",
        "unknown field",
        id="unknown-attachment-field",
    ),
    pytest.param(
        minimal(attachments=[{"filename": "a.bin", "content": "not base64!"}]),
        "/attachments/0/content",
        "base64",
        id="bad-base64",
    ),
    pytest.param(
        minimal(attachments=[{"filename": "a.bin", "content": "aGk"}]),
        "/attachments/0/content",
        "base64",
        id="unpadded-base64",
    ),
    pytest.param(
        minimal(attachments=[{"filename": "a.bin", "content": "aGVs\nbG8="}]),
        "/attachments/0/content",
        "base64",
        id="wrapped-base64",
    ),
    pytest.param(
        minimal(subject="Hi\r\nBcc: victim@example.org"), "/subject", "CR or LF", id="crlf-in-subject"
    ),
    pytest.param(minimal(subject="Hi\n"), "/subject", "CR or LF", id="trailing-lf-in-subject"),
    pytest.param(
        minimal(to=["Bob\r\nBcc: x@example.org <bob@example.net>"]), "/to/0", "CR or LF", id="crlf-in-name"
    ),
    pytest.param(
        minimal(headers={"X-Ok": "a\r\nBcc: victim@example.org"}),
        "/headers/X-Ok",
        "CR or LF",
        id="crlf-in-header-value",
    ),
    pytest.param(
        minimal(headers={"X-Ok\r\nBcc": "x"}), "/headers/X-Ok\r\nBcc", "CR or LF", id="crlf-in-header-name"
    ),
    pytest.param(
        minimal(headers={"X Bad": "x"}), "/headers/X Bad", "printable ASCII", id="space-in-header-name"
    ),
    pytest.param(
        minimal(headers={"from": "evil@example.org"}),
        "/headers/from",
        "cannot be overridden",
        id="header-override-from",
    ),
    pytest.param(
        minimal(headers={"Content-Type": "text/html"}),
        "/headers/Content-Type",
        "cannot be overridden",
        id="header-override-content-type",
    ),
    pytest.param(
        minimal(headers={"BCC": "x@example.org"}),
        "/headers/BCC",
        "cannot be overridden",
        id="header-override-bcc",
    ),
    pytest.param(
        minimal(attachments=[{"filename": "a.bin", "content": "", "content_type": "pdf"}]),
        "/attachments/0/content_type",
        "media type",
        id="bad-content-type",
    ),
    pytest.param(minimal(tags=["a,b"]), "/tags/0", "commas", id="comma-in-tag"),
    pytest.param(minimal(to="bob@example.net"), "/to", "must be an array", id="to-not-array"),
    pytest.param(minimal(text=5), "/text", "must be a string", id="text-not-string"),
]


@pytest.mark.parametrize(("body", "field", "words"), INVALID)
async def test_invalid_message_is_refused_naming_the_field(
    running_daemon: Callable[..., Any],
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    field: str,
    words: str,
) -> None:
    """400 with a detail whose JSON pointer names the faulty field; nothing is queued."""
    daemon = await running_daemon()
    status, answer, _ = await post(http, daemon, body)
    assert status == 400
    assert answer["error"] == "invalid message"
    assert any(d["field"] == field and words in d["message"] for d in answer["details"]), answer
    assert await queued(daemon) == 0


async def test_every_fault_is_reported_at_once(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """One response lists each failing field, from the schema and from the later checks alike."""
    daemon = await running_daemon()
    body = minimal(
        to=["bob@example.net", "nope", 7],
        subject="a\nb",
        extra=True,
        headers={"Subject": "x"},
        attachments=[{"filename": "a", "content": "%%%"}],
    )
    _, answer, _ = await post(http, daemon, body)
    fields = [d["field"] for d in answer["details"]]
    assert fields == [
        "/attachments/0/content",
        "/extra",
        "/headers/Subject",
        "/subject",
        "/to/1",
        "/to/2",
    ]


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"{not json", "body is not valid JSON"),
        (b"\xff\xfe", "body is not valid JSON"),
        (b"", "body is not valid JSON"),
        (b"[" * 100_000, "body is nested too deeply"),
        (b'["a"]', "body must be a JSON object"),
        (b'"text"', "body must be a JSON object"),
    ],
)
async def test_body_that_is_not_a_json_object_is_refused(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession, data: bytes, error: str
) -> None:
    """400 with the whole body ("" pointer) as the field."""
    daemon = await running_daemon()
    status, answer, _ = await post(http, daemon, data)
    assert status == 400
    assert answer["error"] == error
    assert [d["field"] for d in answer["details"]] == [""]


# -- refused: 401, 413, 503 --------------------------------------------------------------------


async def test_bearer_token_is_required_when_configured(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """No or a wrong token: 401 with a Bearer challenge; the right one: 202."""
    daemon = await running_daemon(http={"api_tokens": ["s3cret-one", "s3cret-two"]})

    status, answer, headers = await post(http, daemon, minimal())
    assert (status, answer) == (401, {"error": "missing or invalid bearer token"})
    assert headers["WWW-Authenticate"] == 'Bearer realm="ratatoskr"'

    for wrong in ("Bearer s3cret", "Bearer s3cret-one2", "Basic s3cret-one", "s3cret-one"):
        status, _, headers = await post(http, daemon, minimal(), headers={"Authorization": wrong})
        assert status == 401, wrong
        assert headers["WWW-Authenticate"].startswith("Bearer ")

    for good in ("Bearer s3cret-two", "bearer s3cret-one"):
        status, _, _ = await post(http, daemon, minimal(), headers={"Authorization": good})
        assert status == 202, good
    # Counted at acceptance: the queue itself may already have delivered them.
    received = daemon.metrics.registry.get_sample_value(
        "ratatoskr_messages_received_total", {"ingress": "http"}
    )
    assert received == 2


async def test_unauthorized_request_is_refused_before_its_body_is_judged(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Without a token even garbage gets 401, not 400: nothing about the API leaks."""
    daemon = await running_daemon(http={"api_tokens": ["s3cret"]})
    status, _, _ = await post(http, daemon, b"{garbage")
    assert status == 401


async def test_operational_routes_stay_open_when_tokens_are_set(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Scrapers and probes need no token."""
    daemon = await running_daemon(http={"api_tokens": ["s3cret"]})
    for path in ("/metrics", "/healthz", "/readyz", "/v1/schema", "/v1/openapi.json"):
        async with http.get(url(daemon, path)) as response:
            assert response.status == 200, path


async def test_body_over_the_limit_is_413(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A declared Content-Length over max_body_size is refused with a JSON error."""
    daemon = await running_daemon(http={"max_body_size": 4096})
    status, answer, _ = await post(http, daemon, minimal(text="x" * 5000))
    assert status == 413
    assert answer == {"error": "request body exceeds 4096 bytes"}
    assert await queued(daemon) == 0


async def test_chunked_body_over_the_limit_is_413(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """Without a Content-Length the cap still holds while reading."""
    daemon = await running_daemon(http={"max_body_size": 4096})
    payload = json.dumps(minimal(text="x" * 5000)).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    async with http.post(url(daemon, "/v1/messages"), data=chunks()) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "request body exceeds 4096 bytes"


async def test_composed_message_over_the_size_limit_is_413(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """The body fits but the message it makes is over smtp.max_message_size (base64 grows)."""
    daemon = await running_daemon(smtp={"max_message_size": 10_000})
    content = base64.b64encode(bytes(9_000)).decode()  # 12 kB of base64, more with MIME line breaks
    body = minimal(attachments=[{"filename": "zeros.bin", "content": content}])
    status, answer, _ = await post(http, daemon, body)
    assert status == 413
    assert "over the limit of 10000" in answer["error"]
    assert await queued(daemon) == 0


async def test_queue_unavailable_is_503(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A closed queue cannot commit: 503 with a JSON error, never 202."""
    daemon = await running_daemon()
    await daemon.spool.close()
    status, answer, _ = await post(http, daemon, minimal())
    assert status == 503
    assert answer == {"error": "queue unavailable, try again later"}


# -- documents ---------------------------------------------------------------------------------


async def test_schema_is_served_and_accepts_the_interface_example(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """GET /v1/schema is the packaged file, a valid 2020-12 schema that takes the documented
    example and refuses an unknown field."""
    daemon = await running_daemon()
    async with http.get(url(daemon, "/v1/schema")) as response:
        assert response.content_type == "application/schema+json"
        served = await response.json(content_type=None)
    assert served == schema.schema()
    Draft202012Validator.check_schema(served)
    validator = Draft202012Validator(served)
    for example in served["examples"]:
        assert not list(validator.iter_errors(example))
        schema.parse(json.dumps(example).encode())
    assert list(validator.iter_errors({**served["examples"][0], "extra": 1}))


async def test_openapi_document_describes_the_api(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """OpenAPI 3.1 with every route; its references resolve; its Message schema is ours."""
    daemon = await running_daemon(http={"api_tokens": ["s3cret"]})
    async with http.get(url(daemon, "/v1/openapi.json")) as response:
        document = await response.json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/v1/messages",
        "/v1/messages/{id}",
        "/v1/events/{provider}",
        "/v1/schema",
        "/v1/openapi.json",
        "/metrics",
        "/healthz",
        "/readyz",
        "/readyz/accept",
    }
    send = document["paths"]["/v1/messages"]["post"]
    assert set(send["responses"]) == {"202", "400", "401", "413", "503"}
    assert send["security"] == [{"bearerAuth": []}]

    registry = Registry().with_resource("urn:openapi", Resource.opaque(document))
    resolver = registry.resolver(base_uri="urn:openapi")
    for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(document)):
        resolver.lookup(f"urn:openapi{ref}")  # raises if it points nowhere
    message = Draft202012Validator({"$ref": "urn:openapi#/components/schemas/Message"}, registry=registry)
    assert not list(message.iter_errors(schema.schema()["examples"][0]))
    assert list(message.iter_errors({"from": "a@example.com"}))


async def test_openapi_omits_security_without_tokens(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """The document says what this daemon does: no tokens configured, no 401."""
    daemon = await running_daemon()
    async with http.get(url(daemon, "/v1/openapi.json")) as response:
        send = (await response.json())["paths"]["/v1/messages"]["post"]
    assert "security" not in send and "401" not in send["responses"]


def test_curl_examples_in_the_docs_are_valid_messages() -> None:
    """Every JSON body in docs/http-api.md passes the full check, except the one shown failing."""
    text = (DOCS / "http-api.md").read_text()
    bodies = re.findall(r"-d '(\{.*?\})'", text, flags=re.DOTALL)
    assert len(bodies) >= 3
    failing = [b for b in bodies if '"subject": "Hi\\r\\n' in b]
    assert len(failing) == 1
    for body in bodies:
        if body in failing:
            with pytest.raises(schema.InvalidMessage):
                schema.parse(body.encode())
        else:
            schema.parse(body.encode())


async def test_too_many_recipients_is_400_like_smtp_452(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """The HTTP API keeps smtp.max_recipients too, counting to, cc and bcc together."""
    daemon = await running_daemon(smtp={"max_recipients": 2})
    body = minimal(to=["a@example.net"], cc=["b@example.net"], bcc=["c@example.net"])
    status, answer, _ = await post(http, daemon, body)
    assert status == 400
    assert answer["error"] == "too many recipients"
    assert {d["field"] for d in answer["details"]} == {"/to", "/cc", "/bcc"}
    status, _, _ = await post(http, daemon, minimal(to=["a@example.net"], bcc=["c@example.net"]))
    assert status == 202


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x85"])
async def test_every_unicode_line_break_in_a_header_is_a_400(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession, separator: str
) -> None:
    """Python's email package splits headers on these too: header injection, not a 500."""
    daemon = await running_daemon()
    status, answer, _ = await post(http, daemon, minimal(subject=f"a{separator}Bcc: x@example.org"))
    assert status == 400
    assert [d["field"] for d in answer["details"]] == ["/subject"]


async def test_a_header_value_has_a_length_limit(
    running_daemon: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    """A 6 MB subject is refused by the schema before the email package spends seconds on it."""
    import io

    daemon = await running_daemon()
    body = io.BytesIO(json.dumps(minimal(subject="x" * 6_000_000)).encode())
    async with http.post(url(daemon, "/v1/messages"), data=body) as response:
        assert response.status == 400
        answer = await response.json()
    assert answer["details"] == [{"field": "/subject", "message": "must be at most 16384 characters"}]
