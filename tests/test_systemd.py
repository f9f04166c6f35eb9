"""Running under systemd: the unit file, and the notify protocol spoken by a real daemon process."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratatoskr.sdnotify import Notifier, watchdog_interval
from tests.process import free_port, write_config

UNIT = Path(__file__).parent.parent / "systemd" / "ratatoskr.service"
INSTALLED_AT = "/opt/ratatoskr/bin/ratatoskr"


def unit_settings() -> list[tuple[str, str]]:
    pairs = []
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    """The unit as shipped, except that ExecStart points at this checkout instead of the
    install location README.md uses (verify insists the binary exists)."""
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_AT} ") == 1
    copy = tmp_path / "ratatoskr.service"
    copy.write_text(text.replace(INSTALLED_AT, f"{sys.executable} -m ratatoskr"))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    complaints = [ln for ln in (done.stdout + done.stderr).splitlines() if "ratatoskr" in ln]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_unit_is_notify_type_with_watchdog_and_hardening():
    settings = unit_settings()
    keys = dict(settings)
    assert keys["Type"] == "notify" and keys["NotifyAccess"] == "main"
    assert keys["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert re.fullmatch(r"\d+s", keys["WatchdogSec"])
    assert keys["StateDirectory"] == "ratatoskr"
    assert keys["LoadCredential"].startswith("api-keys:/etc/ratatoskr/")
    assert keys["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert keys["CapabilityBoundingSet"] == keys["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    for hardening in (
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        "MemoryDenyWriteExecute=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "RestrictNamespaces=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "SystemCallFilter=@system-service",
    ):
        assert tuple(hardening.split("=", 1)) in settings, hardening


# -- the notify protocol ---------------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, as a file or in the abstract namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
    else:
        address = f"@ratatoskr-test-{uuid.uuid4().hex}"
        sock.bind("\0" + address[1:])
    sock.settimeout(20)
    try:
        yield sock, address
    finally:
        sock.close()


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_daemon_notifies_ready_watchdog_and_stopping(tmp_path, notify_socket):
    """READY=1 once SMTP accepts connections, WATCHDOG=1 every WATCHDOG_USEC/2, STOPPING=1 on
    SIGTERM, then exit 0."""
    sock, address = notify_socket
    smtp_port = free_port()
    config = write_config(
        tmp_path / "ratatoskr.toml",
        {
            "smtp": {"listen": f"127.0.0.1:{smtp_port}"},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "spool": {"path": str(tmp_path / "var")},
        },
        [{"kind": "outbox", "path": str(tmp_path / "outbox")}],
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_PID", "LISTEN_PID")}
    env |= {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    log = tmp_path / "daemon.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ratatoskr", "serve", "--config", str(config)],
            env=env,
            stderr=stderr,
            cwd=tmp_path,
        )
    try:
        first = receive(sock)
        assert first[0] == "READY=1", first
        assert any(f.startswith("STATUS=smtp 127.0.0.1:") for f in first)
        with socket.create_connection(("127.0.0.1", smtp_port), timeout=5) as client:
            assert client.recv(3) == b"220", "READY=1 came before the listener was up"
        assert receive(sock) == ["WATCHDOG=1"]
        assert receive(sock) == ["WATCHDOG=1"]
        proc.send_signal(signal.SIGTERM)
        while (message := receive(sock)) == ["WATCHDOG=1"]:
            pass
        assert message == ["STOPPING=1"]
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_no_notify_socket_means_silence():
    notifier = Notifier.from_env({})
    assert notifier.address is None
    assert notifier.ready() is False


def test_unreachable_notify_socket_is_not_fatal(tmp_path):
    assert Notifier(str(tmp_path / "nobody-listens")).watchdog() is False


def test_abstract_socket_names_start_with_nul():
    assert Notifier("@systemd/notify").address == "\0systemd/notify"


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(env, interval):
    assert watchdog_interval(env) == interval
