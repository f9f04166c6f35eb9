"""The command line: queue inspection while the daemon runs, hash-password, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ratatoskr.auth import verify_password
from tests.process import DaemonProcess, free_port, write_config

MESSAGE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: queued\r\n\r\nbody\r\n"


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ratatoskr", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hash_password_ignores_one_trailing_newline():
    result = cli("hash-password", stdin="s3cret pass\n")
    assert result.returncode == 0
    hashed = result.stdout.strip()
    assert hashed.startswith("scrypt$")
    assert verify_password("s3cret pass", hashed)
    assert not verify_password("s3cret pass\n", hashed)
    keeps_second = cli("hash-password", stdin="pw\n\n").stdout.strip()
    assert verify_password("pw\n", keeps_second)


def test_usage_errors_exit_2():
    assert cli().returncode == 2
    assert cli("queue").returncode == 2
    assert cli("frobnicate").returncode == 2


def test_queue_commands_work_while_the_daemon_runs(tmp_path: Path):
    """list/show/retry/delete against a live daemon whose only provider is failing."""
    port = free_port()
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    config = write_config(
        tmp_path / "c.toml",
        {
            "smtp": {"listen": f"127.0.0.1:{port}"},
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "spool": {"path": str(tmp_path / "var")},
            "delivery": {"retry_initial": 600},
        },
        [{"name": "local", "kind": "outbox", "path": str(blocked)}],
    )
    daemon = DaemonProcess(config, port).start()
    try:
        qid = daemon.send(MESSAGE, recipients=["bob@example.net", "hidden@example.org"])
        listing = _wait_for(
            lambda: cli("queue", "list", "--config", str(config)), lambda r: "deferred" in r.stdout
        )
        assert qid in listing.stdout

        shown = cli("queue", "show", qid, "--json", "--config", str(config))
        assert shown.returncode == 0
        info = json.loads(shown.stdout)
        assert info["recipients"] == ["bob@example.net", "hidden@example.org"]
        assert info["history"][0]["provider"] == "local"
        assert info["history"][0]["outcome"] == "temporary"
        assert "Subject: queued" in cli("queue", "show", qid, "--config", str(config)).stdout

        missing = cli("queue", "show", "NOPE", "--config", str(config))
        assert missing.returncode == 1 and "NOPE" in missing.stderr

        assert cli("queue", "retry", qid, "--config", str(config)).returncode == 0
        assert cli("queue", "retry", "--all", "--config", str(config)).returncode == 0
        assert cli("queue", "delete", qid, "--config", str(config)).returncode == 0
        assert cli("queue", "delete", qid, "--config", str(config)).returncode == 1
        assert qid not in cli("queue", "list", "--config", str(config)).stdout
        assert daemon.terminate() == 0
        assert "event loop uvloop" in daemon.log()  # a dependency on this platform
    finally:
        daemon.stop_quietly()


def _wait_for(run, ok, attempts: int = 200):
    import time

    for _ in range(attempts):
        result = run()
        if ok(result):
            return result
        time.sleep(0.05)
    raise AssertionError(f"condition never met; last output: {result.stdout} {result.stderr}")
