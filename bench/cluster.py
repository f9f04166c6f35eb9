"""Cluster-mode benchmark: one SQLite node vs one PostgreSQL node vs two PostgreSQL nodes.

Each configuration runs real ``ratatoskr serve`` processes delivering to the lean fake Mailgun
(``bench/fake_mailgun.py``) and is loaded by ``bench/loadgen.py`` (20 sessions in all, reused
connections; with two nodes the sessions are split between them, one load generator per node,
started together). For 2 KB and 100 KB messages it prints accepted msgs/s (acknowledged / the
load's wall time), delivered msgs/s (until the fake has them all), p50/p99 of end of DATA →
reply, the nodes' CPU seconds per message and how busy the machine's cores were while the load
ran (every process's, another benchmark's too: near 100 % the figure is bound by the cores).
PostgreSQL is the local server (``--dsn``); each run gets a throwaway database. For PostgreSQL
it adds what the queue costs the server: commits per message and commits/s
(``pg_stat_database.xact_commit`` of the run's database), WAL flushes per message
(``pg_stat_wal.wal_sync``: the whole server's, so another database busy at the same time
inflates it) and the server processes' CPU per message (likewise the whole server's).

    .venv/bin/python bench/cluster.py [--messages 1500] [--only postgres] [--sizes 2048]
        [--dsn postgresql://postgres@127.0.0.1/postgres]
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
    try:
        wait_listening(port, proc, timeout=60)
    except RuntimeError:
        sys.stderr.write((workdir / f"node{i}.log").read_text())
        raise
    return proc, port


def server_cpu_seconds() -> float:
    """CPU of every PostgreSQL server process on this machine (the postmaster's children)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text.split(" ", 2)[1] == "(postgres)":
            total += cpu_seconds(int(stat.parent.name))
    return total


def machine_busy() -> tuple[float, float]:
    """Busy and total CPU time of the whole machine so far (every core), from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def stop(procs: list[tuple[subprocess.Popen[bytes], int]]) -> None:
    for p, _ in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(60)


async def server_counters(url: str, *, wait_idle: bool = False) -> tuple[int, int]:
    """Commits in the run's database so far, and the server's WAL flushes. ``wait_idle``: once
    the nodes' backends are gone (each reports its last commits as it exits)."""
    conn = await asyncpg.connect(url)
    try:
        others = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        deadline = time.monotonic() + 10
        while wait_idle and await conn.fetchval(others) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        commits = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        syncs = await conn.fetchval("SELECT wal_sync FROM pg_stat_wal")
        return int(commits), int(syncs)
    finally:
        await conn.close()


def run(label: str, nodes: int, url: str | None, size: int, messages: int) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        provider, provider_port = fake_provider(workdir)
        procs: list[tuple[subprocess.Popen[bytes], int]] = []
        try:
            for i in range(nodes):
                procs.append(node(workdir, i, provider_port, url))
            cpu0 = sum(cpu_seconds(p.pid) for p, _ in procs)
            pg0 = asyncio.run(server_counters(url)) if url else (0, 0)
            pg_cpu0 = server_cpu_seconds()
            busy0 = machine_busy()
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
            busy1 = machine_busy()
            ok = sum(r["ok"] for r in results)
            deadline = time.monotonic() + 300
            while delivered(provider_port) < ok and time.monotonic() < deadline:
                time.sleep(0.05)
            end_to_end = time.monotonic() - start
            cpu = sum(cpu_seconds(p.pid) for p, _ in procs) - cpu0
            pg_cpu = server_cpu_seconds() - pg_cpu0
            stop(procs)  # a backend's last statistics are flushed when it exits
            pg1 = asyncio.run(server_counters(url, wait_idle=True)) if url else (0, 0)
            commits, syncs = pg1[0] - pg0[0] - 1, pg1[1] - pg0[1]  # - 1: the first reading's own
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
                "machine busy %": 100 * (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1),
                **(
                    {
                        "commits/msg": commits / max(ok, 1),
                        "commits/s": commits / end_to_end,
                        "wal syncs/msg": syncs / max(ok, 1),
                        "pg cpu ms/msg": 1000 * pg_cpu / max(ok, 1),
                    }
                    if url
                    else {}
                ),
            }
        finally:
            stop(procs)
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
    parser.add_argument("--only", choices=("sqlite", "postgres"), help="run only this backend")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 100 * 1024], help="bytes")
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        count = args.messages if size < 10_000 else max(200, args.messages // 4)
        if args.only != "postgres":
            rows.append(run("sqlite, 1 node", 1, None, size, count))
        for nodes in (1, 2) if args.only != "sqlite" else ():
            name = asyncio.run(fresh_database(args.dsn))
            try:
                url = args.dsn.rsplit("/", 1)[0] + "/" + name
                rows.append(run(f"postgres, {nodes} node{'s' if nodes > 1 else ''}", nodes, url, size, count))
            finally:
                asyncio.run(drop_database(args.dsn, name))
    keys = list(max(rows, key=len))
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(_cell(row.get(k, "")) for k in keys))


def _cell(value: float | str) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


if __name__ == "__main__":
    main()
