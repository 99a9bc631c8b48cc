"""Cost against concurrency — a converter for a city's phones (issue 39).

N concurrent MPTCP client connections (the paper's two client paths; the client adds second subflows as its
path manager allows: the kernel caches show about one subflow a connection at rest), mostly
idle: a 64 B keep-alive every `interval` seconds, echoed by the server, plus a steady trickle of new
1 KB requests (experiments/measure/crowd.py), through each system towards a plain TCP echo server.
Per system and N: what the converter holds (its processes' RSS; socket memory in its namespace,
`ss -m`; MemAvailable and the kernel caches against the router's at the same N), its fds, its CPU
with the crowd idle and per keep-alive and new request, keep-alive and new-request latency
p50/p99/p99.9. The router (the phone speaking MPTCP to an MPTCP server, forwarded) is the baseline
the converters' memory is measured against. The systems: MiMBox (1 and 2 workers, the io_uring engine,
and as many workers as the largest N needs), HAProxy-1t/2t and nginx's stream module with 1 and 2
workers (their listeners made MPTCP by the shim), the paper's naive read()/write() and splice()
converters. Two regimes: end-host-bound (the converter has its own core) up to the largest N, and
converter-bound (each event loop held to CONVERTER_QUOTA_CORES of a core) at `bound_counts`.

One process holds at most ~10,000 converted connections here (the fd hard limit is 20,000 a
process, two sockets a connection; CAP_SYS_RESOURCE is missing): single-process systems stop there
(rows with `stopped` say so, nothing is run past it); MiMBox goes further with more workers, and its
server connections come from SOURCES addresses (--source-address): one address has ~58,000 local ports
towards the one echo server, and connect() slows long before they run out. Each system's capacity
follows the converter host's own hard limit (Capacity), read there.

With `--hosts` (topologies.remotebed) the same points run on real machines: the crowd on the client,
the echo server on the server, the systems on the converter host, whose kernel caches and memory
then hold that converter's connections alone (the router forwards: nothing of it is held there).
The extra source addresses are added to the first client path's interface (its subnet's .11, .12,
...) and to the converter's server-path interface (.51 to .58), and removed when the figure
ends (also on an error or Ctrl-C).
"""
from __future__ import annotations

import ipaddress
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import CONVERTER_QUOTA_CORES, converter_boxes, progress, run_experiment, testbed  # noqa: E402
from experiments.measure import runqueue_wait_s, with_descendants  # noqa: E402
from experiments.style import legend_outside, styles  # noqa: E402
from experiments.systems import HAProxy, MiMBox, Naive, NginxStream, Router, python, ready_line  # noqa: E402
from topologies.regimes import CONVERTER_BOUND, END_HOST_BOUND  # noqa: E402
from topologies.testbed import PaperTopo  # noqa: E402
from topologies.support import ALLOCATE, NotWithin, stop_process, wait_until  # noqa: E402

NAME = "concurrency"
# keep-alives every `interval` s, but at most `keepalive_rate` a second in all: this VM's end hosts (Python
# crowd and echo server, and the kernel's work for both, on 2 cores) saturate near 3,000/s, and a saturated
# generator measures itself (30,000 connections every 10 s gave a p99 of 90 ms through the router alone)
# counts: end-host-bound (the converter has its own core); bound_counts: converter-bound, each system's event
# loops held to CONVERTER_QUOTA_CORES of a core each (experiments.common.converter_boxes), where what a
# converter spends per keep-alive and per new connection shows in the latency
FULL = dict(counts=[1000, 3000, 10000, 30000, 100000], bound_counts=[1000, 10000], interval=10.0,
            keepalive_rate=1000.0, idle_seconds=10.0, new_rate=20.0, new_only_rate=200.0, new_seconds=10.0,
            open_rate=3000.0)
QUICK = dict(counts=[1000, 10000], bound_counts=[1000], interval=10.0, keepalive_rate=1000.0, idle_seconds=5.0,
             new_rate=20.0, new_only_rate=200.0, new_seconds=5.0, open_rate=3000.0)


