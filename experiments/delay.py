"""Table 1 — per-segment forwarding delay inside the converter host (§4.2).

A client opens connections one after another; on each it sends one 1300-byte burst (the paper's
bursts at 20 kbit/s) and closes. tcpdump captures both of the converter host's interfaces with
nanosecond timestamps; the delay of a segment is (leaves one interface) - (arrived on the other):
  SYN      client's SYN in  -> SYN towards the server out
  SYN+ACK  server's SYN+ACK in -> SYN+ACK towards the client out (N/A when the client's SYN+ACK
           leaves before the server's arrives: the read()/write() converter answers at once)
  data     the 1300-byte segment in -> out
One client path only (no join subflow), so every segment crosses the two captured interfaces.

Two idle regimes (`idle` column): halt (the VM's default here: an idle core halts at once, and
waking it is a VM exit that costs more than a user-space converter's work) and poll (cpuidle
haltpoll polls for twice the packet interval before halting, so an idle core never halts between
packets; for this measurement only: topologies.regimes.IdlePolling sets it and always restores it). MiMBox is measured on both SYN paths: held (its default at this rate:
connect to the server first, as the paper) and --syn-path accept (the kernel answers the client,
the converter connects after accept(), like the read()/write() converter), and with --busy-poll (its
worker polls instead of sleeping between packets: no wake-up, a busy core; HAProxy's `busy-polling`).
"""
from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import (  # noqa: E402
    CONVERTER_CPUS,
    conversion,
    mean_ci,
    mptcp_mib,
    progress,
    run_experiment,
    testbed,
)
from experiments.systems import MiMBox, Naive, Router, python, ready_line, run_dir  # noqa: E402
from topologies.regimes import POLL, IdlePolling, haltpoll_now  # noqa: E402
from topologies.testbed import PaperTopo  # noqa: E402

NAME = "table1_delay"
FULL = dict(measures=100, interval=0.52, idle=["halt", "poll"])   # 1300 bytes at 20 kbit/s
QUICK = dict(measures=100, interval=0.05, idle=["halt", "poll"])   # tails are long here: n=100
SERVER_PORT = 9500
PAPER = {  # Table 1, microseconds: (mean, ci) or None for N/A
    "router": {"SYN": (5.2, 0.1), "SYN+ACK": (5.2, 0.1), "data": (5.3, 0.1)},
    "read/write": {"SYN": (143.4, 11.4), "SYN+ACK": None, "data": (29.0, 0.3)},
    "mimbox (TCP server)": {"SYN": (17.5, 1.2), "SYN+ACK": (41.6, 2.0), "data": (16.0, 0.1)},
}
BURST_CLIENT = """
import socket, sys, time
from mimbox.wire.mptcp import IPPROTO_MPTCP
host, port, n, interval, mptcp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == '1'
payload = bytes(1300)
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect((host, port))
    time.sleep(interval / 2)
    s.sendall(payload)
    time.sleep(interval / 2)
    s.close()
    time.sleep(interval / 2)   # the close is over before the next SYN: each segment meets a quiet converter
"""
SINK = """
import socket, sys, threading
from mimbox.wire.mptcp import IPPROTO_MPTCP
port, mptcp = int(sys.argv[1]), sys.argv[2] == '1'
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); ls.bind(('0.0.0.0', port)); ls.listen(128)
print('ready', flush=True)
def drain(c):
    while c.recv(65536): pass
    c.close()
while True:
    c, _ = ls.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
"""


