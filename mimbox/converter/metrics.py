"""`mimbox run --metrics HOST:PORT`: the counters of `mimbox stats` at /metrics, in the Prometheus
format (prometheus_client renders it).

It is served by a process of its own, forked from the supervisor once the workers run: it binds
the address as root, then becomes the service user with no capability, no new privileges and the
workers' seccomp filter (mimbox.host.privileges.drop). It holds at most MAX_CLIENTS connections (a
newcomer beyond them ends the oldest that has sent nothing), each given REQUEST_TIMEOUT to send its
request and to read the answer. For a scrape it asks the
supervisor over a socket pair (one byte; the supervisor parses nothing from it) for the workers'
counters, which the supervisor reads from each worker's counters-only endpoint (no connection
list: a scrape costs a worker's loop a snapshot of its counters), at most once per CACHE seconds.

Every counter of a worker's snapshot is a `mimbox_<name>_total` with labels worker and mode;
refusals and errors carry their cause; gauges are what is open now; two histograms (server connect
time, connection duration) come from the core's buckets (mimbox.converter.core CONNECT_BUCKETS_US,
DURATION_BUCKETS_S).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time

from mimbox.config import hostport
from mimbox.converter.layouts import CONNECT_BUCKETS_US, DURATION_BUCKETS_S

log = logging.getLogger("mimbox")

# snapshot key -> help text
COUNTERS = {
    "syns": "client SYNs seen by the core", "deferred": "SYNs not held (answered by the kernel at once)",
    "accepted": "client connections accepted", "closed": "connections finished",
    "bytes_up": "bytes relayed client -> server", "bytes_down": "bytes relayed server -> client",
    "client_mptcp": "client connections with MPTCP", "client_tcp": "client connections with plain TCP (or fallen back)",
    "server_mptcp": "server connections with MPTCP", "server_tcp": "server connections with plain TCP",
    "server_connects": "server connections established",
    "server_tcp_remembered": "server connections opened as TCP: the server answered MPTCP without it recently",
    "handed_over": "connections accepted by one worker and relayed by the one that held the SYN",
    "spare_used": "server connections opened on a socket made ahead", "spare_made": "server sockets made ahead",
    "busy_polls": "event batches found by busy polling", "accept_pauses": "listener pauses for lack of fds",
    "buffer_waits": "engine uring: reads that found the buffer pool empty (read into the connection's own buffer)",
    "timer_visits": "timeouts looked at on the timer wheel (follows the timers due, not the connections held)",
    "dest_evictions": "explicit mode: remembered SYN destinations pushed out by newer ones (16 live around one key)",
    "wakeups": "times the event loop woke with work (an MPTCP client's room, unless bytes wait for it, wakes none)",
    "log_lines_refused": "refusal log lines written", "log_lines_access": "access log lines written",
    "access_log_dropped": "access log lines dropped (too many at once)",
}
GAUGES = {
    "active": "connections relayed now", "pending": "client SYNs held now", "greetings": "convert-mode clients "
    "whose message is awaited", "spares": "server sockets made ahead, now", "pipes_pooled": "empty pipes kept",
    "admitted": "connections admitted now (converter-wide count)", "limit": "the connection limit",
    "fd_capacity": "connections this worker's open-file limit allows",
    "memory_pressure": "the kernel's TCP memory in pages while new connections are refused for it (0: admitted)",
}


def _family_name(key: str) -> str:
    return "mimbox_" + key


class Collector:
    """prometheus_client's custom-collector protocol: collect() reads the workers at scrape time.
    snapshots: () -> [(worker, snapshot dict)] (mimbox.converter.workers.Supervisor.worker_snapshots)."""

    def __init__(self, snapshots):
        self.snapshots = snapshots

    def describe(self):
        return []              # no describe at registration: collect() runs only at a scrape

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        snaps = self.snapshots()
        labels = ["worker", "mode"]
        counters = {k: CounterMetricFamily(_family_name(k), h, labels=labels) for k, h in COUNTERS.items()}
        gauges = {k: GaugeMetricFamily(_family_name(k), h, labels=labels) for k, h in GAUGES.items()}
        refused = CounterMetricFamily("mimbox_refused", "connections and SYNs refused, by cause",
                                      labels=[*labels, "cause"])
        errors = CounterMetricFamily("mimbox_errors", "connections that ended in an error, by cause",
                                     labels=[*labels, "cause"])
        connect = HistogramMetricFamily("mimbox_server_connect_seconds", "SYN seen (or client accepted) to "
                                        "server connection established", labels=labels)
        duration = HistogramMetricFamily("mimbox_connection_duration_seconds", "accepted to closed", labels=labels)
        up = GaugeMetricFamily("mimbox_worker_up", "1 if the worker answered this scrape", labels=["worker"])
        for w, snap in snaps:
            if snap is None:
                up.add_metric([str(w)], 0)
                continue
            up.add_metric([str(w)], 1)
            lv = [str(w), str(snap.get("mode", ""))]
            for k, fam in counters.items():
                fam.add_metric(lv, snap.get(k, 0))
            for k, fam in gauges.items():
                fam.add_metric(lv, snap.get(k, 0))
            for cause, n in snap.get("refused", {}).items():
                refused.add_metric([*lv, cause], n)
            for cause, n in snap.get("errors", {}).items():
                errors.add_metric([*lv, cause], n)
            connect.add_metric(lv, _buckets([b / 1e6 for b in CONNECT_BUCKETS_US], snap.get("connect_hist")),
                               sum_value=snap.get("server_connect_us_sum", 0) / 1e6)
            duration.add_metric(lv, _buckets(DURATION_BUCKETS_S, snap.get("duration_hist")),
                                sum_value=snap.get("duration_sum", 0.0))
        yield from counters.values()
        yield from gauges.values()
        yield from (refused, errors, connect, duration, up)


def _buckets(bounds, counts) -> list[tuple[str, float]]:
    """Per-bucket counts (the last above every bound) -> Prometheus' cumulative (le, count) pairs."""
    counts = list(counts or [0] * (len(bounds) + 1))
    out, total = [], 0
    for bound, n in zip(bounds, counts):
        total += n
        out.append((repr(float(bound)), total))
    out.append(("+Inf", total + counts[-1]))
    return out


