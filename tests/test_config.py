"""Configuration: every invalid value is refused with the key named; secrets never shown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ratatoskr import config
from ratatoskr.errors import ConfigError


def parse(**data):
    return config.parse(data)


def test_defaults_are_the_development_setup():
    """No config at all: loopback listeners, ./var, one outbox provider."""
    cfg = config.load(None)
    assert str(cfg.smtp.listen) == "127.0.0.1:2525"
    assert str(cfg.http.listen) == "127.0.0.1:8025"
    assert cfg.spool.path == Path("./var")
    assert [(p.name, p.kind, p.path) for p in cfg.providers] == [("outbox", "outbox", Path("./outbox"))]
    assert cfg.smtp.require_auth is False


def test_full_example_file_parses(monkeypatch):
    """config.toml.example is a working config."""
    example = Path(__file__).parent.parent / "config.toml.example"
    cfg = config.load(example)
    assert cfg.providers[0].kind == "outbox"


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        (
            {"providers": [{"kind": "sendgird"}]},
            "providers[0].kind",
            "unknown kind 'sendgird'"
            " (expected mailgun, mandrill, outbox, postmark, resend, sendgrid, ses, sparkpost)",
        ),
        ({"providers": [{"name": "x"}]}, "providers[0].kind", "missing"),
        ({"providers": [{"kind": "mailgun", "domain": "mg.example.com"}]}, "providers[0].api_key", "missing"),
        ({"providers": [{"kind": "mailgun", "api_key": "k"}]}, "providers[0].domain", "missing"),
        (
            {"providers": [{"kind": "mailgun", "api_key": "k", "domain": "a/b"}]},
            "providers[0].domain",
            "not a domain",
        ),
        (
            {"providers": [{"kind": "mandrill", "api_key": "k", "base_url": "ftp://x"}]},
            "providers[0].base_url",
            "http(s) URL",
        ),
        ({"providers": [{"kind": "outbox"}, {"kind": "outbox"}]}, "providers[1].name", "duplicate"),
        ({"providers": [{"kind": "outbox", "timeout": -1}]}, "providers[0].timeout", "greater than 0"),
        ({"providers": [{"kind": "outbox", "colour": "red"}]}, "providers[0].colour", "unknown key"),
        # Each kind reads only its own keys: a Mailgun key on a Mandrill provider is refused.
        (
            {"providers": [{"kind": "mandrill", "api_key": "k", "domain": "x"}]},
            "providers[0].domain",
            "unknown key",
        ),
        ({"providers": [{"kind": "outbox", "api_key": "k"}]}, "providers[0].api_key", "unknown key"),
        (
            {"providers": [{"kind": "mandrill", "api_key": "k", "webhook_key": "w"}]},
            "providers[0].webhook_url",
            "exactly as registered",
        ),
        (
            {"providers": [{"kind": "mailgun", "api_key": "k", "domain": "mg.x", "webhook_max_age": 0}]},
            "providers[0].webhook_max_age",
            "greater than 0",
        ),
        (
            {"providers": [{"kind": "outbox", "circuit_failures": 0}]},
            "providers[0].circuit_failures",
            "greater than 0",
        ),
        (
            {"providers": [{"kind": "outbox", "circuit_cooldown": -1}]},
            "providers[0].circuit_cooldown",
            "greater than 0",
        ),
        ({"providers": []}, "providers", "non-empty"),
        ({"smtp": {"listen": "nonsense"}}, "smtp.listen", "host:port"),
        ({"smtp": {"listen": "127.0.0.1:99999"}}, "smtp.listen", "out of range"),
        ({"smtp": {"max_message_size": "big"}}, "smtp.max_message_size", "must be an int"),
        ({"smtp": {"max_recipients": 0}}, "smtp.max_recipients", "greater than 0"),
        ({"smtp": {"require_auth": "yes"}}, "smtp.require_auth", "must be a bool"),
        ({"smtp": {"tls_cert": "/nonexistent.crt"}}, "smtp.tls_key", "together"),
        ({"smtp": {"users": {"app": "plaintext"}}}, "smtp.users.app", "hash-password"),
        ({"smtp": {"bogus": 1}}, "smtp.bogus", "unknown key"),
        ({"http": {"api_tokens": "abc"}}, "http.api_tokens", "must be a list"),
        ({"http": {"api_tokens": [""]}}, "http.api_tokens[0]", "non-empty"),
        ({"delivery": {"max_queue_lifetime": 0}}, "delivery.max_queue_lifetime", "greater than 0"),
        ({"delivery": {"retry_initial": 100, "retry_max": 10}}, "delivery.retry_max", "retry_initial"),
        ({"log": {"format": "xml"}}, "log.format", "unknown format"),
        ({"spool": {"path": 3}}, "spool.path", "must be a str"),
        ({"surprise": {}}, "surprise", "unknown key"),
    ],
)
def test_invalid_values_name_their_key(data, key, problem):
    with pytest.raises(ConfigError) as info:
        config.parse(data)
    assert info.value.key == key
    assert problem in info.value.problem


def test_non_loopback_listener_without_auth_is_an_open_relay():
    with pytest.raises(ConfigError) as info:
        parse(smtp={"listen": "0.0.0.0:25", "require_auth": False})
    assert info.value.key == "smtp.require_auth"
    assert "open relay" in info.value.problem


def test_non_loopback_listener_needs_users_and_tls(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse(smtp={"listen": "0.0.0.0:25"})
    assert info.value.key == "smtp.users"
    with pytest.raises(ConfigError) as info:
        parse(smtp={"listen": "[::]:587", "users": {"app": "scrypt$1$1$1$a$b"}})
    assert info.value.key == "smtp.tls_cert"


def test_non_loopback_http_needs_api_tokens():
    with pytest.raises(ConfigError) as info:
        parse(http={"listen": "0.0.0.0:8025"})
    assert info.value.key == "http.api_tokens"
    assert "open relay" in info.value.problem
    assert parse(http={"listen": "0.0.0.0:8025", "api_tokens": ["t0ken-123"]}).http.api_tokens


def test_ipv6_listen_parses():
    cfg = parse(smtp={"listen": "[::1]:2526"})
    assert (cfg.smtp.listen.host, cfg.smtp.listen.port) == ("::1", 2526)
    assert cfg.smtp.listen.is_loopback


def test_env_expansion_and_key_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MG_KEY", "key-from-env")
    key_file = tmp_path / "mandrill.key"
    key_file.write_text("key-from-file\n")
    cfg = parse(
        providers=[
            {"kind": "mailgun", "api_key": "${MG_KEY}", "domain": "mg.example.com"},
            {"kind": "mandrill", "api_key_file": str(key_file)},
        ]
    )
    assert cfg.providers[0].api_key.reveal() == "key-from-env"
    assert cfg.providers[1].api_key.reveal() == "key-from-file"
    assert "key-from" not in repr(cfg)


def test_missing_env_var_is_named_not_shown(monkeypatch):
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(ConfigError) as info:
        parse(providers=[{"kind": "mandrill", "api_key": "${NOPE_KEY}"}])
    assert str(info.value) == "providers[0].api_key: environment variable NOPE_KEY is not set"


def test_secret_values_never_appear_in_errors():
    with pytest.raises(ConfigError) as info:
        parse(providers=[{"kind": "mandrill", "api_key": 12345678}])
    assert "12345678" not in str(info.value)


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    return subprocess.run(
        [sys.executable, "-m", "ratatoskr", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def test_invalid_config_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[[providers]]\nkind = "sendgird"\n')
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ratatoskr: invalid config: providers[0].kind: unknown kind 'sendgird'"
        " (expected mailgun, mandrill, outbox, postmark, resend, sendgrid, ses, sparkpost)"
    ]
    result = run_cli("serve", "--config", str(path))
    assert result.returncode == 2
    assert "providers[0].kind" in result.stderr


def test_config_comes_from_env_var_when_no_flag(tmp_path):
    import os

    path = tmp_path / "c.toml"
    path.write_text('[smtp]\nlisten = "127.0.0.1:2600"\n')
    result = run_cli("check", env={**os.environ, "RATATOSKR_CFG": str(path)})
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:2600" in result.stdout


def test_check_never_prints_secrets(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[http]\napi_tokens = ["tok-SECRET-1"]\n'
        '[[providers]]\nkind = "mailgun"\napi_key = "key-SECRET-2"\ndomain = "mg.example.com"\n'
    )
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "mailgun" in result.stdout
    assert "SECRET" not in result.stdout + result.stderr


def test_unreadable_or_invalid_toml_is_exit_2(tmp_path):
    assert run_cli("check", "--config", str(tmp_path / "missing.toml")).returncode == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp\n")
    result = run_cli("check", "--config", str(bad))
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_numbers_and_booleans_may_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MAXSIZE", "1048576")
    monkeypatch.setenv("BOUNCE", "true")
    monkeypatch.setenv("TIMEOUT", "2.5")
    cfg = parse(
        smtp={"max_message_size": "${MAXSIZE}"},
        delivery={"bounce": "${BOUNCE}"},
        providers=[{"kind": "outbox", "timeout": "${TIMEOUT}"}],
    )
    assert (cfg.smtp.max_message_size, cfg.delivery.bounce, cfg.providers[0].timeout) == (1048576, True, 2.5)
    monkeypatch.setenv("MAXSIZE", "big")
    with pytest.raises(ConfigError) as info:
        parse(smtp={"max_message_size": "${MAXSIZE}"})
    assert info.value.key == "smtp.max_message_size"
    assert "from the environment" in info.value.problem


def test_unloadable_tls_certificate_is_a_config_error(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate")
    key.write_text("not a key")
    with pytest.raises(ConfigError) as info:
        parse(smtp={"tls_cert": str(cert), "tls_key": str(key)})
    assert info.value.key == "smtp.tls_cert"
    assert "cannot load" in info.value.problem


def test_mailgun_probe_key_is_optional_and_secret(tmp_path):
    cfg = parse(
        providers=[
            {
                "kind": "mailgun",
                "api_key": "sending-k",
                "domain": "mg.example.com",
                "probe_api_key": "account-k",
            }
        ]
    )
    assert cfg.providers[0].probe_api_key.reveal() == "account-k"
    assert cfg.providers[0].secrets() == (config.Secret("sending-k"), config.Secret("account-k"))
    assert "account-k" in cfg.secrets() and "account-k" not in repr(cfg)
    assert (
        parse(providers=[{"kind": "mailgun", "api_key": "k", "domain": "mg.example.com"}])
        .providers[0]
        .probe_api_key
        is None
    )


def test_check_describes_each_kind_of_provider(tmp_path):
    """The provider lines of `check`, one per kind, as they have always read."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[[providers]]\nname = "mg"\nkind = "mailgun"\napi_key = "k1"\ndomain = "mg.example.com"\n'
        '[[providers]]\nname = "md"\nkind = "mandrill"\napi_key = "k2"\n'
        '[[providers]]\nkind = "outbox"\n'
    )
    result = run_cli("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stdout.splitlines() if line.startswith("provider ")] == [
        "provider 1: mg (mailgun) https://api.mailgun.net domain=mg.example.com",
        "provider 2: md (mandrill) https://mandrillapp.com/api/1.0 domain=-",
        "provider 3: outbox (outbox) outbox",
    ]


def test_every_module_in_providers_is_a_kind_that_declares_itself():
    """ratatoskr/providers/<kind>.py is the kind: each such module (base and http aside) has
    its settings class. A helper module that is not a kind must be named _<name>.py."""
    from ratatoskr.providers import KINDS, ProviderSettings, settings_class

    assert {"mailgun", "mandrill", "outbox"} <= set(KINDS)
    for kind in KINDS:
        assert settings_class(kind).kind == kind
        assert settings_class(kind).build is not ProviderSettings.build, f"{kind} has no build()"


def test_an_outbox_only_config_never_imports_aiohttp():
    """HTTP providers are imported only when configured: the outbox alone needs no aiohttp."""
    code = (
        "import sys\n"
        "from ratatoskr import config\n"
        "from ratatoskr.providers import build_providers\n"
        "build_providers(config.parse({'providers': [{'kind': 'outbox'}]}).providers)\n"
        "assert 'aiohttp' not in sys.modules, 'aiohttp imported'\n"
        "build_providers(config.parse({'providers': [{'kind': 'mandrill', 'api_key': 'k'}]}).providers)\n"
        "assert 'aiohttp' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
