"""Running ``ratatoskr serve`` as a real subprocess, for crash, signal and CLI tests."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.common import free_port, write_config

__all__ = ["DaemonProcess", "free_port", "write_config"]


class DaemonProcess:
    """``python -m ratatoskr serve --config PATH`` with its stderr captured to a file."""

    def __init__(self, config: Path, smtp_port: int, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.smtp_port = smtp_port
        self.env = {**os.environ, **(env or {})}
        self.log_path = config.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ratatoskr", "serve", "--config", str(self.config)],
            stdout=log,
            stderr=log,
            env=self.env,
            cwd=self.config.parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not listen on {self.smtp_port}: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def send(self, raw: bytes, recipients: list[str] | None = None) -> str:
        """Send one message; return the queue id from the 250 reply."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("ada@example.com")
            for rcpt in recipients or ["bob@example.net"]:
                client.rcpt(rcpt)
            code, reply = client.data(raw)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[1]