@dataclass(frozen=True)
class Capacity:
    """How many connections one process of each kind holds under the converter host's per-process
    open-file hard limit (`ulimit -Hn` there; 20,000 on this VM, where CAP_SYS_RESOURCE is missing),
    with room for what else it opens: 2 fds a connection for MiMBox, nginx and read/write (8,800 at
    20,000: mimbox.host.resources reserves the rest), 2.5 for HAProxy (it reserves maxconn / 4 splice
    pipes: 8,800 would need 22,014), 6 for the naive splice converter (two sockets, two pipes)."""
    fd_hard: int

    @property
    def per_process(self) -> int:
        return int(self.fd_hard * 0.44)

    @property
    def haproxy_maxconn(self) -> int:
        return int(self.fd_hard * 0.395)

    @property
    def splice(self) -> int:
        return int(self.fd_hard * 0.165)


HERE = Capacity(20_000)         # this VM's (the results' manifest records each run's own)
# MiMBox's server connections come from these addresses in turn (--source-address): the one echo server
# takes a local port a connection from each (57,977 here), and past half of an address's ports every
# connect() walks the ports in use (the kernel tries even ports first: 95 % of the converter's CPU at
# 30,000 connections from one address). 8 addresses: 100,000 connections use a quarter of each
SOURCES = 8


def subnet_hosts(subnet: str, first: int, n: int) -> list[str]:
    """n host addresses of `subnet` (a path's, "10.0.1.0/24"), from its `first`th on."""
    net = ipaddress.ip_network(subnet, strict=False)
    return [str(net[first + k]) for k in range(n)]


def source_addresses(subnet: str) -> list[str]:
    """The converter's SOURCES addresses on its server side's subnet (.51 on; the server has .1)."""
    return subnet_hosts(subnet, 51, SOURCES)


def systems(counts: list[int], sources: list[str] = (), many_workers: bool = True, only=None,
            cpus: str = "1", cap: Capacity = HERE) -> list:
    """The systems measured, each with how many connections it can hold here (None: no limit) and why:
    [(system, capacity, what caps it)]. many_workers: MiMBox with as many workers as the largest count
    needs too (the end-host-bound pass; held to a quota per worker it would only repeat mimbox-2w).
    only: these names alone (a parameter of the run: e.g. repeating one comparison; the router is the
    memory baseline and is always kept). cpus: the converter's cores; cap: its host's Capacity."""
    out = _all_systems(counts, sources, many_workers, cpus, cap)
    if only:
        unknown = set(only) - {s.name for s, _, _ in out}
        if unknown:
            raise ValueError(f"concurrency: no system {', '.join(sorted(unknown))} "
                             f"(its systems: {', '.join(s.name for s, _, _ in out)})")
        out = [x for x in out if x[0].name in only or isinstance(x[0], Router)]
    return out


def _all_systems(counts: list[int], sources: list[str], many_workers: bool, cpus: str, cap: Capacity) -> list:
    fds = f"open-file limit: {cap.fd_hard} a process"
    per, maxconn = cap.per_process, cap.haproxy_maxconn
    out = [(Router(), None, "")]
    mimboxes = [("mimbox-1w", dict(workers=1)), ("mimbox-2w", dict(workers=2)),
                ("mimbox-uring", dict(workers=1, engine="uring"))]
    if many_workers:
        big = max(3, math.ceil(max(counts) / per))
        mimboxes.append((f"mimbox-{big}w", dict(workers=big)))
    for name, kw in mimboxes:
        m = MiMBox(mode="static", cpus=cpus,
                   extra=["--idle-timeout", "0", *(f"--source-address={a}" for a in sources)], **kw)
        m.name = name
        out.append((m, per * kw["workers"], f"{fds}, 2 a connection"))
    for threads in (1, 2):      # (HAProxy reserves fds for maxconn / 4 splice pipes too: 2.5 fds a connection)
        out.append((HAProxy(threads=threads, mode="tcp", cpus=cpus, maxconn=maxconn),
                    maxconn, f"{fds}, 2.5 a connection (maxconn {maxconn})"))
    for workers in (1, 2):      # one listener a worker (reuseport), each worker its own open-file limit
        out.append((NginxStream(workers=workers, cpus=cpus), per * workers,
                    f"{fds} (each worker's), 2 a connection"))
    out.append((Naive("readwrite", cpus=cpus), per, f"{fds}, 2 a connection"))
    out.append((Naive("splice", cpus=cpus), cap.splice, f"{fds}, 6 a connection (two sockets, two pipes)"))
    return out


