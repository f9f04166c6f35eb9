"""The anchor: a private Postfix instance relaying to ``smtp-sink``, and Postfix's own load tool.

Nothing here touches the system's Postfix: the instance has its own ``main.cf``/``master.cf``,
queue and data folders under a temporary directory (``postfix -c DIR``), listens on one
loopback port only, and relays everything to an ``smtp-sink`` on another loopback port. Its
processes are found through the master's pid file, so CPU and memory are measured for this
instance alone.

When ``postconf``/``smtp-source`` are missing, :func:`ensure_installed` installs Debian's
``postfix`` package non-interactively, answering its setup question with "No configuration"
so the package neither writes a system ``main.cf`` nor starts the system instance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

POSTFIX_TOOLS = ("postconf", "postfix", "smtp-source", "smtp-sink")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _find(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d, tool)).exists()), None
    )


def ensure_installed() -> None:
    """Install Debian's postfix package if its tools are missing (saying so on stderr)."""
    if all(_find(t) for t in POSTFIX_TOOLS):
        return
    print("bench: postconf/smtp-source missing; installing Debian's postfix package", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # "No configuration": no /etc/postfix/main.cf, so the system instance is never started.
    subprocess.run(
        ["debconf-set-selections"],
        input=b"postfix postfix/main_mailer_type select No configuration\n",
        check=True,
    )
    install = ["apt-get", "install", "-y", "--no-install-recommends", "postfix"]
    if subprocess.run(install, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    missing = [t for t in POSTFIX_TOOLS if not _find(t)]
    if missing:
        raise RuntimeError(f"postfix installed but {missing} still missing")


def tool(name: str) -> str:
    found = _find(name)
    if found is None:
        raise RuntimeError(f"{name} not found")
    return found


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            todo += children(p)
        except OSError:
            pass
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process tree, counting children that already exited (the master reaps them, so
    their time is in its cutime/cstime) and those still running."""
    total = 0.0
    for p in tree(pid):
        try:
            fields = _stat(p)
        except OSError:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if p == pid:
            ticks += int(fields[13]) + int(fields[14])
        total += ticks / CLOCK_TICKS
    return total


def tree_pss_mb(pid: int) -> float:
    """Proportional set size of a process tree: shared pages (libraries, Postfix's shared
    maps) are split between the processes instead of being counted once per process."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file_prefixes = {dir}
maillog_file = {dir}/maillog
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_tls_security_level = none
smtp_tls_security_level = none
default_process_limit = 200
biff = no
"""

# Postfix's stock master.cf, minus chroot (the private queue folder is not set up as a jail)
# and the pipe transports, with smtpd on a loopback port of our choosing.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")


class PostfixInstance:
    """A private Postfix on ``127.0.0.1:port`` relaying to an ``smtp-sink`` on ``sink_port``."""

    def __init__(self, workdir: Path, port: int, sink_port: int) -> None:
        self.dir = workdir
        self.port = port
        self.sink_port = sink_port
        self.sink: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "etc"
        self._log_offset = 0
        self._sent = 0

    def start(self) -> None:
        self.conf.mkdir(parents=True)
        # Postfix's daemons run as the postfix user and must reach their folders.
        for folder in (self.dir, *self.dir.parents):
            if folder.stat().st_mode & 0o005 != 0o005:
                folder.chmod(folder.stat().st_mode | 0o005)
        (self.dir / "queue").mkdir()
        (self.dir / "data").mkdir()
        shutil.chown(self.dir / "data", "postfix", "postfix")
        (self.conf / "main.cf").write_text(MAIN_CF.format(dir=self.dir, sink_port=self.sink_port))
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        # The maillog file is written by postlogd, which runs unprivileged.
        (self.dir / "maillog").touch()
        shutil.chown(self.dir / "maillog", "postfix", "postfix")
        self.sink = subprocess.Popen(
            # -u: drop to the postfix user; backlog 256; no dumps, no delays: accept and forget.
            [tool("smtp-sink"), "-u", "postfix", f"127.0.0.1:{self.sink_port}", "256"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "smtp-sink.log", "ab"),
        )
        subprocess.run(
            [tool("postfix"), "-c", str(self.conf), "start"],
            check=True,
            capture_output=True,
        )

    @property
    def master_pid(self) -> int:
        deadline = time.monotonic() + 10
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        while time.monotonic() < deadline:
            try:
                return int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        raise RuntimeError("postfix master did not write its pid file")

    def queued(self) -> int:
        """Messages in any of the instance's queues (0: everything has been relayed)."""
        count = 0
        for name in _QUEUES:
            for _, _, files in os.walk(self.dir / "queue" / name):
                count += len(files)
        return count

    def sent(self) -> int:
        """Messages relayed to the sink so far, from the instance's own log (read on from
        where the last call stopped: the log grows by several lines per message)."""
        with open(self.dir / "maillog", "rb") as log:
            log.seek(self._log_offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        self._sent += complete.count(b" status=sent ")
        return self._sent

    def stop(self) -> None:
        subprocess.run([tool("postfix"), "-c", str(self.conf), "stop"], capture_output=True)
        if self.sink is not None and self.sink.poll() is None:
            self.sink.terminate()
            self.sink.wait(10)


def smtp_source(
    port: int, *, sessions: int, messages: int, size: int, reuse: bool
) -> subprocess.Popen[bytes]:
    """Start Postfix's load generator: ``sessions`` in parallel, ``messages`` in all, ``size``
    bytes of body each, one connection per message unless ``reuse`` (``-d``)."""
    cmd = [
        tool("smtp-source"),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-M",
        "loadgen.bench.test",
        "-f",
        "bench@example.com",
        "-t",
        "sink@example.net",
        "-S",
        "benchmark message",
    ]
    if reuse:
        cmd.append("-d")
    return subprocess.Popen([*cmd, f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
