"""Cluster-mode benchmark: one SQLite node vs one PostgreSQL node vs two PostgreSQL nodes.

Each configuration runs real ``ratatoskr serve`` processes delivering to the lean fake Mailgun
(``bench/fake_mailgun.py``) and is loaded by ``bench/loadgen.py`` (20 sessions in all, reused
connections; with two nodes the sessions are split between them, one load generator per node,
started together). For 2 KB and 100 KB messages it prints accepted msgs/s (acknowledged / the
load's wall time), delivered msgs/s (until the fake has them all), p50/p99 of end of DATA →
reply, and the nodes' CPU seconds per message. PostgreSQL is the local server
(``--dsn``); each run gets a throwaway database.

    .venv/bin/python bench/cluster.py [--messages 1500] [--dsn postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import free_port, write_config  # noqa: E402
from run import cpu_seconds, wait_listening  # noqa: E402


def fake_provider(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fake_mailgun.py"), "--port", str(port)], cwd=workdir
    )
    wait_listening(port, proc)
    return proc, port


def delivered(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats") as r:
        return int(json.load(r)["messages"])


def node(workdir: Path, i: int, provider_port: int, url: str | None) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    spool: dict[str, object] = {"path": str(workdir / f"var{i}")}
    if url:
        spool["url"] = url
    config = write_config(
        workdir / f"node{i}.toml",
        {
            "smtp": {
                "listen": f"127.0.0.1:{port}",
                "hostname": "bench.test",
                "max_connections": 5000,
                "max_connections_per_client": 5000,
            },
            "http": {"listen": f"127.0.0.1:{free_port()}"},
            "spool": spool,
            "delivery": {"workers": 32},
            "log": {"level": "warning"},
        },
        [
            {
                "name": "mailgun",
                "kind": "mailgun",
                "api_key": "bench-key",
                "domain": "mg.example.com",
                "base_url": f"http://127.0.0.1:{provider_port}",
            }
        ],
    )
    log = open(workdir / f"node{i}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ratatoskr", "serve", "--config", str(config)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    wait_listening(port, proc, timeout=60)
    return proc, port


def run(label: str, nodes: int, url: str | None, size: int, messages: int) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        provider, provider_port = fake_provider(workdir)
        procs = [node(workdir, i, provider_port, url) for i in range(nodes)]
        try:
            cpu0 = sum(cpu_seconds(p.pid) for p, _ in procs)
            start = time.monotonic()
            loads = [
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "bench" / "loadgen.py"),
                        "--port",
                        str(port),
                        "--sessions",
                        str(20 // nodes),
                        "--messages",
                        str(messages // nodes),
                        "--size",
                        str(size),
                        "--persistent",
                    ],
                    stdout=subprocess.PIPE,
                )
                for _, port in procs
            ]
            results = [json.loads(load.communicate()[0]) for load in loads]
            accepted_wall = time.monotonic() - start
            ok = sum(r["ok"] for r in results)
            deadline = time.monotonic() + 300
            while delivered(provider_port) < ok and time.monotonic() < deadline:
                time.sleep(0.05)
            end_to_end = time.monotonic() - start
            cpu = sum(cpu_seconds(p.pid) for p, _ in procs) - cpu0
            latencies = sorted(x for r in results for x in r["latencies"])
            return {
                "config": label,
                "size": f"{size // 1024} KB",
                "accepted/s": ok / accepted_wall,
                "delivered/s": delivered(provider_port) / end_to_end,
                "p50 ms": 1000 * statistics.median(latencies),
                "p99 ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
                "cpu ms/msg": 1000 * cpu / max(ok, 1),
                "refused": sum(r["refused"] for r in results),
            }
        finally:
            for p, _ in procs:
                p.terminate()
                p.wait(60)
            provider.terminate()
            provider.wait(10)


async def fresh_database(dsn: str) -> str:
    name = f"ratatoskr_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dsn)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return name


async def drop_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    rows = []
    for size in (2048, 100 * 1024):
        count = args.messages if size < 10_000 else max(200, args.messages // 4)
        rows.append(run("sqlite, 1 node", 1, None, size, count))
        for nodes in (1, 2):
            name = asyncio.run(fresh_database(args.dsn))
            try:
                url = args.dsn.rsplit("/", 1)[0] + "/" + name
                rows.append(run(f"postgres, {nodes} node{'s' if nodes > 1 else ''}", nodes, url, size, count))
            finally:
                asyncio.run(drop_database(args.dsn, name))
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()))


if __name__ == "__main__":
    main()