MAX_CLIENTS = 16          # connections at once; a newcomer beyond resets the oldest silent one
REQUEST_TIMEOUT = 2.0     # seconds a scraper has to send its request, and to read the answer
MAX_REQUEST = 8192        # bytes of a request's head
CACHE = 0.5               # seconds one reading of the workers serves every scrape
METRICS_NAME = "mimbox-metrics"   # the process's name (/proc/PID/comm)
STARTUP_TIMEOUT = 10.0    # seconds the metrics process may take to be confined and serving


class MetricsProcess:
    """/metrics on host:port in a process of its own (the module's docstring) until close()."""

    def __init__(self, address: str, user: str):
        from mimbox.config import parse_hostport
        self.address = address
        host, port = parse_hostport(address, "127.0.0.1")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(64)
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:                                  # the metrics process
            code = 1
            try:
                self.sock.close()
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                keep = {self.listener.fileno(), child.fileno(), 0, 1, 2}
                for fd in os.listdir("/proc/self/fd"):       # nothing of the supervisor's but these
                    if int(fd) not in keep:
                        try:
                            os.close(int(fd))
                        except OSError:
                            pass                  # (EBADF: the listing's own fd, closed with it)
                import ctypes
                ctypes.CDLL(None).prctl(15, METRICS_NAME.encode(), 0, 0, 0)     # PR_SET_NAME: /proc/PID/comm
                from prometheus_client.exposition import generate_latest  # noqa: F401 (imported before seccomp)

                from mimbox.host import privileges
                if user != "root":
                    privileges.drop(user, ())
                else:
                    from mimbox.host.privileges import die_with
                    die_with(parent)
                child.send(b"R")                  # confined: the supervisor may go on
                serve(self.listener, child)
                code = 0
            except BaseException:
                log.exception("metrics process failed")
            finally:
                os._exit(code)
        child.close()
        self.listener.close()
        self.sock.settimeout(STARTUP_TIMEOUT)
        try:
            ready = self.sock.recv(16)
        except OSError:
            ready = b""
        if ready != b"R":
            self.close()
            raise RuntimeError(f"metrics at {address}: its process did not start (see the log)")
        self.sock.setblocking(False)
        self.last, self.answer = -CACHE, b""
        log.info("metrics at http://%s/metrics (process %d)", hostport(host, port), self.pid)

    def fileno(self) -> int:
        return self.sock.fileno()

    def asked(self, snapshots) -> None:
        """The metrics process asks for the workers' counters (readable): answer with snapshots()
        (at most once per CACHE seconds; in between the same answer)."""
        try:
            self.sock.recv(16)                # the request's content is not read: it is a byte
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        now = time.monotonic()
        if now - self.last >= CACHE:
            self.answer = json.dumps(snapshots()).encode()
            self.last = time.monotonic()
        try:
            self.sock.send(self.answer)
        except OSError as e:
            log.debug("metrics: %s", e)

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self.sock.close()