def meminfo(host) -> int:
    """MemAvailable, bytes (the kernel is shared: every namespace's sockets count)."""
    return int(host.cmd("grep MemAvailable /proc/meminfo").split()[1]) * 1024


def slabs(host) -> dict[str, int]:
    """Bytes held by each kernel cache (active objects x object size). Not MemAvailable: a cache
    keeps the pages of freed objects for the next ones, so an earlier run's sockets hide this one's."""
    out = {}
    for line in host.cmd("cat /proc/slabinfo").splitlines()[2:]:
        f = line.split()
        if len(f) > 3 and f[1].isdigit():
            out[f[0]] = int(f[1]) * int(f[3])
    return out


SUM_SKMEM = ("{ ss -tanmH; ss -ManmH 2>/dev/null; } | grep -o 'skmem:([^)]*)' | awk -F'[(),]' "
             "'{for (i = 2; i <= NF; i++) {if ($i ~ /^[rtfwo][0-9]+$/) s += substr($i, 2); "
             "else if ($i ~ /^bl[0-9]+$/) s += substr($i, 3)} n++} END {print n + 0, s + 0}'")


def socket_memory(host) -> tuple[int, int]:
    """(sockets, bytes their buffers hold: skmem r+t+f+w+o+bl) of the TCP sockets (subflows included)
    and MPTCP sockets in host's namespace (summed there: 300,000 sockets' lines stay on the host)."""
    n, total = host.cmd(SUM_SKMEM).split()[:2]
    return int(n), int(total)


def process_memory(host, pids: list[int]) -> tuple[int, int]:
    """(RSS bytes, open fds) of `pids` on `host`, MiMBox's keepers left out (they share their
    worker's fds and pages); read there, in one command."""
    from mimbox.converter.core import KEEPER_NAME
    if not pids:
        return 0, 0
    script = "; ".join(f'echo "@$(cat /proc/{p}/comm 2>/dev/null)|$(grep VmRSS /proc/{p}/status 2>/dev/null)|'
                       f'$(ls /proc/{p}/fd 2>/dev/null | wc -l)"' for p in pids)
    rss = fds = 0
    for line in host.cmd(script).splitlines():
        f = line.removeprefix("@").split("|")            # comm | VmRSS:  N kB | fds
        if len(f) == 3 and f[0] != KEEPER_NAME and f[1].split()[1:2]:
            rss += int(f[1].split()[1]) * 1024
            fds += int(f[2])
    return rss, fds


# kernel caches that are not the connections': /proc's inodes, made by whoever lists /proc/PID/fd (0.67 KB an
# fd, measured here; this harness counts fds that way, others may too) and kept until memory is short
NOT_CONNECTIONS = ("proc_inode_cache",)


def kernel_kb(caches: dict[str, float]) -> dict[str, float]:
    """From the caches' growth per connection (bytes): what the kernel holds for a connection (KB), and
    apart, the /proc inodes (KB) that listing the processes' fds made meanwhile."""
    return {"kernel_kb_per_conn": sum(v for c, v in caches.items() if c not in NOT_CONNECTIONS) / 1024,
            "proc_inode_kb_per_conn": sum(caches.get(c, 0) for c in NOT_CONNECTIONS) / 1024}


def established(host, port: int) -> int:
    """Connections the echo server holds on `port` (its TCP sockets; an MPTCP one counts its subflows)."""
    return int(host.cmd(f"ss -tnH state established '( sport = :{port} )' | wc -l").strip() or 0)


