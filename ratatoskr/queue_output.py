"""What ``ratatoskr queue list/show`` print: a table for people, or JSON lines for programs.

Pure formatting over the queue's :class:`StoredMessage` values, like ``postqueue -p`` and
``postqueue -j``: the table has a header line, sizes in K/M, arrival and next attempt in local
time, and each message's last reason on its own indented lines, wrapped at spaces and never cut;
``--json`` is one object per message per line, times in RFC 3339 (UTC).

Much of what is shown comes from others: a client's subject and headers, a provider's or a
remote server's reasons. Control characters in it are shown as escapes
(:mod:`ratatoskr.printable`).
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from ratatoskr.circuits import ProviderCircuit, all_open
from ratatoskr.history import event_json, recipient_states, sent_attempt
from ratatoskr.message import Envelope
from ratatoskr.printable import json_shown, shown
from ratatoskr.queue import DeliveryEvent

STATES = ("queued", "inflight", "deferred", "dead")
_WAITING = ("queued", "deferred")
_WIDTH = 100
_SHOWN_RECIPIENTS = 3


class Listed(Protocol):
    """The fields of a queued message this module reads (the queue's StoredMessage)."""

    @property
    def id(self) -> str: ...
    @property
    def envelope(self) -> Envelope: ...
    @property
    def meta(self) -> dict[str, Any]: ...
    @property
    def created_at(self) -> float: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def next_attempt_at(self) -> float: ...
    @property
    def attempts(self) -> int: ...
    @property
    def last_error(self) -> str: ...
    @property
    def raw(self) -> bytes: ...


def state_of(m: Listed) -> str:
    state = getattr(m, "state", "")
    return str(getattr(state, "value", state))


def size_of(m: Listed) -> int:
    size = m.meta.get("size") or getattr(m, "size", 0)
    return int(size or len(m.raw))


def matches(m: Listed, *, state: str | None, sender: str | None, recipient: str | None) -> bool:
    """``--state``, ``--sender`` and ``--recipient`` together; an address matches without regard
    to case, and ``@example.com`` matches every address at that domain."""
    if state and state_of(m) != state:
        return False
    if sender is not None and not _address_matches(m.envelope.sender, sender):
        return False
    return recipient is None or any(_address_matches(r, recipient) for r in m.envelope.recipients)


def _address_matches(address: str, wanted: str) -> bool:
    address, wanted = address.lower(), wanted.lower().strip("<>")
    if wanted.startswith("@"):
        return address.endswith(wanted)
    return address == wanted


def held_reason(m: Listed, circuits: list[ProviderCircuit] | None) -> str:
    """Why a waiting message is not being sent although due: every circuit is open."""
    if state_of(m) not in _WAITING or not all_open(circuits):
        return ""
    trial = min(c.trial_at for c in circuits or ())
    return f"held: every provider's circuit is open; next trial {_local(trial)}"


# -- the table -----------------------------------------------------------------------------------


def table(messages: list[Listed], circuits: list[ProviderCircuit] | None, *, now: float) -> list[str]:
    header = (
        f"{'ID':<19}  {'STATE':<8}  {'SIZE':>6}  {'ARRIVED':<19}  {'NEXT ATTEMPT':<19}  SENDER -> RECIPIENTS"
    )
    lines = [header]
    for m in messages:
        lines += _rows(m, held_reason(m, circuits), now=now)
    lines.append(summary(messages))
    return [shown(line) for line in lines]


def _rows(m: Listed, held: str, *, now: float) -> list[str]:
    recipients = m.envelope.recipients
    listed = ", ".join(recipients[:_SHOWN_RECIPIENTS])
    if len(recipients) > _SHOWN_RECIPIENTS:
        listed += f", +{len(recipients) - _SHOWN_RECIPIENTS} more"
    state = state_of(m)
    row = (
        f"{m.id:<19}  {state:<8}  {human_size(size_of(m)):>6}  {_local(m.created_at):<19}  "
        f"{_next_attempt(m, held, now=now):<19}  <{m.envelope.sender}> -> {listed}"
    )
    rows = [row]
    for reason in (held, m.last_error):
        if reason:
            rows += textwrap.wrap(
                f"({reason})",
                width=_WIDTH,
                initial_indent="    ",
                subsequent_indent="     ",
                break_long_words=False,
                break_on_hyphens=False,
            )
    return rows


def _next_attempt(m: Listed, held: str, *, now: float) -> str:
    state = state_of(m)
    if state == "dead":
        return "never (dead)"
    if state == "delivered":
        return "never (delivered)"
    if state == "inflight":
        return "sending now"
    if held:
        return "held (circuit open)"
    if m.next_attempt_at <= now:
        return "now"
    return _local(m.next_attempt_at)


def summary(messages: Iterable[Listed]) -> str:
    """``-- 3 messages, 12K: 1 queued, 2 deferred`` (postqueue's closing line)."""
    listed = list(messages)
    counts = {s: 0 for s in STATES}
    for m in listed:
        counts[state_of(m)] = counts.get(state_of(m), 0) + 1
    total = human_size(sum(size_of(m) for m in listed))
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return f"-- {plural(len(listed), 'message')}, {total}" + (f": {parts}" if parts else "")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_size(size: int) -> str:
    if size < 1024:
        return f"{size}B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f}K" if size < 10 * 1024 else f"{size // 1024}K"
    return f"{size / (1024 * 1024):.1f}M"


def _local(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


# -- JSON ----------------------------------------------------------------------------------------


def rfc3339(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def as_json(
    m: Listed,
    circuits: list[ProviderCircuit] | None,
    *,
    full: bool = False,
    events: Sequence[DeliveryEvent] = (),
) -> dict[str, Any]:
    """One message as ``--json`` prints it; ``full`` (``queue show``) adds its history: the
    attempts, the provider that took it with its message id, and the provider's ``events``."""
    state = state_of(m)
    held = held_reason(m, circuits)
    info: dict[str, Any] = {
        "id": m.id,
        "state": state,
        "size": size_of(m),
        "created_at": rfc3339(m.created_at),
        "next_attempt_at": None if state in ("dead", "delivered") else rfc3339(m.next_attempt_at),
        "expires_at": rfc3339(m.expires_at),
        "sender": m.envelope.sender,
        "recipients": list(m.envelope.recipients),
        "attempts": m.attempts,
        "last_error": m.last_error,
        "held": held or None,
        "message_id": m.meta.get("message_id", ""),
        "subject": m.meta.get("subject", ""),
        "ingress": m.meta.get("ingress", ""),
    }
    if full:
        info["recoveries"] = getattr(m, "recoveries", 0)
        info["history"] = [_attempt(a) for a in getattr(m, "history", ())]
        sent = sent_attempt(getattr(m, "history", ()))
        info["provider"] = sent.provider if sent else None
        info["provider_message_id"] = sent.provider_id if sent else None
        info["events"] = [event_json(e) for e in events]
        info["recipient_states"] = recipient_states(events)
    return info


def _attempt(attempt: Any) -> dict[str, Any]:
    if hasattr(attempt, "as_json"):
        entry = dict(attempt.as_json())
    elif dataclasses.is_dataclass(attempt) and not isinstance(attempt, type):
        entry = dataclasses.asdict(attempt)
    else:
        entry = dict(attempt)
    entry = {k: getattr(v, "value", v) for k, v in entry.items() if v is not None}
    if isinstance(entry.get("at"), int | float):
        entry["at"] = rfc3339(entry["at"])
    return entry


def json_line(
    m: Listed,
    circuits: list[ProviderCircuit] | None,
    *,
    full: bool = False,
    events: Sequence[DeliveryEvent] = (),
) -> str:
    return json_shown(json.dumps(as_json(m, circuits, full=full, events=events), ensure_ascii=False))


# -- one message, for people -----------------------------------------------------------------------


def show(
    m: Listed, circuits: list[ProviderCircuit] | None, *, now: float, events: Sequence[DeliveryEvent] = ()
) -> list[str]:
    """``queue show ID``: the message's row and reason, its details, each attempt, the
    provider's events about it, its head (none once delivered: the body is not kept)."""
    info = as_json(m, circuits, full=True, events=events)
    lines = _rows(m, held_reason(m, circuits), now=now)
    lines += [
        f"  message-id: {info['message_id'] or '-'}",
        f"  subject:    {info['subject'] or '-'}",
        f"  ingress:    {info['ingress'] or '-'}, {plural(m.attempts, 'attempt')}, "
        f"expires {_local(m.expires_at)}",
        f"  recipients: {', '.join(m.envelope.recipients)}",
    ]
    for entry in info["history"]:
        detail = " ".join(str(entry[k]) for k in ("status", "detail") if entry.get(k) not in (None, ""))
        at = entry.get("at") or ""
        lines.append(
            f"  attempt {at} {entry.get('provider', '-')}: {entry.get('outcome', '')} {detail}".rstrip()
        )
    if info["provider_message_id"]:
        lines.append(f"  provider:   {info['provider']}, message id {info['provider_message_id']}")
    if info["recipient_states"]:
        states = ", ".join(f"{r} {s}" for r, s in info["recipient_states"].items())
        lines.append(f"  by events: {states}")
    for event in info["events"]:
        detail = event["detail"]
        why = " ".join(str(detail[k]) for k in ("bounce_class", "reason") if detail.get(k))
        lines.append(
            f"  event {event['at']} {event['provider']}: {event['type']} {event['recipient']} {why}".rstrip()
        )
    head = m.raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    if head:
        lines += ["", *head.split("\r\n")]
    return [shown(line) for line in lines]
