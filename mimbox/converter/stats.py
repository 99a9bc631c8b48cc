"""Counters of a running converter, and the unix-socket endpoint that `mimbox stats` reads."""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

from mimbox.config import hostport


@dataclass
class Stats:
    """What Python counts itself (the core counts the rest: mimbox.converter.core.CoreStats)."""
    refused: Counter = field(default_factory=Counter)    # cause -> count
    errors: Counter = field(default_factory=Counter)     # cause -> count


# the core's counters a snapshot carries as they are (and merge() adds across workers)
CORE_COUNTERS = ("syns", "deferred", "accepted", "client_mptcp", "client_tcp", "server_mptcp", "server_tcp", "closed",
                 "bytes_up", "bytes_down", "server_connects", "server_tcp_remembered", "server_connect_us_sum",
                 "spare_used", "spare_made", "busy_polls", "handed_over", "buffer_waits", "timer_visits",
                 "dest_evictions", "wakeups")
# the core's errno-indexed counters, by the prefix of their keys in "errors"
CORE_ERRNO_COUNTERS = (("", "errors"), ("accept ", "accept_errors"), ("server ", "server_errors"),
                       ("hand-over ", "handover_errors"))
# the core's other error counters, by their key in "errors"
CORE_ERRORS = (("idle timeout", "idle_timeouts"), ("server timeout", "connect_timeouts"),
               ("server connect timeout", "held_connect_timeouts"), ("client handshake timeout", "handshake_timeouts"),
               ("accept while SYN held", "accept_while_held"))


def worker_snapshot(relay, connections: bool = True) -> dict:
    """One worker's counters (`relay`: a mimbox.converter.relay.Relay): the core's, and what Python counted."""
    from mimbox.codes import CAUSES
    from mimbox.converter.synpath import Cause
    from mimbox.wire import mptcp
    cs = relay.core.stats()
    d = {k: getattr(cs, k) for k in CORE_COUNTERS}
    d.update({"server_connect_us_max": cs.server_connect_us_max,
              "server_connect_us_mean": cs.server_connect_us_sum / cs.server_connects if cs.server_connects else 0,
              "active": cs.active, "pending": relay.core.pending(), "limit": relay.admission.limit,
              "syn_path": relay.cfg.listener.syn_path, "log_lines_refused": relay.refusals.lines,
              "admitted": relay.admission.used, "fd_capacity": relay.fd_capacity,
              "memory_pressure": relay.admission.pressure,    # pages (mimbox.host.resources), 0: none
              "mode": relay.cfg.listener.mode, "engine": relay.cfg.buffers.engine,
              "pipes_pooled": cs.pipes_pooled, "spares": cs.spares, "workers": relay.workers,
              "greetings": relay.core.greetings(), "accept_pauses": cs.accept_pauses,
              "log_lines_access": relay.access.lines, "access_log_dropped": cs.access_log_dropped,
              "connect_hist": list(cs.connect_hist), "duration_hist": list(cs.duration_hist),
              "duration_sum": cs.duration_sum})
    refused, errors = Counter(relay.stats.refused), Counter(relay.stats.errors)
    for i, count in enumerate(cs.refused):
        if count:
            refused[CAUSES[i].value] += count
    if relay.recorder is not None and relay.worker == 0 and relay.recorder.conflicts():   # one map for all workers
        refused[Cause.CONFLICTING_DESTINATION.value] += relay.recorder.conflicts()
    for prefix, name in CORE_ERRNO_COUNTERS:
        for e, count in enumerate(getattr(cs, name)):
            if count:
                errors[prefix + errno.errorcode.get(e, str(e))] += count
    for key, name in CORE_ERRORS:
        if getattr(cs, name):
            errors[key] += getattr(cs, name)
    d["refused"], d["errors"] = {str(k): v for k, v in refused.items()}, {str(k): v for k, v in errors.items()}
    if connections:
        now = time.monotonic()
        d["connections"] = [
            {"client": hostport(*c.client), "server": hostport(*c.server), "bytes_up": c.bytes_up,
             "bytes_down": c.bytes_down, "client_mptcp": c.client_mptcp,
             "client_subflows": mptcp.subflows(c.cfd), "server_mptcp": c.server_mptcp,
             "server_subflows": mptcp.subflows(c.sfd), "age_s": round(now - c.t_accept, 3)}
            for c in relay.core.connections()]
    return d


