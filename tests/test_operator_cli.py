"""Issue 14 from the shell: every test runs the installed ``ratatoskr`` command as a subprocess,
against a real daemon where there is a queue to look at."""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from ratatoskr.auth import verify_password
from tests.process import DaemonProcess, free_port, write_config

RATATOSKR = str(Path(sys.executable).parent / "ratatoskr")
ROOT = Path(__file__).parent.parent
MESSAGE = b"From: ada@example.com\r\nTo: bob@example.net\r\nSubject: queued\r\n\r\nbody\r\n"
REASON_WORDS = "cannot write to"


def run(*args: str, cwd: Path | None = None, stdin: str | None = None, env: dict[str, str] | None = None):
    environment = {k: v for k, v in os.environ.items() if k != "RATATOSKR_CFG"}
    return subprocess.run(
        [RATATOSKR, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**environment, **(env or {})},
    )


def wait_for(check, what: str, attempts: int = 300):
    for _ in range(attempts):
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Relay:
    """A daemon whose only provider cannot write (its circuit opens at the first failure and
    stays open): what it took stays in the queue for the queue commands to show."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        blocked = folder / "blocked"
        blocked.write_text("a file where the outbox folder should be")
        self.port = free_port()
        self.spool = folder / "var"
        self.config = write_config(
            folder / "relay.toml",
            {
                "smtp": {"listen": f"127.0.0.1:{self.port}"},
                "http": {"listen": f"127.0.0.1:{free_port()}"},
                "spool": {"path": str(self.spool)},
                "delivery": {"retry_initial": 600, "retry_max": 600},
            },
            [
                {
                    "name": "local",
                    "kind": "outbox",
                    "path": str(blocked),
                    "circuit_failures": 1,
                    "circuit_cooldown": 3000,
                }
            ],
        )
        self.daemon = DaemonProcess(self.config, self.port)

    def send(self, sender: str, recipients: list[str], subject: str = "queued") -> str:
        raw = MESSAGE.replace(b"Subject: queued", f"Subject: {subject}".encode())
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.ehlo("test.client")
            client.mail(sender)
            for r in recipients:
                client.rcpt(r)
            code, reply = client.data(raw)
        assert code == 250
        return reply.decode().rsplit(" ", 1)[-1]


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    relay = Relay(tmp_path_factory.mktemp("relay"))
    relay.daemon.start()
    try:
        relay.first = relay.send("ada@example.com", ["bob@example.net", "hidden@example.org"])  # type: ignore[attr-defined]
        wait_for(
            lambda: "deferred" in run("queue", "list", "--config", str(relay.config)).stdout,
            "the first message to be deferred",
        )
        relay.second = relay.send(  # type: ignore[attr-defined]
            "carol@example.org", [f"r{i}@example.net" for i in range(5)], subject="second"
        )
        yield relay
    finally:
        relay.daemon.stop_quietly()


def listing(relay: Relay, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run("queue", "list", "--config", str(relay.config), *extra)
    assert result.returncode == 0, result.stderr
    return result


# -- queue output ----------------------------------------------------------------------------------


def test_queue_list_is_a_table_with_a_header_local_times_and_whole_reasons(relay: Relay):
    lines = listing(relay).stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "STATE", "SIZE", "ARRIVED", "NEXT"]
    first = next(i for i, line in enumerate(lines) if line.startswith(relay.first))
    row = lines[first]
    assert re.search(r"\bdeferred\b", row)
    arrived = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row)
    assert arrived is not None
    arrival = datetime.strptime(arrived.group(), "%Y-%m-%d %H:%M:%S")
    assert abs(arrival.timestamp() - time.time()) < 600  # local time, not UTC
    assert "<ada@example.com> -> bob@example.net, hidden@example.org" in row
    # Held: every circuit is open, and the row says so instead of a time long past.
    assert "held (circuit open)" in row
    reasons = []
    for line in lines[first + 1 :]:
        if not line.startswith("    "):
            break
        reasons.append(line.strip())
    text = " ".join(reasons)
    assert "held: every provider's circuit is open" in text
    assert REASON_WORDS in text  # the provider's reason, whole
    assert all(len(line) <= 100 for line in lines[first + 1 : first + 1 + len(reasons)])
    second = next(line for line in lines if line.startswith(relay.second))
    assert "r0@example.net, r1@example.net, r2@example.net, +2 more" in second
    assert lines[-1].startswith("-- 2 messages, ")


def test_queue_list_json_is_one_object_per_line_with_rfc3339_times(relay: Relay):
    lines = listing(relay, "--json").stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert [o["id"] for o in objects] == [relay.first, relay.second]
    first = objects[0]
    for key in (
        "id",
        "state",
        "size",
        "created_at",
        "next_attempt_at",
        "sender",
        "recipients",
        "attempts",
        "last_error",
    ):
        assert key in first
    assert first["state"] == "deferred" and first["attempts"] == 1 and first["size"] > len(MESSAGE)
    assert first["recipients"] == ["bob@example.net", "hidden@example.org"]
    assert REASON_WORDS in first["last_error"]
    assert first["held"].startswith("held: every provider's circuit is open")
    for key in ("created_at", "next_attempt_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first[key])
        datetime.fromisoformat(first[key])


def test_queue_list_filters(relay: Relay):
    def ids(*extra: str) -> list[str]:
        return [json.loads(line)["id"] for line in listing(relay, "--json", *extra).stdout.splitlines()]

    assert ids("--state", "deferred") == [relay.first]
    assert ids("--state", "queued") == [relay.second]
    assert ids("--state", "dead") == []
    assert ids("--sender", "CAROL@example.org") == [relay.second]
    assert ids("--recipient", "hidden@example.org") == [relay.first]
    assert ids("--recipient", "@example.net") == [relay.first, relay.second]
    assert ids("--sender", "ada@example.com", "--state", "queued") == []
    bad = run("queue", "list", "--state", "sent", "--config", str(relay.config))
    assert bad.returncode == 2
    table = listing(relay, "--state", "queued").stdout.splitlines()
    assert table[-1].startswith("-- 1 message, ") and ": 1 queued" in table[-1]


def test_queue_show_table_and_json(relay: Relay):
    shown = run("queue", "show", relay.first, "--config", str(relay.config))
    assert shown.returncode == 0
    assert shown.stdout.startswith(relay.first)
    assert "attempt " in shown.stdout and "local: temporary" in shown.stdout
    assert "Subject: queued" in shown.stdout
    data = json.loads(run("queue", "show", relay.first, "--json", "--config", str(relay.config)).stdout)
    assert data["history"][0]["provider"] == "local"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT.*Z", data["history"][0]["at"])


def test_retry_says_one_message_and_that_the_circuit_holds_it(relay: Relay):
    one = run("queue", "retry", relay.first, "--config", str(relay.config))
    assert one.returncode == 0
    assert one.stdout.startswith("1 message due now; every provider's circuit is open")
    assert "next trial" in one.stdout
    every = run("queue", "retry", "--all", "--config", str(relay.config))
    assert every.stdout.startswith("2 messages due now; ")


# -- queue commands need only [spool] and never create a queue ----------------------------------


def test_queue_commands_ignore_unset_env_outside_spool(relay: Relay, tmp_path: Path):
    """The README's systemd set-up: key files under ${CREDENTIALS_DIRECTORY}, unset in a shell."""
    config = tmp_path / "production.toml"
    config.write_text(
        f"""
[smtp]
listen = "127.0.0.1:{free_port()}"
hostname = "${{RELAY_HOSTNAME}}"

[spool]
path = "{relay.spool}"

[[providers]]
name = "mailgun"
kind = "mailgun"
api_key_file = "${{CREDENTIALS_DIRECTORY}}/mailgun"
domain = "mg.example.com"
"""
    )
    env = {"CREDENTIALS_DIRECTORY": "", "RELAY_HOSTNAME": ""}
    unset = {k: v for k, v in os.environ.items() if k not in env}
    result = subprocess.run(
        [RATATOSKR, "queue", "list", "--json", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=unset,
    )
    assert result.returncode == 0, result.stderr
    assert relay.first in result.stdout
    shown = subprocess.run(
        [RATATOSKR, "queue", "show", relay.first, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=unset,
    )
    assert shown.returncode == 0
    # check needs everything it checks: exit 2 naming the key, and it says queue would work.
    check = subprocess.run(
        [RATATOSKR, "check", "--config", str(config)], capture_output=True, text=True, timeout=60, env=unset
    )
    assert check.returncode == 2
    assert "smtp.hostname: environment variable RELAY_HOSTNAME is not set" in check.stderr
    assert "`ratatoskr queue ...` needs only [spool]" in check.stderr
    # An unset ${ENV} in [spool] itself is still an error: the command needs it.
    config.write_text('[spool]\npath = "${NO_SUCH_SPOOL_VAR}"\n')
    bad = run("queue", "list", "--config", str(config))
    assert bad.returncode == 2 and "spool.path" in bad.stderr


def test_queue_commands_never_create_a_queue(tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (("list",), ("show", "X"), ("retry", "--all"), ("delete", "X")):
        result = run("queue", *args, cwd=elsewhere)  # the development defaults: ./var
        assert result.returncode == 1, (args, result.stdout)
        assert f"no queue at var (that is {elsewhere / 'var'})" in result.stderr
    assert list(elsewhere.iterdir()) == []
    config = write_config(tmp_path / "c.toml", {"spool": {"path": str(tmp_path / "nowhere")}}, [])
    result = run("queue", "list", "--config", str(config))
    assert result.returncode == 1 and str(tmp_path / "nowhere") in result.stderr
    assert not (tmp_path / "nowhere").exists()


# -- hash-password, serve's listeners, config checks, make run ------------------------------------


def test_hash_password_with_a_user_prints_the_line_to_paste(tmp_path: Path):
    result = run("hash-password", "app", stdin="s3cret\n")
    assert result.returncode == 0
    line = result.stdout.strip()
    assert line.startswith('app = "scrypt$') and line.endswith('"')
    config = tmp_path / "users.toml"
    config.write_text(f'[smtp.users]\n{line}\n[spool]\npath = "{tmp_path / "var"}"\n')
    import tomllib

    assert verify_password("s3cret", tomllib.loads(config.read_text())["smtp"]["users"]["app"])
    assert run("check", "--config", str(config)).returncode == 0
    odd = run("hash-password", "ops team", stdin="pw").stdout.strip()
    assert odd.startswith('"ops team" = "scrypt$')
    bare = run("hash-password", stdin="pw").stdout.strip()
    assert bare.startswith("scrypt$")  # the interface: without a user, the hash alone


def _serve(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RATATOSKR_")}
    return subprocess.Popen(
        [RATATOSKR, "serve", *args],
        cwd=cwd,
        env={**environment, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def _answers_smtp(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=2) as client:
            return client.noop()[0] == 250
    except OSError:
        return False


def test_serve_listen_options_and_environment(tmp_path: Path):
    smtp, http = free_port(), free_port()
    proc = _serve(["--smtp-listen", f"127.0.0.1:{smtp}", "--http-listen", f"127.0.0.1:{http}"], tmp_path)
    try:
        wait_for(lambda: _answers_smtp(smtp) or proc.poll() is not None, "the SMTP listener")
        assert proc.poll() is None
    finally:
        _stop(proc)
    smtp, http = free_port(), free_port()
    env = {"RATATOSKR_SMTP_LISTEN": f"127.0.0.1:{smtp}", "RATATOSKR_HTTP_LISTEN": f"127.0.0.1:{http}"}
    proc = _serve([], tmp_path, env)
    try:
        wait_for(lambda: _answers_smtp(smtp) or proc.poll() is not None, "the SMTP listener")
        assert proc.poll() is None
    finally:
        _stop(proc)
    # The config's checks apply: a public address without auth would be an open relay.
    refused = _serve(["--smtp-listen", f"0.0.0.0:{free_port()}"], tmp_path)
    _, err = refused.communicate(timeout=30)
    assert refused.returncode == 2 and b"non-loopback listener 0.0.0.0:" in err
    bad = _serve(["--http-listen", "nonsense"], tmp_path)
    _, err = bad.communicate(timeout=30)
    assert bad.returncode == 2 and b"--http-listen: expected host:port" in err


@pytest.mark.parametrize(
    ("provider", "key"),
    [
        ('name = "o"\nkind = "outbox"\ncircuit_failures = -3', "providers[0].circuit_failures"),
        ('name = "o"\nkind = "outbox"\ncircuit_cooldown = -1', "providers[0].circuit_cooldown"),
        ('name = "o"\nkind = "outbox"\ncircuit_failures = 0', "providers[0].circuit_failures"),
        ('name = "m"\nkind = "mandrill"\napi_key = "k"\ndomain = "x"', "providers[0].domain: unknown key"),
        ('name = "o"\nkind = "outbox"\nmax_messages = -1', "providers[0].max_messages"),
    ],
)
def test_check_refuses_bad_provider_keys(tmp_path: Path, provider: str, key: str):
    config = tmp_path / "c.toml"
    config.write_text(f"[[providers]]\n{provider}\n")
    result = run("check", "--config", str(config))
    assert result.returncode == 2
    assert key in result.stderr


def test_make_run_installs_only_the_runtime_dependencies(tmp_path: Path):
    """`make -n` prints what `make run` would do on a fresh machine, without doing it."""
    venv = tmp_path / "fresh-venv"
    run_plan = subprocess.run(
        ["make", "-n", "run", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run_plan.returncode == 0, run_plan.stderr
    assert "pip install --quiet -e ." in run_plan.stdout
    assert "[test]" not in run_plan.stdout
    test_plan = subprocess.run(
        ["make", "-n", "test", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "-e '.[test]'" in test_plan.stdout
