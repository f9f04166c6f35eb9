"""File descriptors: make sure ``max_connections`` fits the process's limit, with room.

Under the common limit of 1,024 with 1,000 idle sessions plus load, everything that needed one
more descriptor failed at random: SMTP 451s, HTTP 500s, deliveries deferred with "Too many open
files" and hundreds of tracebacks. So at start-up the soft limit is raised as far as needed (up
to the hard limit, as any process may), and if even that is too little, ``serve`` stops with
exit status 2 naming ``smtp.max_connections`` rather than failing later under load.
"""

from __future__ import annotations

import resource

from ratatoskr.config import Config
from ratatoskr.errors import ConfigError

PER_SESSION = 2  #: the socket, and the spill file of a large message being uploaded
BASE = 64  #: queue database and its WAL, listeners, log, event loop, threads' files
HTTP_ROOM = 128  #: HTTP API clients, metric scrapes, health checks


def needed(config: Config) -> int:
    """Descriptors the config may use at once."""
    providers = 2 * config.delivery.workers * max(1, len(config.providers))
    return config.smtp.max_connections * PER_SESSION + BASE + HTTP_ROOM + providers


def ensure(config: Config) -> int:
    """Raise the soft RLIMIT_NOFILE to what ``config`` needs; return the limit now in force.

    Raises :class:`ConfigError` (``smtp.max_connections``) when the hard limit is too low.
    """
    want = needed(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
        soft = raised
    if soft != resource.RLIM_INFINITY and soft < want:
        raise ConfigError(
            "smtp.max_connections",
            f"{config.smtp.max_connections} sessions need about {want} file descriptors, but this "
            f"process may open only {soft}: raise LimitNOFILE (ulimit -n) or lower max_connections",
        )
    return int(soft)