def mptcp_sockets(host) -> int:
    """MPTCP sockets alive in the whole kernel (its caches' active objects): a run's connections are
    closed and freed when this falls back. Until then their tokens fill the kernel's token table, and
    the next run's connections fall back to TCP (an earlier run killed mid-way did that to 776 of 1,000)."""
    return sum(int(line.split()[1]) for line in host.cmd("grep -E '^MPTCP(v6)? ' /proc/slabinfo").splitlines())


def mptcp_sockets_of(tb) -> int:
    """mptcp_sockets() of the testbed's kernels: this machine's one (every namespace's), or with
    --hosts each host's (the client's, the converter's, the server's)."""
    if getattr(tb, "remote", False):
        return sum(mptcp_sockets(h) for h in (tb.client, tb.mbox, tb.server))
    return mptcp_sockets(tb.mbox)


def fd_hard_limit(host) -> int:
    """The per-process open-file hard limit of the processes `host` starts (`ulimit -Hn` there)."""
    out = host.cmd("ulimit -Hn").strip()
    return int(out) if out.isdigit() else 1 << 20          # "unlimited"


def keepalive_interval(n: int, params: dict) -> float:
    """`interval`, or longer where n connections would send more than `keepalive_rate` a second."""
    return max(params["interval"], round(n / params["keepalive_rate"], 1))


def fallbacks(host) -> int:
    """MPTCP connections of host's namespace that fell back to TCP for want of a token (the kernel's
    token table: shared by every namespace of this VM, the client's and the converter's alike)."""
    lines = [x.split() for x in host.cmd("cat /proc/net/netstat").splitlines() if x.startswith("MPTcpExt:")]
    return int(dict(zip(lines[0][1:], lines[1][1:])).get("MPFallbackTokenInit", 0)) if len(lines) >= 2 else 0


def percentile(values: list[int], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] / 1000.0          # µs -> ms