SUMMED = ("active", "pending", "pipes_pooled", "spares", "fd_capacity", "log_lines_refused", "greetings",
          "accept_pauses", "log_lines_access", "access_log_dropped", "duration_sum")
HISTOGRAMS = ("connect_hist", "duration_hist")     # per-bucket counts: added bucket by bucket


def merge(snapshots: list[dict], **extra) -> dict:
    """One snapshot for a converter run by several workers: counters added, maxima kept, lists joined."""
    out: dict = {}
    for snap in snapshots:
        for k, v in snap.items():
            if k == "server_connect_us_max":
                out[k] = max(out.get(k, 0), v)
            elif k in ("refused", "errors"):
                c = out.setdefault(k, Counter())
                c.update(v)
            elif k == "connections":
                out.setdefault(k, []).extend(v)
            elif k in HISTOGRAMS:
                out[k] = [a + b for a, b in zip(out[k], v)] if k in out else list(v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and (k in SUMMED or k in CORE_COUNTERS):
                out[k] = out.get(k, 0) + v
            else:
                out.setdefault(k, v)
    for k in ("refused", "errors"):
        out[k] = dict(out.get(k, {}))
    n = out.get("server_connects", 0)
    out["server_connect_us_mean"] = out.get("server_connect_us_sum", 0) / n if n else 0
    out.update(extra)
    return out


def worker_stats_path(path: str, worker: int) -> str:
    """Where worker `worker` of a multi-worker converter serves its own counters."""
    return f"{path}.w{worker}"


def counters_path(path: str) -> str:
    """Where a worker serving `mimbox stats` at `path` serves its counters without the connection
    list (what /metrics asks: a scrape must not make a worker list every connection)."""
    return f"{path}.c"


def default_stats_path(port: int) -> str:
    return f"/run/mimbox/{port}.sock"


def open_endpoint(path: str) -> socket.socket:
    """A listening unix socket at `path` (replacing a stale one), mode 0600 whatever the umask: its
    counters and connection list (client addresses) are the converter's owner's."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    s.listen(16)
    s.setblocking(False)
    return s


def answer(endpoint: socket.socket, snapshot, timeout: float = 1.0) -> None:
    """Serve one waiting `mimbox stats` client of `endpoint` with snapshot() as JSON (never raises)."""
    try:
        c, _ = endpoint.accept()
    except BlockingIOError:
        return
    with c:
        try:
            c.setblocking(True)
            c.settimeout(timeout)
            c.sendall(json.dumps(snapshot()).encode())
        except OSError:
            pass                  # the asker went away, or did not read within the timeout: it may ask again


class Answers:
    """`mimbox stats` answers served from an event loop without ever blocking it: each is sent as
    far as the socket takes it; the rest goes out when the loop reports the socket writable (the
    caller watches `pending()` fds for EPOLLOUT), and one that is not read within `timeout` is dropped."""

    def __init__(self, timeout: float = 2.0):
        self.timeout = timeout
        self.out: dict[int, tuple[socket.socket, bytes, float]] = {}

    def accept(self, endpoint: socket.socket, snapshot, now: float) -> int | None:
        """Take one waiting client of `endpoint`; the fd to watch for EPOLLOUT if its answer did not fit."""
        try:
            c, _ = endpoint.accept()
        except (BlockingIOError, InterruptedError):
            return None
        c.setblocking(False)
        self.out[c.fileno()] = (c, json.dumps(snapshot()).encode(), now + self.timeout)
        return c.fileno() if self.writable(c.fileno()) else None

    def writable(self, fd: int) -> bool:
        """Send more; True while something is left."""
        c, data, deadline = self.out[fd]
        try:
            n = c.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            n, data = 0, b""
        data = data[n:]
        if not data:
            del self.out[fd]
            c.close()
            return False
        self.out[fd] = (c, data, deadline)
        return True

    def expire(self, now: float) -> list[int]:
        """Drop answers not read in time; their fds (to unwatch)."""
        gone = [fd for fd, (_, _, deadline) in self.out.items() if now > deadline]
        for fd in gone:
            self.out.pop(fd)[0].close()
        return gone

    def close(self) -> None:
        for c, _, _ in self.out.values():
            c.close()
        self.out.clear()


def query(path: str, timeout: float = 5.0) -> dict:
    """Read the JSON snapshot a converter serves at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