def serve(listener: socket.socket, supervisor: socket.socket) -> None:
    """The metrics process's loop: bounded connections, each with a deadline; a GET of /metrics
    is answered with the workers' counters, anything else with 404 (or 400)."""
    import selectors

    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.registry import CollectorRegistry
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    supervisor.settimeout(10.0)
    sel.register(listener, selectors.EVENT_READ)
    clients: dict[int, list] = {}        # fd -> [sock, request so far, answer left, deadline]

    def scrape() -> bytes:
        supervisor.send(b"?")
        snaps = [(w, s) for w, s in json.loads(supervisor.recv(1 << 22))]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(lambda: snaps))
        return generate_latest(registry)

    def end(fd: int) -> None:
        sel.unregister(clients[fd][0])
        clients.pop(fd)[0].close()

    while True:
        for key, ev in sel.select(timeout=0.5):
            if key.fileobj is listener:
                try:
                    c, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                if len(clients) >= MAX_CLIENTS:      # full: the oldest that has said nothing makes room
                    silent = [(d, fd) for fd, (_, head, out, d) in clients.items() if not head and not out]
                    if not silent:
                        c.close()
                        continue
                    end(min(silent)[1])
                c.setblocking(False)
                clients[c.fileno()] = [c, b"", b"", time.monotonic() + REQUEST_TIMEOUT]
                sel.register(c, selectors.EVENT_READ)
                continue
            fd = key.fileobj.fileno()
            c, head, out, deadline = clients[fd]
            if ev & selectors.EVENT_READ and not out:
                try:
                    data = c.recv(MAX_REQUEST - len(head))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    end(fd)
                    continue
                head += data
                if b"\r\n\r\n" not in head and len(head) < MAX_REQUEST:
                    clients[fd][1] = head
                    continue
                line = head.split(b"\r\n", 1)[0].split()
                if len(line) != 3 or b"\r\n\r\n" not in head:
                    status, body, ctype = b"400 Bad Request", b"bad request\n", b"text/plain"
                elif line[0] != b"GET" or line[1].split(b"?")[0] != b"/metrics":
                    status, body, ctype = b"404 Not Found", b"only /metrics here\n", b"text/plain"
                else:
                    status, body, ctype = b"200 OK", scrape(), CONTENT_TYPE_LATEST.encode()
                out = (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                clients[fd] = [c, head, out, time.monotonic() + REQUEST_TIMEOUT]
                sel.modify(c, selectors.EVENT_WRITE)
            if ev & selectors.EVENT_WRITE and out:
                try:
                    n = c.send(out)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    n, out = 0, b""
                out = out[n:]
                if not out:
                    end(fd)
                    continue
                clients[fd][2] = out
        now = time.monotonic()
        for fd in [fd for fd, (_, _, _, deadline) in clients.items() if now > deadline]:
            end(fd)