def _point(tb, system, regime: str, n: int, ports: tuple[int, int], params: dict) -> tuple[dict, dict]:
    """One system holding n connections: its row and the kernel caches' deltas."""
    tcp_port, mptcp_port = ports
    host, port = system.endpoint(tb, mptcp_port if isinstance(system, Router) else tcp_port)
    served_port = mptcp_port if isinstance(system, Router) else tcp_port
    before = established(tb.server, served_port)
    sources = [f"--source={a}" for a in params["sources"]]
    # the crowd on the end hosts' core with the echo server (as wrk in Fig. 5): the converter's core is its own
    import tempfile
    err = tempfile.TemporaryFile()               # the crowd's tracebacks, if any, into the row
    crowd = tb.client.popen(["taskset", "-c", tb.cpus("client"), python(tb.client), "-m", "experiments.measure.crowd",
                             "client", host, str(port), str(n),
                             "--open-rate", str(params["open_rate"]), *sources],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
    row = dict(regime=regime, system=system.name, connections=n)
    poll = 0.5 if n > 10_000 else 0.1       # (ss over 300,000 sockets takes a while: not 10 times a second)
    try:
        _readline(crowd, 60)                    # its processes run: what they hold is in both readings
        pids = system.box.pids() if system.box is not None else []
        rss0, fds0 = process_memory(tb.mbox, pids)       # (before the caches: listing fds makes /proc inodes)
        mem0, slab0 = meminfo(tb.mbox), slabs(tb.mbox)
        fb0 = fallbacks(tb.client)
        crowd.stdin.write("open\n")
        crowd.stdin.flush()
        opened = json.loads(_readline(crowd, n / params["open_rate"] + 120))
        opened.setdefault("open", 0)
        opened.setdefault("failed", opened.get("errors", {}))
        row.update(opened=opened["open"], open_failed=sum(opened["failed"].values()), open_s=opened["seconds"])
        wait_until(lambda: established(tb.server, served_port) - before >= opened["open"], 120,
                   f"{system.name}: the server holding {opened['open']} connections", every=poll)
        pids = system.box.pids() if system.box is not None else []
        mem1, slab1 = meminfo(tb.mbox), slabs(tb.mbox)
        rss1, fds1 = process_memory(tb.mbox, pids)
        sockets, sockmem = socket_memory(tb.mbox)
        k = max(1, opened["open"])
        caches = {c: (slab1.get(c, 0) - slab0.get(c, 0)) / k for c in set(slab0) | set(slab1)}
        caches = {c: round(v) for c, v in caches.items() if abs(v) >= 16}     # bytes a connection
        row.update(**kernel_kb(caches),
                   memavail_kb_per_conn=(mem0 - mem1) / k / 1024, rss_kb_per_conn=(rss1 - rss0) / k / 1024,
                   fds=fds1, fds_per_conn=(fds1 - fds0) / k, sockets_in_converter_ns=sockets,
                   sockmem_kb_per_conn=sockmem / k / 1024)
        cpu0 = system.cpu_s()
        time.sleep(params["idle_seconds"])         # a measurement window: the crowd sends nothing
        row["idle_cpu_pct"] = 100 * (system.cpu_s() - cpu0) / params["idle_seconds"]
        cpu0 = system.cpu_s()
        only_new = _measure(crowd, params["new_seconds"], 1e9, params["new_only_rate"])
        cpu_new = (system.cpu_s() - cpu0) / max(1, len(only_new["new_us"]))
        interval = keepalive_interval(opened["open"], params)
        cpu0 = system.cpu_s()
        # who waited for a CPU while the keep-alives ran: the end hosts (crowd and echo server, one core
        # here; each its own host with --hosts) or the converter (its box's processes)
        ends = [(tb.client, with_descendants([crowd.pid], tb.client)),
                (tb.server, with_descendants(params["echo_pids"], tb.server))]
        conv = system.box.pids() if system.box is not None else []
        waits = lambda: (sum(runqueue_wait_s(p, h) for h, p in ends), runqueue_wait_s(conv, tb.mbox))  # noqa: E731
        wait0, t0 = waits(), time.monotonic()
        m = _measure(crowd, interval, interval, params["new_rate"])      # every connection's keep-alive once
        cpu = system.cpu_s() - cpu0
        window = time.monotonic() - t0
        wait1 = waits()
        row.update(end_hosts_runq_wait_ms_per_s=1e3 * (wait1[0] - wait0[0]) / window,
                   converter_runq_wait_ms_per_s=1e3 * (wait1[1] - wait0[1]) / window)
        kas, news = m.get("keepalive_us", []), m.get("new_us", []) + only_new.get("new_us", [])
        errs = {**only_new.get("errors", {}), **m.get("errors", {})}
        row.update(keepalive_interval_s=interval, mptcp_fallbacks=fallbacks(tb.client) - fb0,
                   keepalives=len(kas), new_requests=len(news), errors=sum(errs.values()), error_kinds=json.dumps(errs),
                   cpu_us_per_new=1e6 * cpu_new,
                   cpu_us_per_keepalive=1e6 * max(0.0, cpu - cpu_new * len(m.get("new_us", []))) / max(1, len(kas)),
                   **{f"keepalive_p{q}_ms": percentile(kas, v) for q, v in (("50", .5), ("99", .99), ("99.9", .999))},
                   **{f"new_p{q}_ms": percentile(news, v) for q, v in (("50", .5), ("99", .99), ("99.9", .999))})
        if isinstance(system, MiMBox):
            row["timer_visits"] = system.stats().get("timer_visits")
        progress(f"concurrency {regime} {system.name} N={n}: kernel caches {row['kernel_kb_per_conn']:.1f} KB/conn "
                 f"(MemAvailable {row['memavail_kb_per_conn']:.1f}), "
                 f"RSS {row['rss_kb_per_conn']:.2f} KB/conn, idle CPU {row['idle_cpu_pct']:.2f} %, "
                 f"keep-alive p99 {row['keepalive_p99_ms']:.2f} ms (every {interval:g} s; run-queue wait a second: "
                 f"end hosts {row['end_hosts_runq_wait_ms_per_s']:.0f} ms, converter {row['converter_runq_wait_ms_per_s']:.0f} ms), "
                 f"errors {row['error_kinds']}, "
                 f"MPTCP fallbacks {row['mptcp_fallbacks']}")
    finally:
        t_close = time.monotonic()
        crowd.stdin.close()
        try:
            crowd.wait(timeout=120)
        except subprocess.TimeoutExpired:
            crowd.kill()
            crowd.wait(timeout=30)
        # (100,000 MPTCP connections take a while to close: the next point must not start beside them)
        try:
            wait_until(lambda: established(tb.server, served_port) <= before, 120 + n / 200,
                       f"{system.name}: the server's connections closed", every=poll)
            wait_until(lambda: mptcp_sockets_of(tb) <= params["mptcp_base"] + 500, 120 + n / 200,
                       f"{system.name}: the MPTCP sockets freed", every=poll)
            row["close_s"] = round(time.monotonic() - t_close, 1)
        except NotWithin as e:
            row["close_problem"] = str(e)[:200]       # (problems() says so; the measurement stands)
        err.seek(0)
        said = err.read().decode(errors="replace").strip()
        err.close()
        if said:
            row["crowd_stderr"] = said[-400:]
    return row, caches


def _readline(p, timeout: float) -> str:
    """The next line of the crowd (or the echo server); RuntimeError if none within `timeout`."""
    line = ready_line(p, timeout)
    if not line:
        p.kill()
        raise RuntimeError(f"concurrency: no answer from the crowd within {timeout:.0f}s (or it exited)")
    return line


def _measure(crowd, seconds: float, interval: float, new_rate: float) -> dict:
    crowd.stdin.write(f"measure {seconds} {interval} {new_rate}\n")
    crowd.stdin.flush()
    return json.loads(_readline(crowd, seconds + 120))


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    rows, caches = [], []
    procs = max(2, math.ceil(max(params["counts"]) / 9000) + 1)
    with testbed(PaperTopo(ipv6=False)) as tb:
        remote = getattr(tb, "remote", False)
        # a remote server's ports are the preflight's (topologies.lab.Needs): 80 and 81 are Fig. 5's
        tcp_port, mptcp_port = (80, 81) if remote else (ALLOCATE.port(), ALLOCATE.port())
        cap = Capacity(fd_hard_limit(tb.mbox))
        servers = [tb.server.popen(["taskset", "-c", tb.cpus("server"), python(tb.server), "-m",
                                    "experiments.measure.crowd", "server", str(p), "--procs", str(procs),
                                    *(["--mptcp"] if p == mptcp_port else [])],
                                   stdout=subprocess.PIPE, text=True) for p in (tcp_port, mptcp_port)]
        # one source address per crowd process (~30,000 ports each towards one server port; 100,000 need
        # several), on the first path's subnet; the converter's own towards the server (SOURCES)
        first, toward = tb.topo.client_addrs[0], tb.topo.server_addrs[0]
        params["sources"] = subnet_hosts(first.subnet, 11, procs)
        params["converter_sources"] = source_addresses(toward.subnet)
        params["echo_pids"] = [s.pid for s in servers]
        plen = lambda a: ipaddress.ip_network(a.subnet, strict=False).prefixlen  # noqa: E731
        added = [(tb.client, f"{a}/{plen(first)} dev {first.intf_outer}") for a in params["sources"]] + \
                [(tb.mbox, f"{a}/{plen(toward)} dev {toward.intf_mbox}") for a in params["converter_sources"]]
        try:
            for host, addr in added:
                host.cmd(f"ip addr add {addr}")
            for s in servers:
                if _readline(s, 60).strip() != "ready":
                    raise RuntimeError("concurrency: the echo server did not start")
            # an earlier run's sockets still closing would fill the kernel's token table
            params["mptcp_base"] = wait_until(lambda: (lambda k: (k,) if k < 2000 else None)(mptcp_sockets_of(tb)),
                                              300, "MPTCP sockets of an earlier run freed", every=1.0)[0]
            for regime, counts in ((END_HOST_BOUND, params["counts"]), (CONVERTER_BOUND, params["bound_counts"])):
                for system, capacity, why in systems(counts, params["converter_sources"],
                                                     many_workers=regime == END_HOST_BOUND, only=params.get("only"),
                                                     cpus=tb.cpus("mbox"), cap=cap):
                    _system_points(tb, system, regime, (capacity, why), counts, (tcp_port, mptcp_port), params,
                                   rows, caches)
        finally:
            for s in servers:
                stop_process(s, grace=30)
            for host, addr in added if remote else []:    # (a Mininet host's go with its namespace)
                host.cmd(f"ip addr del {addr}")
            params.pop("echo_pids", None)           # (this run's, nothing for the manifest)
    df = pd.DataFrame(rows)
    return df, {"caches": caches, "regimes": {END_HOST_BOUND: "the converter's own core, no quota",
                                              CONVERTER_BOUND: f"{CONVERTER_QUOTA_CORES} of a core per event loop"},
                "fd_hard_limit": cap.fd_hard, "converter_cpus": tb.cpus("mbox"), "echo_server_processes": procs}


def _system_points(tb, system, regime: str, limit: tuple[int | None, str], counts: list[int],
                   ports: tuple[int, int], params: dict, rows: list, caches: list) -> None:
    """One system at each of `counts` in `regime`, in its CPU box, started once. limit: (how many
    connections it holds here, None: no limit; what caps it): a count past it gets a `stopped` row
    saying so, and a point that fails ends the system's run."""
    capacity, cap = limit
    tcp_port, mptcp_port = ports
    with converter_boxes([system], regime, host=tb.mbox):
        started = False
        for n in counts:
            if capacity is not None and n > capacity:
                rows.append(dict(regime=regime, system=system.name, connections=n,
                                 stopped=f"{cap} (holds ~{capacity:,})"))
                progress(f"concurrency {regime} {system.name} N={n}: not run ({rows[-1]['stopped']})")
                continue
            if not started:
                system.start(tb, mptcp_port if isinstance(system, Router) else tcp_port)
                started = True
            try:
                row, cache = _point(tb, system, regime, n, ports, params)
            except (RuntimeError, NotWithin) as e:
                rows.append(dict(regime=regime, system=system.name, connections=n, stopped=str(e)[:200]))
                progress(f"concurrency {regime} {system.name} N={n}: {e}")
                break
            rows.append(row)
            caches.append(dict(regime=regime, system=system.name, connections=n, **cache))
        if started:
            system.stop()


def with_regime(df: pd.DataFrame) -> pd.DataFrame:
    """df with its `regime` column (a run before the converter-bound pass was end-host-bound only)."""
    df = df.copy()
    df["regime"] = df["regime"].fillna(END_HOST_BOUND) if "regime" in df else END_HOST_BOUND
    return df


def attributable(df: pd.DataFrame) -> pd.DataFrame:
    """Per regime, system and N, what the converter adds per connection (KB): the kernel caches beside
    the router's at the same N in the same regime (the converter's sockets; its server side is TCP where
    the router's echo server is MPTCP), its processes' RSS and its sockets' buffers; and MemAvailable's
    view, the same way."""
    df = with_regime(df)
    ran = df[df["kernel_kb_per_conn"].notna()] if "kernel_kb_per_conn" in df else df.iloc[0:0]
    router = ran[ran["system"] == "router"].set_index(["regime", "connections"])
    out = ran[ran["system"] != "router"].copy()
    beside = lambda col: out.apply(  # noqa: E731
        lambda r: router[col].get((r["regime"], r["connections"]), float("nan")), axis=1) if len(out) else []
    out["kernel_beside_router_kb"] = out["kernel_kb_per_conn"] - beside("kernel_kb_per_conn")
    out["memavail_beside_router_kb"] = out["memavail_kb_per_conn"] - beside("memavail_kb_per_conn")
    out["attributable_kb_per_conn"] = out["kernel_beside_router_kb"] + out["rss_kb_per_conn"] + out["sockmem_kb_per_conn"]
    return out


def findings(df: pd.DataFrame) -> dict:
    att = attributable(df)
    out = {}
    for r in att.itertuples():
        out.setdefault(r.regime, {}).setdefault(r.system, {})[int(r.connections)] = {
            "attributable_kb_per_conn": round(r.attributable_kb_per_conn, 2), "rss_kb_per_conn": round(r.rss_kb_per_conn, 3),
            "sockmem_kb_per_conn": round(r.sockmem_kb_per_conn, 3), "idle_cpu_pct": round(r.idle_cpu_pct, 3),
            "keepalive_p99_ms": round(r.keepalive_p99_ms, 3), "new_p99_ms": round(r.new_p99_ms, 3),
            "cpu_us_per_keepalive": round(r.cpu_us_per_keepalive, 1), "cpu_us_per_new": round(r.cpu_us_per_new, 1),
            "kernel_beside_router_kb": round(r.kernel_beside_router_kb, 2), "mptcp_fallbacks": int(r.mptcp_fallbacks)}
    df = with_regime(df)
    stopped = df[df["stopped"].notna()] if "stopped" in df else df.iloc[0:0]
    return {"per_system": out,
            "stopped": {f"{r.regime} {r.system} N={r.connections}": r.stopped for r in stopped.itertuples()}}


def problems(df: pd.DataFrame) -> list[str]:
    df = with_regime(df)
    ran = df[df["opened"].notna()] if "opened" in df else df.iloc[0:0]
    out = [f"{r.regime} {r.system} N={r.connections}: {r.open_failed} connections failed to open"
           for r in ran.itertuples() if r.open_failed]
    out += [f"{r.regime} {r.system} N={r.connections}: {r.errors} errors ({r.error_kinds})"
            for r in ran.itertuples() if r.errors]
    if "close_problem" in df:
        out += [f"{r.regime} {r.system} N={r.connections}: {r.close_problem}"
                for r in df[df["close_problem"].notna()].itertuples()]
    return out


def plot(df: pd.DataFrame):
    df = with_regime(df)
    att = attributable(df)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.2))
    names = list(dict.fromkeys(df["system"]))
    st = styles(names)
    eh, cb = END_HOST_BOUND, CONVERTER_BOUND
    panels = ((axes[0][0], eh, "attributable_kb_per_conn", "memory per connection beside the router's (KB)", att),
              (axes[0][1], eh, "keepalive_p99_ms", "keep-alive RTT p99 (ms)", df),
              (axes[0][2], eh, "idle_cpu_pct", "CPU with the crowd idle (% of a core)", df),
              (axes[1][0], eh, "cpu_us_per_keepalive", "CPU per keep-alive (µs)", df),
              (axes[1][1], cb, "keepalive_p99_ms", "keep-alive RTT p99 (ms)", df),
              (axes[1][2], cb, "new_p99_ms", "new 1 KB request p99 (ms)", df))
    for ax, regime, col, label, data in panels:
        ax.set_title(regime, fontsize=8)
        if col not in data:
            continue
        for name in names:
            if name == "router" and col.startswith(("cpu", "idle")):
                continue          # (forwarding runs in the kernel's softirqs: no process to account)
            g = data[(data["regime"] == regime) & (data["system"] == name) & data[col].notna()]
            g = g.sort_values("connections")
            if len(g):
                ax.plot(g["connections"], g[col], label=name, **st[name])
        ax.set_xscale("log")
        if col.endswith("_ms"):
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("concurrent MPTCP connections")
        ax.set_ylabel(label)
        ax.grid(alpha=.3, which="both")
    legend_outside(fig, axes.flat)
    fig.suptitle("Cost against concurrency: mostly idle phones (64 B every 10 s) and a trickle of new requests; "
                 f"converter-bound: {CONVERTER_QUOTA_CORES} of a core per event loop", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this figure (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
