"""Helpers the benchmark scripts share (the test suite uses them too): a free loopback port and
a config file written from plain dicts."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, Any], providers: list[dict[str, Any]]) -> Path:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
        for sub, subtable in ((k, v) for k, v in table.items() if isinstance(v, dict)):
            lines.append(f"[{name}.{sub}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in subtable.items()]
    for provider in providers:
        lines.append("[[providers]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in provider.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
