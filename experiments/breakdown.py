"""Where Table 1's microseconds go: the SYN and the data segment through MiMBox and through the
paper's read()/write() converter, cut into phases by kernel probes (bpftrace) and the wire (tcpdump).

Table 1's workload (one connection at a time, one 1300-byte burst each, one client path). For each
segment arriving on the converter host (client-side capture, t0) the first event of each kind after
it, on the converter's process, gives the phases:

  MiMBox, held SYN   wire in -> the epoll_wait that reported the queue returns (netfilter, NFQUEUE,
                     wake-up; this kernel lets bpftrace attach neither a kprobe nor a kfunc to
                     nfqnl_enqueue_packet) -> the queue's recv() entered (the loop) -> it returns
                     (the read itself) -> connect() entered (the core, in C: parse
                     DST_OPT, policy, gate; the server socket is a spare made while the loop was
                     idle, so socket() and setsockopt are off this path -- a SYN that found no
                     spare is counted apart, `socket_on_path`) -> SYN on the server-side wire
  read()/write() SYN wire in -> the client's ACK in (the kernel's handshake with the client: SYN+ACK
                     out, the client's ACK back) -> epoll_wait returns -> accept() returns
                     -> socket() entered (Python: create_connection resolves the address)
                     -> connect() entered -> SYN on the wire
  data (both)        wire in -> epoll_wait returns -> write() or send() entered (read, relay: MiMBox's
                     core in C, the read()/write() converter in Python) -> segment on the wire

bpftrace timestamps are CLOCK_MONOTONIC, the captures' CLOCK_REALTIME: the offset is read once
before the run. Both idle regimes (halt, poll) as in Table 1.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from bisect import bisect_left, bisect_right

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import CONVERTER_CPUS, END_HOST_CPUS, progress, run_experiment  # noqa: E402
from experiments.delay import BURST_CLIENT, SINK, _Halt, bursts, poll_ns, read_pcap  # noqa: E402
from experiments.systems import MiMBox, Naive, run_dir  # noqa: E402
from topologies.regimes import POLL, IdlePolling, haltpoll_now  # noqa: E402
from topologies.support import NotWithin, wait_until  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

NAME = "table1_breakdown"
FULL = dict(measures=100, interval=0.1, idle=["halt", "poll"])
QUICK = dict(measures=30, interval=0.05, idle=["halt", "poll"])

PROBES = """
tracepoint:syscalls:sys_exit_epoll_wait /pid == $1/ { printf("wake %d %llu\\n", tid, nsecs); }
tracepoint:syscalls:sys_enter_recvfrom /pid == $1/ { printf("recv_in %d %llu\\n", tid, nsecs); }
tracepoint:syscalls:sys_exit_recvfrom /pid == $1/ { printf("recv %d %llu\\n", tid, nsecs); }
tracepoint:syscalls:sys_exit_accept4 /pid == $1/ { printf("accept %d %llu\\n", tid, nsecs); }
tracepoint:syscalls:sys_enter_socket /pid == $1/ { printf("socket %d %llu\\n", tid, nsecs); }
tracepoint:syscalls:sys_enter_connect /pid == $1/ { printf("connect %d %llu\\n", tid, nsecs); }
tracepoint:syscalls:sys_enter_write /pid == $1/ { printf("write %d %llu\\n", tid, nsecs); }
tracepoint:syscalls:sys_enter_sendto /pid == $1/ { printf("write %d %llu\\n", tid, nsecs); }
"""
PHASES = {
    ("mimbox", "SYN"): ["NFQUEUE + wake-up", "loop to the read", "read the queue (recv)",
                        "core (parse, policy, a spare socket)", "kernel send"],
    ("read/write", "SYN"): ["handshake with the client", "wake-up", "accept", "Python (resolve, socket)",
                            "socket, setsockopt", "kernel send"],
    ("mimbox", "data"): ["wake-up", "core (read, relay)", "kernel send"],
    ("read/write", "data"): ["wake-up", "Python (read, relay)", "kernel send"],
}


def _after(times: list[int], t: int) -> int | None:
    i = bisect_left(times, t)
    return times[i] if i < len(times) else None


def _before(times: list[int], t: int | None) -> int | None:
    """The last of `times` at or before t."""
    if t is None:
        return None
    i = bisect_right(times, t)
    return times[i - 1] if i else None


def phases(system: str, segment: str, t0: int, ev: dict[str, list[int]], wire: dict[str, list[int]]) -> list[float]:
    """The phase lengths (µs) of one segment that arrived at t0 (ns, monotonic), or [] if incomplete."""
    if segment == "SYN" and system == "mimbox":
        # the queue's read: the first recv() to return after the SYN arrived; the wake-up that led to
        # it is the last epoll_wait() to return before that recv() began (with busy polling, the ones
        # between the SYN and it found the queue still empty: the kernel's NFQUEUE work)
        out = _after(wire["syn_out"], t0)
        recv_out = _after(ev["recv"], t0)
        recv_in = _before(ev["recv_in"], recv_out)
        marks = [t0, _before(ev["wake"], recv_in), recv_in, recv_out]
        marks.append(_after(ev["connect"], recv_out) if recv_out is not None else None)
    elif segment == "SYN":
        out = _after(wire["syn_out"], t0)
        marks = [t0, _after(wire["ack_in"], t0)]
        for kind in ("wake", "accept", "socket", "connect"):
            marks.append(_after(ev[kind], marks[-1]) if marks[-1] is not None else None)
    else:
        out = _after(wire["data_out"], t0)
        marks = [t0, _after(ev["wake"], t0)]
        marks.append(_after(ev["write"], marks[-1]) if marks[-1] is not None else None)
    marks.append(out)
    if any(m is None for m in marks) or any(b < a for a, b in zip(marks, marks[1:])):
        return []
    return [(b - a) / 1e3 for a, b in zip(marks, marks[1:])]


def socket_on_path(t0: int, ev: dict[str, list[int]]) -> bool:
    """Whether MiMBox made this held SYN's server socket between reading the queue and connect()
    (no spare was left), rather than taking one made while idle."""
    wake = _after(ev["wake"], t0)
    recv = _after(ev["recv"], wake) if wake is not None else None
    if recv is None:
        return False
    connect, sock = _after(ev["connect"], recv), _after(ev["socket"], recv)
    return connect is not None and sock is not None and sock < connect


@contextlib.contextmanager
def tracefs():
    """bpftrace's tracepoints need tracefs; mount it for the run if it is not, and unmount it after."""
    path = "/sys/kernel/tracing"
    mounted = not os.path.ismount(path)
    if mounted:
        subprocess.run(["mount", "-t", "tracefs", "nodev", path], check=True)
    try:
        yield
    finally:
        if mounted:
            subprocess.run(["umount", path])


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    rows, idle_settings = [], {}
    with tracefs(), Testbed(PaperTopo()) as tb:
        tb.client.cmd("ip mptcp endpoint flush")      # one path, as Table 1
        d = run_dir("breakdown")
        client_py, sink_py = os.path.join(d, "burst_client.py"), os.path.join(d, "sink.py")
        for path, text in ((client_py, BURST_CLIENT), (sink_py, SINK)):
            with open(path, "w") as f:
                f.write(text)
        probes = os.path.join(d, "probes.bt")
        with open(probes, "w") as f:
            f.write(PROBES)
        for idle in params["idle"]:
            with IdlePolling(poll_ns(params)) if idle == POLL else _Halt() as regime:
                idle_settings[idle] = regime.describe()
                if idle == POLL and not regime.active:
                    continue
                for name, system in (("mimbox", MiMBox(mode="explicit", cpus=CONVERTER_CPUS, syn_path="hold")),
                                     ("read/write", Naive("readwrite", cpus=CONVERTER_CPUS))):
                    rows += _measure(tb, d, client_py, sink_py, probes, name, system, idle, params)
        idle_settings["after"] = haltpoll_now()
    return pd.DataFrame(rows), {"idle": idle_settings, "probes": PROBES.strip().splitlines()}


