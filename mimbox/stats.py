"""Counters of a running converter, and the unix-socket endpoint that `mimbox stats` reads."""
from __future__ import annotations

import json
import os
import socket
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    """Global counters; per-connection detail is added by the relay when asked."""
    syns: int = 0
    accepted: int = 0
    closed: int = 0
    refused: Counter = field(default_factory=Counter)    # reason -> count
    errors: Counter = field(default_factory=Counter)     # cause -> count
    bytes_up: int = 0          # client -> server
    bytes_down: int = 0        # server -> client
    client_mptcp: int = 0
    client_tcp: int = 0        # plain TCP or MPTCP fallen back
    server_mptcp: int = 0
    server_tcp: int = 0
    server_connect_us_sum: float = 0.0   # SYN seen -> server connection established
    server_connect_us_max: float = 0.0
    server_connects: int = 0
    server_tcp_remembered: int = 0   # plain TCP chosen: the server answered MPTCP without it recently
    handed_over: int = 0       # accepted here, relayed by the worker that held the SYN
    deferred: int = 0          # SYNs not held (--syn-path accept, or auto past the pending caps)
    spare_used: int = 0        # server connections opened on a socket made ahead (--spare-sockets)
    spare_made: int = 0
    busy_polls: int = 0        # event batches found by polling instead of a wake-up (--busy-poll)

    def server_connected(self, seconds: float) -> None:
        us = seconds * 1e6
        self.server_connect_us_sum += us
        self.server_connect_us_max = max(self.server_connect_us_max, us)
        self.server_connects += 1

    def snapshot(self, **extra) -> dict:
        d = asdict(self)
        for k in ("refused", "errors"):
            d[k] = {str(a): b for a, b in getattr(self, k).items()}
        d["server_connect_us_mean"] = self.server_connect_us_sum / self.server_connects if self.server_connects else 0
        d.update(extra)
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
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and (k in SUMMED or k in Stats.__annotations__):
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
            pass


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
