"""Where a converted request's CPU goes: perf on MiMBox and on HAProxy-1t under Fig. 5's converter-bound
1 KB load, by area (the converter's own code, each part of the kernel).

Each converter, pinned to its core and held to the converter-bound quota, serves wrk's 40
concurrent `Connection: close` clients while `perf record` samples its processes (software clock);
a sample is charged to the function it was in, and functions are grouped into areas (AREAS).
µs per request = the area's share of the converter's CPU time over the requests served. The run
alternates the systems, so both see the same machine state.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import servers  # noqa: E402
from experiments.common import (  # noqa: E402
    CONVERTER_CPUS,
    CONVERTER_QUOTA_CORES,
    END_HOST_CPUS,
    interleave,
    progress,
    run_experiment,
    running,
)
from experiments.measure.tools import wrk  # noqa: E402
from experiments.systems import HAProxy, MiMBox  # noqa: E402
from topologies.regimes import CONVERTER_BOUND  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

NAME = "profile_converter"
FULL = dict(size=1024, seconds=10, reps=3, connections=40, quota_cores=CONVERTER_QUOTA_CORES)
QUICK = dict(size=1024, seconds=5, reps=2, connections=40, quota_cores=CONVERTER_QUOTA_CORES)
HTTP_PORT = 80
FREQ = 4999
# (area, pattern on the kernel function's name), first match wins; user space goes by its binary
AREAS = [
    ("MPTCP", r"^(__)?(mptcp|subflow)"),
    ("scheduler, wake-ups", r"(schedule|task_switch|wake_up|try_to_wake|enqueue_|dequeue_|pick_|update_curr|"
                            r"idle|psi_|cpuacct|throttle)"),
    ("epoll", r"(^ep_|epoll)"),
    ("TCP", r"^(__)?(tcp|inet_csk|inet_hash|__inet_lookup|inet_ehash|reqsk|syn_|secure_tcp)"),
    ("IP, veth, netfilter", r"^(__)?(ip_|ipv4|fib|veth|netif|net_rx|dev_|__dev|nf_|nft_|ipt_|nfqnl|skb|sk_filter|"
                            r"eth_|neigh|dst_|rt_|raw_|napi|process_backlog|sch_|qdisc|pfifo|bpf_prog)"),
    ("memory", r"(kmem_|kmalloc|kfree|slab|memcg|__alloc|alloc_pages|free_pages|page_|folio|refill_obj)"),
    ("sockets, files, syscalls", r"(sock|sys_|syscall|fd|file|vfs|__fput|iov|copy_|entry_|splice|pipe|"
                                  r"security_|apparmor|fsnotify|rcu|locks?_|_raw_spin|mutex|percpu)"),
]
USER = {"librelaycore.so": "MiMBox core (C)", "haproxy": "HAProxy"}


def area(dso: str, sym: str) -> str:
    """The area a sample belongs to."""
    if dso != "[kernel.kallsyms]":
        if dso.startswith("python"):
            return "Python"
        return USER.get(dso, "libraries (libc, ...)")
    for name, pattern in AREAS:
        if re.search(pattern, sym):
            return name
    return "kernel, other"


def perf_areas(data: str) -> dict[str, int]:
    """Samples per area in a perf.data file."""
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio", "-q",
                          "-F", "sample,dso,sym"], capture_output=True, text=True, timeout=300).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit():
            dso, sym = parts[1], parts[3]
            a = area(dso, sym)
            counts[a] = counts.get(a, 0) + int(parts[0])
    return counts


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    if not shutil.which("perf"):
        raise RuntimeError("perf is missing (Debian: linux-perf)")
    rows = []
    c = CONVERTER_CPUS
    syss = [MiMBox(mode="explicit", cpus=c), HAProxy(threads=1, cpus=c)]
    with Testbed(PaperTopo()) as tb:
        web = servers.nginx(tb, [params["size"]], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS)
        try:
            with running(tb, syss, CONVERTER_BOUND, params["quota_cores"], HTTP_PORT) as box:
                for rep in range(params["reps"]):
                    for s in interleave(syss, rep):
                        rows += _profile_one(tb, s, rep, params)
        finally:
            web.stop()
    return pd.DataFrame(rows), {"regime": box}


def _profile_one(tb, system, rep: int, params: dict) -> list[dict]:
    pids = ",".join(str(p) for p in (system.box.pids() if system.box else system.pids()))
    fd, data = tempfile.mkstemp(prefix="mimbox-perf-", suffix=".data")
    os.close(fd)
    rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQ), "-p", pids, "-o", data],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        c0 = system.cpu_s()
        r = wrk(tb, system, HTTP_PORT, f"/{params['size']}.bin", params["seconds"], params["connections"],
                cpus=END_HOST_CPUS)
        cpu = system.cpu_s() - c0
    finally:
        rec.send_signal(2)
        rec.wait(timeout=120)
    try:
        counts = perf_areas(data)
    finally:
        os.unlink(data)
    total = sum(counts.values()) or 1
    us = 1e6 * cpu / max(1, r["requests"])
    progress(f"profile rep {rep} {system.name}: {r['req_per_s']:.0f} req/s, {us:.0f} µs CPU/request")
    return [dict(system=system.name, rep=rep, area=a, samples=n, share=n / total, us_per_req=us * n / total,
                 req_per_s=r["req_per_s"], cpu_us_per_req=us) for a, n in counts.items()]


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean µs of converter CPU per request, area by system (rows sorted by MiMBox's cost)."""
    reps = df.groupby("system").rep.nunique()
    t = df.groupby(["area", "system"]).us_per_req.sum().unstack("system").fillna(0)
    t = t / reps.reindex(t.columns).values
    first = "mimbox" if "mimbox" in t.columns else t.columns[0]
    t = t.sort_values(first, ascending=False).round(1)
    t.loc["total"] = t.sum().round(1)
    return t


def findings(df: pd.DataFrame) -> dict:
    t = table(df)
    return {"us_per_request_by_area": {s: t[s].to_dict() for s in t.columns}}


def plot(df: pd.DataFrame):
    t = table(df).drop(index="total")
    fig, ax = plt.subplots(figsize=(8, 3.6))
    left = pd.Series(0.0, index=t.columns)
    cmap = plt.get_cmap("tab20")
    for i, (name, row) in enumerate(t.iterrows()):
        ax.barh(list(t.columns), row.values, left=left.values, color=cmap(i % 20), label=name)
        left += row
    ax.set_xlabel("converter CPU µs per 1 KB request (perf, by area)")
    ax.invert_yaxis()
    ax.grid(alpha=.3, axis="x")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this measurement (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
