"""`make bench`: ratatoskr against Postfix, side by side, under Postfix's own load tool.

Three servers run at once, each in its own processes: a private Postfix instance relaying to
``smtp-sink`` (the anchor, :mod:`bench.postfix`), ratatoskr delivering to a lean fake Mailgun
(``bench/fake_mailgun.py``), and a bare aiosmtpd sink that stores nothing (a second yardstick:
what aiosmtpd alone costs). Each is loaded in turn by ``smtp-source`` (20 sessions), for 2 KB
and 100 KB messages, one message per connection and reused connections (``-d``), in
interleaved repetitions; the table shows medians, with ratatoskr's ratio to Postfix.

* accepted: messages / smtp-source's wall time;
* end to end: messages / time until the last one is at the sink (Postfix's queue is empty and
  its log says ``status=sent`` for all; the fake Mailgun has counted all of ours);
* p50/p99: end of DATA → reply, measured by one extra session of ``bench/loadgen.py --probe``
  running beside smtp-source (smtp-source reports no latencies);
* CPU per message: all of the server's processes (Postfix: master and every child, including
  those that exited), from the first message until the last one was delivered;
* peak memory: ratatoskr's and the sink's peak RSS (VmHWM, reset before each run); Postfix's
  is the highest sum of PSS over its processes, sampled every 0.2 s (RSS would count its
  shared libraries once per process).

Then memory checks: 1,000 idle SMTP connections, and concurrent 10 MB messages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import postfix  # noqa: E402
from common import free_port, write_config  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak_rss(pid: int) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@dataclass(frozen=True)
class Cell:
    size: int
    reuse: bool
    messages: int

    @property
    def name(self) -> str:
        return f"{self.size // 1024} KB, {'reused connections' if self.reuse else 'one msg/connection'}"


@dataclass
class Result:
    accepted_per_s: float
    e2e_per_s: float | None
    p50_ms: float
    p99_ms: float
    cpu_ms_per_msg: float
    peak_mb: float


class Target:
    """One server under test. Subclasses say how to start it and how to read its counters."""

    name = ""
    port = 0

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def cpu(self) -> float:
        raise NotImplementedError

    def delivered(self) -> int | None:
        """Messages that reached the far end so far (None: the target delivers nothing)."""
        return None

    def drained(self) -> bool:
        return True

    def memory_start(self) -> None: ...

    def memory_peak(self) -> float:
        raise NotImplementedError


class PythonServer(Target):
    """ratatoskr or the aiosmtpd sink: one process, peak RSS from the kernel's VmHWM."""

    proc: subprocess.Popen[bytes] | None = None

    env: dict[str, str] | None = None

    def _spawn(self, cmd: list[str], workdir: Path) -> None:
        self.proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / f"{self.name}.log", "ab"),
            env=self.env,
        )
        wait_listening(self.port, self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def memory_start(self) -> None:
        reset_peak_rss(self.pid)

    def memory_peak(self) -> float:
        return rss_mb(self.pid)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Sink(PythonServer):
    name = "sink"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()

    def start(self) -> None:
        self._spawn([sys.executable, str(ROOT / "bench" / "sink.py"), "--port", str(self.port)], self.workdir)


class Ratatoskr(PythonServer):
    name = "ratatoskr"

    def __init__(
        self,
        workdir: Path,
        provider: FakeProvider,
        *,
        log_level: str = "info",
        name: str = "ratatoskr",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.env = env
        self.workdir = workdir
        self.provider = provider
        self.port = free_port()
        self.log_level = log_level
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        config = write_config(
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
                "log": {"level": self.log_level},
            },
            [
                {
                    "name": "mailgun",
                    "kind": "mailgun",
                    "api_key": "bench-key",
                    "domain": "mg.example.com",
                    "base_url": self.provider.url,
                }
            ],
        )
        self._spawn([sys.executable, "-m", "ratatoskr", "serve", "--config", str(config)], self.workdir)

    def delivered(self) -> int:
        return self.provider.delivered()


class Postfix(Target):
    name = "postfix"

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.instance = postfix.PostfixInstance(workdir, self.port, free_port())
        self._peak = 0.0
        self._sampling: threading.Event | None = None
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        self.instance.start()
        wait_listening(self.port)
        self.master = self.instance.master_pid

    def stop(self) -> None:
        self.instance.stop()

    def cpu(self) -> float:
        return postfix.tree_cpu_seconds(self.master)

    def delivered(self) -> int:
        return self.instance.sent()

    def drained(self) -> bool:
        return self.instance.queued() == 0

    def memory_start(self) -> None:
        self._peak = postfix.tree_pss_mb(self.master)
        self._sampling = threading.Event()

        def sample(stop: threading.Event) -> None:
            while not stop.wait(0.2):
                self._peak = max(self._peak, postfix.tree_pss_mb(self.master))

        self._sampler = threading.Thread(target=sample, args=(self._sampling,), daemon=True)
        self._sampler.start()

    def memory_peak(self) -> float:
        if self._sampling is not None and self._sampler is not None:
            self._sampling.set()
            self._sampler.join()
        return self._peak


class FakeProvider:
    """The fake Mailgun in its own process, with its delivered counter."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "fake_mailgun.py"), "--port", str(self.port)],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=open(workdir / "fake.log", "ab"),
        )
        wait_listening(self.port, self.proc)

    def delivered(self) -> int:
        import urllib.request

        with urllib.request.urlopen(self.url + "/_stats", timeout=5) as resp:
            return int(json.load(resp)["messages"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def loadgen(port: int, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), *args]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def measure(target: Target, cell: Cell, sessions: int) -> Result:
    before = target.delivered()
    target.memory_start()
    cpu_before = target.cpu()
    probe = subprocess.Popen(
        loadgen(target.port, "--probe", "--size", str(cell.size), *(["--persistent"] if cell.reuse else [])),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert probe.stdout is not None
    if probe.stdout.readline() != b"ready\n":
        raise RuntimeError(f"latency probe against {target.name} failed")
    started = time.perf_counter()
    source = postfix.smtp_source(
        target.port, sessions=sessions, messages=cell.messages, size=cell.size, reuse=cell.reuse
    )
    _, err = source.communicate(timeout=600)
    wall = time.perf_counter() - started
    out, _ = probe.communicate(b"", timeout=60)
    if source.returncode != 0:
        raise RuntimeError(f"smtp-source against {target.name} failed: {err.decode(errors='replace')}")
    lat = json.loads(out)
    total = cell.messages + lat["ok"]  # every message the probe sent, its untimed first included
    e2e = None
    if before is not None:
        wait_for(lambda: target.delivered() - before >= total and target.drained(), 300, "delivery")
        e2e = total / (time.perf_counter() - started)
    cpu = target.cpu() - cpu_before
    latencies = sorted(lat["latencies"]) or [0.0]
    return Result(
        accepted_per_s=cell.messages / wall,
        e2e_per_s=e2e,
        p50_ms=statistics.median(latencies) * 1000,
        p99_ms=latencies[math.ceil(len(latencies) * 0.99) - 1] * 1000,  # nearest rank
        cpu_ms_per_msg=cpu / total * 1000,
        peak_mb=target.memory_peak(),
    )


def median_result(results: list[Result]) -> Result:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    fields = Result.__dataclass_fields__
    return Result(**{f: med([getattr(r, f) for r in results]) for f in fields})  # type: ignore[arg-type]


METRICS = (
    ("accepted msgs/s", "accepted_per_s", "{:,.0f}", True),
    ("end to end msgs/s", "e2e_per_s", "{:,.0f}", True),
    ("p50 ms", "p50_ms", "{:.1f}", False),
    ("p99 ms", "p99_ms", "{:.1f}", False),
    ("CPU ms/msg", "cpu_ms_per_msg", "{:.2f}", False),
    ("peak MB", "peak_mb", "{:,.0f}", False),
)


def table(cells: dict[Cell, dict[str, Result]]) -> list[str]:
    lines = [
        "| cell | metric | Postfix | ratatoskr | ratio | aiosmtpd sink |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cell, by_target in cells.items():
        pf, ours, sink = (by_target.get(n) for n in ("postfix", "ratatoskr", "sink"))
        for label, attr, fmt, _ in METRICS:
            mine = getattr(ours, attr) if ours else None
            anchor = getattr(pf, attr) if pf else None
            other = getattr(sink, attr) if sink else None

            def show(v: float | None, fmt: str = fmt) -> str:
                return fmt.format(v) if v is not None else "–"

            ratio = f"{mine / anchor:.2f}×" if mine is not None and anchor else "–"
            lines.append(
                f"| {cell.name} | {label} | {show(anchor)} | {show(mine)} | {ratio} | {show(other)} |"
            )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short repetition, under a minute")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repetitions (default 3)")
    parser.add_argument("--only", default="", help="comma-separated targets (postfix,ratatoskr,sink)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory checks")
    parser.add_argument("--json", type=Path, help="also write every raw result here")
    args = parser.parse_args()
    postfix.ensure_installed()
    repeat = args.repeat or (1 if args.quick else 3)
    counts = {2048: 300, 102400: 120} if args.quick else {2048: 2000, 102400: 800}
    cells = [Cell(size, reuse, counts[size]) for size in counts for reuse in (False, True)]
    work = Path(tempfile.mkdtemp(prefix="ratatoskr-bench-"))
    provider = FakeProvider(work)
    targets: list[Target] = [Postfix(work / "postfix"), Ratatoskr(work / "ratatoskr", provider), Sink(work)]
    if args.only:
        targets = [t for t in targets if t.name in args.only.split(",")]
    load_before = os.getloadavg()
    raw: dict[Cell, dict[str, list[Result]]] = {c: {t.name: [] for t in targets} for c in cells}
    lines = [
        f"ratatoskr bench: smtp-source, {args.sessions} sessions (+1 latency probe), {os.cpu_count()} cores,"
        f" medians of {repeat}, load average before {load_before[0]:.2f}"
    ]
    try:
        for t in targets:
            t.start()
        for t in targets:  # warm-up: imports, first connections, SQLite pages
            measure(t, Cell(2048, False, 100), args.sessions)
        for rep in range(repeat):
            for cell in cells:
                # Rotate who goes first, so no target always runs right after the same one.
                for t in targets[rep % len(targets) :] + targets[: rep % len(targets)]:
                    result = measure(t, cell, args.sessions)
                    raw[cell][t.name].append(result)
                    progress = f"bench: {rep + 1}/{repeat} {cell.name} {t.name}: {result}"
                    print(progress, file=sys.stderr, flush=True)
        load_after = os.getloadavg()
        medians = {c: {name: median_result(rs) for name, rs in by.items()} for c, by in raw.items()}
        lines += table(medians)
        lines.append(f"load average after: {load_after[0]:.2f} (1 min), {load_after[1]:.2f} (5 min)")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {c.name: {n: [r.__dict__ for r in rs] for n, rs in by.items()} for c, by in raw.items()},
                    indent=1,
                )
            )
    finally:
        for t in targets:
            t.stop()
    if not args.no_memory:
        lines += memory_checks(work, provider, quick=args.quick)
    provider.stop()
    shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))
    return 0


def memory_checks(work: Path, provider: FakeProvider, *, quick: bool) -> list[str]:
    """1,000 idle connections, then concurrent 10 MB messages (bench/loadgen.py as the load:
    smtp-source has no idle mode)."""
    target = Ratatoskr(work / "memory", provider, log_level="warning")
    target.start()
    try:
        idle = idle_rss(target.port, target.pid, 1000)
        sessions = 5 if quick else 20
        subprocess.run(
            loadgen(
                target.port,
                "--sessions",
                str(sessions),
                "--messages",
                str(sessions * 2),
                "--size",
                str(10 * 1024 * 1024),
            ),
            capture_output=True,
            check=True,
            timeout=600,
        )
        peak = rss_mb(target.pid)
    finally:
        target.stop()
    return [
        f"memory: 1000 idle connections: rss {idle:.0f} MB (goal < 150)",
        f"memory: {sessions} sessions x 10 MB messages: peak rss {peak:.0f} MB (goal < 500)",
    ]


def idle_rss(port: int, pid: int, count: int) -> float:
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            sockets.append(s)
        for s in sockets:  # every greeting arrived: each connection has its SMTP object
            s.recv(512)
        time.sleep(0.5)
        return rss_mb(pid, "VmRSS")
    finally:
        for s in sockets:
            s.close()


if __name__ == "__main__":
    sys.exit(main())
