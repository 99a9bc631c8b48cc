"""`mimbox run --metrics HOST:PORT`: the counters of `mimbox stats` at /metrics, in the Prometheus
format, served by prometheus_client from the supervisor (a thread of its own; each scrape asks
every worker, as `mimbox stats` does, so the two agree).

Every counter of a worker's snapshot is a `mimbox_<name>_total` with labels worker and mode;
refusals and errors carry their cause; gauges are what is open now; two histograms (server connect
time, connection duration) come from the core's buckets (mimbox.core CONNECT_BUCKETS_US,
DURATION_BUCKETS_S).
"""
from __future__ import annotations

import logging

from mimbox.core import CONNECT_BUCKETS_US, DURATION_BUCKETS_S

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
    "log_lines_refused": "refusal log lines written", "log_lines_access": "access log lines written",
    "access_log_dropped": "access log lines dropped (too many at once)",
}
GAUGES = {
    "active": "connections relayed now", "pending": "client SYNs held now", "greetings": "convert-mode clients "
    "whose message is awaited", "spares": "server sockets made ahead, now", "pipes_pooled": "empty pipes kept",
    "admitted": "connections admitted now (converter-wide count)", "limit": "the connection limit",
    "fd_capacity": "connections this worker's open-file limit allows",
}


def _family_name(key: str) -> str:
    return "mimbox_" + key


class Collector:
    """prometheus_client's custom-collector protocol: collect() reads the workers at scrape time.
    snapshots: () -> [(worker, snapshot dict)] (mimbox.workers.Supervisor.worker_snapshots)."""

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


class MetricsServer:
    """/metrics on host:port until close()."""

    def __init__(self, address: str, snapshots):
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry

        from mimbox.config import parse_hostport
        self.address = address
        host, port = parse_hostport(address, "127.0.0.1")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(snapshots))
        self.server, self.thread = start_http_server(port, host, registry=self.registry)
        log.info("metrics at http://%s:%d/metrics", host, port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