def capture(host, intf: str, path: str):
    p = host.popen(["tcpdump", "-Z", "root", "--immediate-mode", "-U", "-i", intf, "-n", "-s", "128", "-B", "8192", "--time-stamp-precision", "nano",
                    "-w", path, "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    p.stderr.readline()   # "listening on ...": the capture is armed
    return p


def read_pcap(path: str) -> list[dict]:
    from scapy.layers.inet import IP, TCP
    from scapy.utils import PcapReader
    out = []
    with PcapReader(path) as r:
        for pkt in r:
            if IP not in pkt or TCP not in pkt:
                continue
            t = pkt[TCP]
            payload = pkt[IP].len - pkt[IP].ihl * 4 - t.dataofs * 4   # the capture is truncated (-s 128)
            out.append(dict(time=float(pkt.time), src=pkt[IP].src, dst=pkt[IP].dst, sport=t.sport, dport=t.dport,
                            flags=str(t.flags), seq=t.seq, payload=payload))
    return out


def pair(ins: list[float], outs: list[float]) -> list[float]:
    """i-th arrival with the first departure after it (connections are sequential): delays in us."""
    delays, j = [], 0
    for t in ins:
        while j < len(outs) and outs[j] < t:
            j += 1
        if j == len(outs):
            break
        delays.append((outs[j] - t) * 1e6)
        j += 1
    return delays


def delays_from(client_side: list[dict], server_side: list[dict]) -> dict[str, list[float]]:
    syn_in = [p["time"] for p in client_side if p["flags"] == "S"]
    syn_out = [p["time"] for p in server_side if p["flags"] == "S"]
    sa_in = [p["time"] for p in server_side if p["flags"] == "SA"]
    sa_out = [p["time"] for p in client_side if p["flags"] == "SA"]
    data_in = [p["time"] for p in client_side if p["payload"] == 1300]
    data_out = [p["time"] for p in server_side if p["payload"] == 1300]
    res = {"SYN": pair(syn_in, syn_out), "data": pair(data_in, data_out)}
    # SYN+ACK exists only when the client's SYN+ACK follows the server's
    res["SYN+ACK"] = pair(sa_in, sa_out) if sa_out and sa_in and sa_out[0] > sa_in[0] else []
    return res


def poll_ns(params: dict) -> int:
    """Idle polling (and MiMBox's --busy-poll) must outlast the gap between packets (half the interval),
    or the core halts anyway."""
    return params.get("poll_ns") or int(2e9 * params["interval"])


def cases(params: dict, tb=None) -> list:
    """(name, system, server speaks MPTCP) of the table; tb: the testbed (its converter's pinning)."""
    CONVERTER_CPUS = tb.cpus("mbox") if tb is not None else globals()["CONVERTER_CPUS"]  # noqa: N806
    return [("router", Router(), True), ("read/write", Naive("readwrite", cpus=CONVERTER_CPUS), False),
            ("mimbox (TCP server)", MiMBox(mode="explicit", cpus=CONVERTER_CPUS), False),
            ("mimbox busy-poll (TCP server)", MiMBox(mode="explicit", cpus=CONVERTER_CPUS,
                                                     extra=["--busy-poll", str(poll_ns(params) // 1000)]), False),
            ("mimbox (MPTCP server)", MiMBox(mode="explicit", cpus=CONVERTER_CPUS), True),
            ("mimbox accept-first (TCP server)", MiMBox(mode="explicit", cpus=CONVERTER_CPUS,
                                                        syn_path="accept"), False)]


def pick_cases(params: dict, tb=None) -> list:
    """The figure's cases, or those a comparison chose (experiments.compare; its own systems: TCP server)."""
    every = cases(params, tb)
    chooser = params.get("systems")
    if chooser is None:
        return every
    chosen = chooser.choose([s for _, s, _ in every], names=[n for n, _, _ in every], tb=tb)
    back = {id(case[1]): case for case in every}
    return [back.get(id(s), (s.name, s, False)) for s in chosen]


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    rows, idle_settings = [], {}
    with testbed(PaperTopo()) as tb:
        tb.one_path()                                  # one path: every segment crosses both captures
        d = tb.mbox.mkdtemp("delay")                   # the captures
        client_py, sink_py = f"{tb.client.mkdtemp('delay')}/burst_client.py", f"{tb.server.mkdtemp('delay')}/sink.py"
        tb.client.write_file(client_py, BURST_CLIENT)
        tb.server.write_file(sink_py, SINK)
        for idle in params["idle"]:
            if idle == POLL and tb.remote:
                raise ValueError("table1: the poll regime sets this machine's cpuidle (haltpoll), not a remote "
                                 "host's: run it remotely with idle=['halt']")
            with IdlePolling(poll_ns(params)) if idle == POLL else _Halt() as regime:
                idle_settings[idle] = {**regime.describe(), "during": haltpoll_now()}
                if idle == POLL and not regime.active:
                    progress(f"table1: no idle polling here ({regime.reason}); poll rows skipped")
                    continue
                for name, system, server_mptcp in pick_cases(params, tb):
                    rows += _measure(tb, d, client_py, sink_py, name, system, server_mptcp, idle, params)
        idle_settings["after"] = haltpoll_now()
    return pd.DataFrame(rows), {"idle": idle_settings}


class _Halt:
    """The machine's own idle behaviour, untouched."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def describe(self) -> dict:
        return {"idle": "halt", "polling": False}


def bursts(tb, d: str, client_py: str, sink_py: str, name: str, system, tag: str, server_mptcp: bool,
           params: dict, tracer=None) -> tuple[str, str]:
    """Start the sink and `system`, warm the caches, capture both converter interfaces while the burst
    client runs through it, stop everything; returns the two captures' paths. `tracer(system)`, if
    given, is a context manager around the captured part (the breakdown's bpftrace)."""
    sink = tb.server.popen(["taskset", "-c", tb.cpus("server"), python(tb.server), sink_py, str(SERVER_PORT),
                            "1" if server_mptcp else "0"], stdout=subprocess.PIPE, text=True)
    ready_line(sink)
    pc, ps = f"{d}/{tag}-client.pcap", f"{d}/{tag}-server.pcap"
    try:
        system.start(tb, SERVER_PORT)
        host, port = system.endpoint(tb, SERVER_PORT)
        # warm the route and neighbour caches first, as the paper does
        tb.client.cmd(f"ping -c 2 -i 0.2 {host}; ping -c 2 -i 0.2 -I {tb.client_ips[0]} {tb.server_ip}")
        tb.mbox.cmd(f"ping -c 1 {tb.server_ip}")
        with tracer(system) if tracer else contextlib.nullcontext():
            caps = [capture(tb.mbox, tb.topo.client_addrs[0].intf_mbox, pc),
                    capture(tb.mbox, tb.topo.server_addrs[0].intf_mbox, ps)]
            try:
                argv = system.client_argv(tb, [python(tb.client), client_py, host, str(port), str(params["measures"]),
                                               str(params["interval"]), "1"], mptcp=False)
                out = tb.client.cmd(f"taskset -c {tb.cpus('client')} " + " ".join(shlex.quote(a) for a in argv))
                if "Error" in out:
                    raise RuntimeError(f"burst client through {name}: {out[-600:]}")
                time.sleep(0.3)
            finally:
                for c in caps:
                    c.terminate()
                    c.wait()
    finally:
        system.stop()
        sink.kill()
        sink.wait()
    return pc, ps


def _measure(tb, d, client_py, sink_py, name, system, server_mptcp, idle, params) -> list[dict]:
    rows = []
    tag = f"{idle}-{name.replace(' ', '_').replace('/', '')}"
    mib0 = mptcp_mib(tb.mbox)
    pc, ps = bursts(tb, d, client_py, sink_py, name, system, tag, server_mptcp, params)
    mib = conversion(mib0, mptcp_mib(tb.mbox))      # (a TCP-server case the converter must not make MPTCP)
    here = run_dir("pcap")          # the captures, brought back from the converter host (removed at exit)
    pc, ps = (tb.mbox.get(p, os.path.join(here, os.path.basename(p))) for p in (pc, ps))
    for kind, values in delays_from(read_pcap(pc), read_pcap(ps)).items():
        rows += [dict(idle=idle, system=name, segment=kind, i=i, delay_us=v, server_mptcp=server_mptcp, **mib)
                 for i, v in enumerate(values)]
    progress(f"table1 {idle} {name}: " + ", ".join(
        f"{k} {mean_ci(g.delay_us)[0]:.1f} us" for k, g in pd.DataFrame(rows).groupby("segment")))
    return rows


def tables(df: pd.DataFrame) -> dict:
    return {"table": summary(df)}


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Table 1: mean +- 95 % CI (and median) per idle regime, system and segment; N/A where it cannot exist."""
    if "idle" not in df:
        df = df.assign(idle="halt")
    out = []
    for idle in df["idle"].unique():
        for system in df[df.idle == idle]["system"].unique():
            row = {"idle": idle, "system": system}
            for seg in ("SYN", "SYN+ACK", "data"):
                v = df[(df.idle == idle) & (df.system == system) & (df.segment == seg)].delay_us
                if len(v):
                    m, ci = mean_ci(v)   # the paper's statistic; the median says what a typical segment saw
                    row[seg] = f"{m:.1f} ± {ci:.1f} µs (median {v.median():.0f}, n={len(v)})"
                else:
                    row[seg] = "N/A"
                p = PAPER.get(system, {}).get(seg, "—") if system in PAPER else "—"
                row[f"paper {seg}"] = "N/A" if p is None else (f"{p[0]} ± {p[1]} µs" if p != "—" else "—")
            out.append(row)
    return pd.DataFrame(out)


def plot(df: pd.DataFrame):
    """Bars per segment and system, one panel per idle regime; the paper's values as stars."""
    if "idle" not in df:
        df = df.assign(idle="halt")
    idles = list(df["idle"].unique())
    fig, axes = plt.subplots(1, len(idles), figsize=(7 * len(idles), 4.2), squeeze=False, sharey=True)
    segs = ["SYN", "SYN+ACK", "data"]
    from experiments.style import legend_outside, styles
    style = styles(df["system"])
    for ax, idle in zip(axes[0], idles):
        sub = df[df.idle == idle]
        systems = list(sub["system"].unique())
        w = 0.8 / len(systems)
        for k, system in enumerate(systems):
            means, cis, paper = [], [], []
            for seg in segs:
                v = sub[(sub.system == system) & (sub.segment == seg)].delay_us
                m, ci = mean_ci(v) if len(v) else (0.0, 0.0)
                means.append(m)
                cis.append(ci)
                p = PAPER.get(system, {}).get(seg)
                paper.append(p[0] if p else float("nan"))
            xs = [i + k * w for i in range(len(segs))]
            ax.bar(xs, means, w, yerr=cis, capsize=3, label=system, color=style[system]["color"])
            ax.plot(xs, paper, "*", color=style[system]["color"], ms=10, markeredgecolor="k")
        ax.plot([], [], "*", color="gray", markeredgecolor="k", label="paper (2013 hardware)")
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(segs))], segs)
        ax.set_yscale("log")
        ax.set_title(f"idle cores: {idle}" + (" (waking = a VM exit)" if idle == "halt" else
                                              " (haltpoll polls first)"), fontsize=9)
        ax.grid(alpha=.3, axis="y")
    legend_outside(fig, axes[0])
    axes[0][0].set_ylabel("time inside the converter host [µs]")
    fig.suptitle("Table 1: per-segment forwarding delay (mean ± 95 % CI; missing bar = N/A)", fontsize=9)
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this figure (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
