"""`make bench`: ratatoskr against a bare aiosmtpd sink, under the same SMTP load.

For 2 KB and 100 KB messages over N concurrent sessions it prints accepted and delivered msgs/s,
p50/p99 end-of-DATA → 250 latency, CPU seconds per message and peak RSS, each also as a ratio
to the sink measured in the same run (ratios hold on a noisy machine; absolute numbers do not).
Then memory checks: 1,000 idle SMTP connections, and concurrent 10 MB messages.

The daemon runs as a subprocess with a temporary queue and delivers to a fake Mailgun server
(tests/fakes) on loopback, so "delivered" covers the whole pipeline: SMTP, fsync, HTTP API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.process import free_port, write_config  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@dataclass
class Result:
    accepted_per_s: float
    delivered_per_s: float | None
    p50_ms: float
    p99_ms: float
    cpu_ms_per_msg: float
    peak_rss_mb: float


class Target:
    """One SMTP server under test, in its own process."""

    def __init__(self, kind: str, workdir: Path, provider_url: str | None = None) -> None:
        self.kind = kind
        self.workdir = workdir
        self.port = free_port()
        self.provider_url = provider_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.kind == "sink":
            cmd = [sys.executable, str(ROOT / "bench" / "sink.py"), "--port", str(self.port)]
        else:
            cmd = [sys.executable, "-m", "ratatoskr", "serve", "--config", str(self._config())]
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / f"{self.kind}.log", "ab"),
        )
        wait_listening(self.port, self.proc)

    def _config(self) -> Path:
        provider = (
            {
                "name": "mailgun",
                "kind": "mailgun",
                "api_key": "bench-key",
                "domain": "mg.example.com",
                "base_url": self.provider_url,
            }
            if self.provider_url
            else {"name": "outbox", "kind": "outbox", "path": str(self.workdir / "outbox")}
        )
        return write_config(
            self.workdir / "bench.toml",
            {
                "smtp": {
                    "listen": f"127.0.0.1:{self.port}",
                    "hostname": "bench.test",
                    "max_connections": 5000,
                    "max_connections_per_client": 5000,
                },
                "http": {"listen": f"127.0.0.1:{free_port()}"},
                "spool": {"path": str(self.workdir / "var")},
                "delivery": {"workers": 32},
                "log": {"level": "warning"},
            },
            [provider],
        )

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_load(port: int, sessions: int, messages: int, size: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            "--port",
            str(port),
            "--sessions",
            str(sessions),
            "--messages",
            str(messages),
            "--size",
            str(size),
        ],
        capture_output=True,
        check=True,
        timeout=600,
    )
    return json.loads(out.stdout)


def measure(target: Target, sessions: int, messages: int, size: int, delivered) -> Result:
    assert target.proc is not None
    pid = target.proc.pid
    run_load(target.port, sessions, max(20, messages // 10), size)  # warm-up
    base_delivered = delivered() if delivered else 0
    cpu_before = cpu_seconds(pid)
    started = time.perf_counter()
    load = run_load(target.port, sessions, messages, size)
    done_at = None
    if delivered:
        deadline = time.monotonic() + 120
        while delivered() - base_delivered < load["ok"] and time.monotonic() < deadline:
            time.sleep(0.02)
        done_at = time.perf_counter()
    cpu = cpu_seconds(pid) - cpu_before
    lat = sorted(load["latencies"])
    return Result(
        accepted_per_s=load["ok"] / load["wall"],
        delivered_per_s=(delivered() - base_delivered) / (done_at - started) if done_at else None,
        p50_ms=statistics.median(lat) * 1000,
        p99_ms=lat[int(len(lat) * 0.99) - 1] * 1000,
        cpu_ms_per_msg=cpu / max(1, load["ok"]) * 1000,
        peak_rss_mb=rss_mb(pid),
    )


async def hold_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    writers = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writers.append(writer)
    return writers


def idle_rss(target: Target, count: int) -> float:
    assert target.proc is not None

    async def go() -> float:
        writers = await hold_idle(target.port, count)
        await asyncio.sleep(0.5)
        rss = rss_mb(target.proc.pid, "VmRSS")
        for w in writers:
            w.close()
        return rss

    return asyncio.run(go())


def row(name: str, ours: Result, sink: Result) -> list[str]:
    def ratio(a: float | None, b: float) -> str:
        return f"{a / b:5.2f}x" if a is not None and b else "   - "

    return [
        f"{name:<18} accepted {ours.accepted_per_s:8.0f}/s"
        f" ({ratio(ours.accepted_per_s, sink.accepted_per_s)} sink)"
        f"  delivered {ours.delivered_per_s or 0:8.0f}/s"
        f" ({ratio(ours.delivered_per_s, ours.accepted_per_s)} accepted)",
        f"{'':<18} p50 {ours.p50_ms:6.2f} ms ({ratio(ours.p50_ms, sink.p50_ms)})  p99 {ours.p99_ms:6.2f} ms"
        f" ({ratio(ours.p99_ms, sink.p99_ms)})  cpu {ours.cpu_ms_per_msg:5.2f} ms/msg"
        f" ({ratio(ours.cpu_ms_per_msg, sink.cpu_ms_per_msg)})  peak rss {ours.peak_rss_mb:5.0f} MB",
        f"{'  sink':<18} accepted {sink.accepted_per_s:8.0f}/s  p50 {sink.p50_ms:6.2f} ms"
        f"  p99 {sink.p99_ms:6.2f} ms  cpu {sink.cpu_ms_per_msg:5.2f} ms/msg"
        f"  peak rss {sink.peak_rss_mb:5.0f} MB",
    ]


def start_provider(workdir: Path):
    """A fake Mailgun in its own process; returns (process, base_url, delivered counter)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "fake_mailgun.py"), "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "fake.log", "ab"),
    )
    wait_listening(port, proc)
    url = f"http://127.0.0.1:{port}"

    def delivered() -> int:
        import urllib.request

        with urllib.request.urlopen(url + "/_stats", timeout=5) as resp:
            return int(json.load(resp)["messages"])

    return proc, url, delivered


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, under a minute")
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()
    messages = {2048: 600, 102400: 300} if args.quick else {2048: 5000, 102400: 2000}
    work = Path(tempfile.mkdtemp(prefix="ratatoskr-bench-"))
    provider_proc, url, delivered = start_provider(work)
    lines = [f"ratatoskr bench: {args.sessions} sessions, {os.cpu_count()} cores, quick={args.quick}"]
    try:
        for size, count in messages.items():
            sink = Target("sink", work)
            sink.start()
            try:
                sink_result = measure(sink, args.sessions, count, size, None)
            finally:
                sink.stop()
            ours = Target(f"ratatoskr-{size}", work / str(size), provider_url=url)
            ours.workdir.mkdir()
            ours.start()
            try:
                our_result = measure(ours, args.sessions, count, size, delivered)
            finally:
                ours.stop()
            lines += row(f"{size // 1024} KB messages", our_result, sink_result)
        lines += memory_checks(work, url, quick=args.quick)
    finally:
        provider_proc.terminate()
        provider_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    return 0


def memory_checks(work: Path, url: str, *, quick: bool) -> list[str]:
    target = Target("ratatoskr-memory", work / "memory", provider_url=url)
    target.workdir.mkdir()
    target.start()
    try:
        idle = idle_rss(target, 1000)
        sessions = 5 if quick else 20
        run_load(target.port, sessions, sessions * 2, 10 * 1024 * 1024)
        assert target.proc is not None
        peak = rss_mb(target.proc.pid)
    finally:
        target.stop()
    return [
        f"{'memory':<18} 1000 idle connections: rss {idle:5.0f} MB (goal < 150)",
        f"{'':<18} {sessions} sessions x 10 MB messages: peak rss {peak:5.0f} MB (goal < 500)",
    ]


if __name__ == "__main__":
    sys.exit(main())
