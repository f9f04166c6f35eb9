"""The daemon's provider circuits, published for ``ratatoskr queue …`` in another process.

Messages wait in the queue while every provider's circuit is open, and nothing in the queue
says so; the daemon therefore writes ``circuits.json`` next to the queue whenever a provider's
state changes (atomically: temporary file, rename) and removes it when it stops. ``queue list``
reads it to say "held: every provider's circuit is open" rather than showing a message due
long ago that nobody sends. The file carries the daemon's pid: one left behind by a daemon
that died is ignored.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "circuits.json"


@dataclass(frozen=True, slots=True)
class ProviderCircuit:
    name: str
    up: bool
    state: str  #: closed, open, half_open, rate_limited
    trial_at: float  #: when an open circuit lets its next trial through
    last_error: str


def publish(folder: Path, circuits: list[ProviderCircuit]) -> None:
    """Write the current states for the queue commands; never raises (it is a courtesy)."""
    document = {
        "pid": os.getpid(),
        "updated_at": time.time(),
        "providers": [
            {"name": c.name, "up": c.up, "state": c.state, "trial_at": c.trial_at, "last_error": c.last_error}
            for c in circuits
        ],
    }
    tmp = folder / f".{FILE_NAME}.tmp"
    try:
        tmp.write_text(json.dumps(document))
        os.replace(tmp, folder / FILE_NAME)
    except OSError:
        pass


def withdraw(folder: Path) -> None:
    """The daemon stops: its circuits no longer hold anything back."""
    try:
        (folder / FILE_NAME).unlink()
    except OSError:
        pass


def read(folder: Path) -> list[ProviderCircuit] | None:
    """The states a running daemon published, or None (no daemon, or an unreadable file)."""
    try:
        document = json.loads((folder / FILE_NAME).read_text())
        if not _alive(int(document["pid"])):
            return None
        return [
            ProviderCircuit(
                name=str(p["name"]),
                up=bool(p["up"]),
                state=str(p["state"]),
                trial_at=float(p["trial_at"]),
                last_error=str(p["last_error"]),
            )
            for p in document["providers"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except PermissionError:
        return True  # it does, under another user (the service's)
    except OSError:
        return False
    return True


def all_open(circuits: list[ProviderCircuit] | None) -> bool:
    """Whether no provider takes traffic: waiting messages are then held until a trial."""
    return bool(circuits) and not any(c.up for c in circuits or ())