def process_tree(pid: int) -> list[int]:
    """pid and its descendants, now (/proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


@contextlib.contextmanager
def bpftrace(probes: str, trace: str, system):
    """bpftrace on `system`'s first process, writing to `trace`, from attached to stopped; on the end
    hosts' core, away from the converter's."""
    pids = process_tree(system.procs[0].pid)       # (MiMBox's workers are its children)
    with open(probes) as f:
        text = f.read().replace("/pid == $1/", "/" + " || ".join(f"pid == {p}" for p in pids) + "/")
    bt = subprocess.Popen(["taskset", "-c", END_HOST_CPUS, "bpftrace", "-e", text],
                          stdout=open(trace, "w"), stderr=subprocess.PIPE, text=True)
    try:
        def attached() -> bool:
            if bt.poll() is not None:
                raise RuntimeError(f"bpftrace: {bt.stderr.read()[-800:]}")
            return "Attaching" in open(trace).read()
        try:
            wait_until(attached, 30, "bpftrace attached", every=0.1)
        except NotWithin:
            pass              # (as before: the run goes on; the breakdown then lacks what it missed)
        yield
    finally:
        bt.send_signal(2)
        bt.wait(timeout=30)


def _measure(tb, d, client_py, sink_py, probes, name, system, idle, params) -> list[dict]:
    tag = f"{idle}-{name.replace('/', '')}"
    trace = os.path.join(d, f"{tag}-trace.txt")
    offset = time.time_ns() - time.monotonic_ns()
    pc, ps = bursts(tb, d, client_py, sink_py, name, system, tag, False, params,
                    tracer=lambda s: bpftrace(probes, trace, s))
    ev: dict[str, list[int]] = {"wake": [], "recv_in": [], "recv": [], "accept": [], "socket": [], "connect": [],
                                "write": []}
    seen = []                                     # (kind, thread id, ns)
    for line in open(trace):
        parts = line.split()
        if len(parts) == 3 and parts[0] in ev and parts[1].isdigit() and parts[2].isdigit():
            seen.append((parts[0], int(parts[1]), int(parts[2])))
    # the thread that connects to the server is the converter's loop (MiMBox: the worker's core, not its
    # supervisor or another thread)
    connects = [p for kind, p, _ in seen if kind == "connect"]
    main = max(set(connects), key=connects.count) if connects else None
    for kind, p, t in seen:
        if p == main:
            ev[kind].append(t)
    for v in ev.values():
        v.sort()
    mono = (lambda t: int(t * 1e9) - offset)
    cside, sside = read_pcap(pc), read_pcap(ps)
    wire = {"syn_out": sorted(mono(p["time"]) for p in sside if p["flags"] == "S"),
            "ack_in": sorted(mono(p["time"]) for p in cside if p["flags"] == "A" and p["payload"] == 0),
            "data_out": sorted(mono(p["time"]) for p in sside if p["payload"] == 1300)}
    rows = []
    for seg, t0s in (("SYN", [mono(p["time"]) for p in cside if p["flags"] == "S"]),
                     ("data", [mono(p["time"]) for p in cside if p["payload"] == 1300])):
        for i, t0 in enumerate(t0s):
            ph = phases(name, seg, t0, ev, wire)
            made = name == "mimbox" and seg == "SYN" and socket_on_path(t0, ev)
            for phase, us in zip([*PHASES[(name, seg)], "total"], [*ph, sum(ph)] if ph else []):
                rows.append(dict(idle=idle, system=name, segment=seg, i=i, phase=phase, us=us, socket_on_path=made))
    if not rows:
        progress("breakdown: bpftrace said: " + open(trace).read()[:600])
    progress(f"breakdown {idle} {name}: {len(rows)} phase rows (events: "
             + ", ".join(f"{k} {len(v)}" for k, v in {**ev, **wire}.items()) + ")")
    return rows


def problems(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return ["no segment could be cut into phases (bpftrace saw none of the converter's system calls)"]
    return []


def tables(df: pd.DataFrame) -> dict:
    """Median µs per phase (medians: one late wake-up should not move a phase's typical cost)."""
    t = df.groupby(["idle", "system", "segment", "phase"], sort=False)["us"].median().round(1).reset_index()
    syns = df[(df.system == "mimbox") & (df.segment == "SYN") & (df.phase == "total")]
    spares = syns.groupby("idle", sort=False)["socket_on_path"].agg(syns="size", socket_on_path="sum").reset_index()
    return {"phases": t, "spares": spares}


def plot(df: pd.DataFrame):
    if df.empty:
        return plt.figure()
    idles = list(df["idle"].unique())
    fig, axes = plt.subplots(1, len(idles), figsize=(7 * len(idles), 3.8), squeeze=False, sharex=True)
    for ax, idle in zip(axes[0], idles):
        sub = df[(df.idle == idle) & (df.phase != "total")]
        labels = []
        for y, ((system, seg), g) in enumerate(sub.groupby(["system", "segment"], sort=False)):
            left = 0.0
            for phase in PHASES[(system, seg)]:
                v = g[g.phase == phase].us.median()
                ax.barh(y, v, left=left, edgecolor="k", linewidth=.3)
                if v > 8:
                    ax.text(left + v / 2, y, phase.split(" (")[0], ha="center", va="center", fontsize=6)
                left += v
            labels.append(f"{system} {seg}")
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xlabel("µs (median per phase)")
        ax.set_title(f"idle cores: {idle}", fontsize=9)
        ax.grid(alpha=.3, axis="x")
    fig.suptitle("Where Table 1's microseconds go (bpftrace + tcpdump on the converter host)", fontsize=9)
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this experiment (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
