"""Where a converter's CPU goes, by area (the converter's own code, each part of the kernel), measured
with perf in the converter-bound regime, two workloads:

- `1KB`: Fig. 5's 1 KB load (MiMBox, HAProxy-1t): wrk's 40 concurrent `Connection: close` clients;
  cost in µs of converter CPU per request;
- `bulk`: Fig. 4's MSS 1460 point with TSO/GSO on (MiMBox, HAProxy-1t in tcp mode, the paper's
  read()/write() converter): one iperf3 upload; cost in ms of converter CPU per GB.

Each converter, pinned to its core and held to the converter-bound quota, carries the load while
`perf record` samples its processes (software clock); a sample is charged to the function it was
in, and functions are grouped into areas (AREAS). Cost per area = the area's share of the
converter's CPU time over the requests (bytes) served. Each run alternates the systems, so they see
the same machine state.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

import matplotlib
import pandas as pd

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
from experiments.measure.tools import iperf3, wrk  # noqa: E402
from experiments.measure.tracer import tracing  # noqa: E402
from experiments.systems import HAProxy, MiMBox, Naive  # noqa: E402
from topologies.regimes import CONVERTER_BOUND  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

NAME = "profile_converter"
# variants: besides Fig. 5's MiMBox, the paper's SYN path for every SYN and static mode without holding
FULL = dict(size=1024, seconds=10, reps=3, connections=40, quota_cores=CONVERTER_QUOTA_CORES, bulk_seconds=10,
            variants=True)
QUICK = dict(size=1024, seconds=5, reps=2, connections=40, quota_cores=CONVERTER_QUOTA_CORES, bulk_seconds=4,
             variants=True)
HTTP_PORT = 80
IPERF_PORT = 5201
SMALL, BULK = "1KB", "bulk"
UNIT = {SMALL: "µs/request", BULK: "ms/GB"}
FREQ = 4999
# (area, pattern on the kernel function's name), first match wins; user space goes by its binary
AREAS = [
    ("MPTCP", r"^(__)?(mptcp|subflow)"),
    ("copies (user <-> kernel)", r"(rep_movs|copy_user|_copy_(to|from)_iter|copy_page_(to|from)_iter|"
                                 r"skb_copy_datagram|csum_and_copy|^memcpy|^memmove)"),
    ("splice, pipes", r"(splice|pipe|spd_)"),
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


KERNEL = "[kernel.kallsyms]"


def perf_samples(data: str) -> dict[tuple[str, str], int]:
    """Samples per (area, symbol) in a perf.data file: kernel functions by name, user space by its
    binary (the symbol is then the area's name)."""
    out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,sym", "--stdio", "-q",
                          "-F", "sample,dso,sym"], capture_output=True, text=True, timeout=300).stdout
    counts: dict[tuple[str, str], int] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].isdigit():
            dso, sym = parts[1], parts[3]
            a = area(dso, sym)
            key = (a, sym if dso == KERNEL else a)
            counts[key] = counts.get(key, 0) + int(parts[0])
    return counts


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    if not shutil.which("perf"):
        raise RuntimeError("perf is missing (Debian: linux-perf)")
    from experiments.goodput import set_offloads
    rows, boxes = [], {}
    c = CONVERTER_CPUS
    # Fig. 5's MiMBox (explicit, SYN path auto: under this load most SYNs skip the converter), the
    # paper's SYN path for every SYN (hold), and static mode that never holds; HAProxy-1t the floor
    small = [MiMBox(mode="explicit", cpus=c), HAProxy(threads=1, cpus=c)]
    if params.get("variants", True):
        from experiments.percost import ONE_CLIENT_ADDRESS     # (wrk's 40 connections: one address)
        small[1:1] = [MiMBox(mode="explicit", syn_path="hold", cpus=c, extra=ONE_CLIENT_ADDRESS),
                      MiMBox(mode="static", syn_path="accept", cpus=c)]
    bulk = [MiMBox(mode="explicit", cpus=c), HAProxy(threads=1, mode="tcp", cpus=c), Naive("readwrite", cpus=c)]
    with Testbed(PaperTopo()) as tb:
        web = servers.nginx(tb, [params["size"]], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS)
        try:
            rows += _profile_all(tb, small, HTTP_PORT, params, SMALL, boxes)
        finally:
            web.stop()
        if params.get("bulk_seconds"):
            sink = servers.iperf3(tb, IPERF_PORT, mptcp=False, cpus=END_HOST_CPUS)
            set_offloads(tb, True)          # Fig. 4's TSO/GSO point: segments batched as on real NICs
            try:
                rows += _profile_all(tb, bulk, IPERF_PORT, params, BULK, boxes)
            finally:
                sink.stop()
    return pd.DataFrame(rows), {"regime": boxes}


def _profile_all(tb, systems: list, port: int, params: dict, workload: str, boxes: dict) -> list[dict]:
    """The systems started in their CPU boxes, each profiled once per repetition, alternating."""
    rows = []
    with running(tb, systems, CONVERTER_BOUND, params["quota_cores"], port) as boxes[workload]:
        for rep in range(params["reps"]):
            for s in interleave(systems, rep):
                rows += _profile_one(tb, s, rep, params, workload)
    return rows


def _profile_one(tb, system, rep: int, params: dict, workload: str) -> list[dict]:
    pids = system.box.pids() if system.box else system.pids()
    fd, data = tempfile.mkstemp(prefix="mimbox-perf-", suffix=".data")
    os.close(fd)
    try:
        with tracing(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQ), "-p", ",".join(map(str, pids)),
                      "-o", data], pids):
            c0 = system.cpu_s()
            if workload == SMALL:
                r = wrk(tb, system, HTTP_PORT, f"/{params['size']}.bin", params["seconds"], params["connections"],
                        cpus=END_HOST_CPUS)
                units, rate = max(1, r["requests"]), f"{r['req_per_s']:.0f} req/s"
                per_unit = 1e6       # µs per request
            else:
                r = iperf3(tb, system, IPERF_PORT, params["bulk_seconds"], cpus=END_HOST_CPUS)
                units, rate = max(1.0, r["bytes"] / 1e9), f"{r['goodput_bps'] / 1e9:.2f} Gbit/s"
                per_unit = 1e3       # ms per GB
            cpu = system.cpu_s() - c0
        counts = perf_samples(data)
    finally:
        os.unlink(data)
    total = sum(counts.values()) or 1
    cost = per_unit * cpu / units
    progress(f"profile {workload} rep {rep} {system.name}: {rate}, {cost:.1f} {UNIT[workload]} of CPU")
    return [dict(workload=workload, system=system.name, rep=rep, area=a, symbol=sym, samples=n, share=n / total,
                 cost=cost * n / total, unit=UNIT[workload], total_cost=cost, rate=rate)
            for (a, sym), n in counts.items()]


def table(df: pd.DataFrame, workload: str = SMALL) -> pd.DataFrame:
    """Mean converter CPU per request (1KB, µs) or per GB (bulk, ms), area by system (rows sorted by
    MiMBox's cost)."""
    if "workload" not in df:                     # a run from before the bulk workload
        df = df.assign(workload=SMALL, cost=df["us_per_req"])
    df = df[df.workload == workload]
    reps = df.groupby("system").rep.nunique()
    t = df.groupby(["area", "system"]).cost.sum().unstack("system").fillna(0)
    t = t / reps.reindex(t.columns).values
    first = "mimbox" if "mimbox" in t.columns else t.columns[0]
    t = t.sort_values(first, ascending=False).round(1)
    t.loc["total"] = t.sum().round(1)
    return t


def kernel_table(df: pd.DataFrame, workload: str = SMALL, against: str | None = None, top: int = 25) -> pd.DataFrame:
    """Kernel functions side by side: mean converter CPU per request (µs) or per GB (ms) each system
    spent in each kernel function, and each other system's difference to `against` (default the
    HAProxy row), the `top` functions by the largest difference of the first system; the rest summed
    in one row, then the kernel's total."""
    df = df[(df.workload == workload) & df.area.isin([a for a, _ in AREAS] + ["kernel, other"])]
    if "symbol" not in df or df.empty:
        return pd.DataFrame()
    reps = df.groupby("system").rep.nunique()
    t = df.groupby(["symbol", "system"]).cost.sum().unstack("system").fillna(0)
    t = t / reps.reindex(t.columns).values
    against = against or next((s for s in t.columns if s.startswith("haproxy")), t.columns[-1])
    others = [s for s in t.columns if s != against]
    order = sorted(others, key=lambda s: (s != "mimbox", s))
    for s in order:
        t[f"{s} - {against}"] = t[s] - t[against]
    key = f"{order[0]} - {against}"
    t = t.sort_values(key, ascending=False)
    areas = df.groupby("symbol").area.first()
    head, rest = t.iloc[:top].copy(), t.iloc[top:]
    head.insert(0, "area", areas.reindex(head.index).values)
    head.loc["(other functions)"] = ["", *rest.sum().values]
    head.loc["kernel total"] = ["", *t.sum().values]
    head = head[["area", *order, against, *[f"{s} - {against}" for s in order]]]
    return head.reset_index().rename(columns={"symbol": "kernel function"}).round(2)


def tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Extra CSVs: the kernel side by side per workload (kernel_1KB.csv, kernel_bulk.csv)."""
    return {f"kernel_{w}": kernel_table(df, w) for w in workloads(df) if not kernel_table(df, w).empty}


def workloads(df: pd.DataFrame) -> list[str]:
    return [w for w in (SMALL, BULK) if w in set(df.get("workload", pd.Series([SMALL])))]


def findings(df: pd.DataFrame) -> dict:
    out = {}
    for w in workloads(df):
        t = table(df, w)
        out[f"{UNIT[w]}_by_area".replace("/", "_per_").replace("µs", "us")] = {s: t[s].to_dict() for s in t.columns}
        k = kernel_table(df, w)
        if not k.empty:
            total = k.set_index("kernel function").loc["kernel total"]
            out[f"kernel_{w}_total"] = {c: float(total[c]) for c in k.columns if c not in ("kernel function", "area")}
    return out


def plot(df: pd.DataFrame):
    ws = workloads(df)
    fig, axes = plt.subplots(len(ws), 1, figsize=(8, 2.2 + 1.6 * len(ws)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    areas = sorted(set(df.area))
    for ax, w in zip(axes[:, 0], ws):
        t = table(df, w).drop(index="total")
        left = pd.Series(0.0, index=t.columns)
        for name, row in t.iterrows():
            ax.barh(list(t.columns), row.values, left=left.values, color=cmap(areas.index(name) % 20), label=name)
            left += row
        ax.set_xlabel(f"converter CPU {UNIT[w]} ({'1 KB requests' if w == SMALL else 'bulk upload, TSO/GSO on'}"
                      ", perf, by area)")
        ax.invert_yaxis()
        ax.grid(alpha=.3, axis="x")
    handles = {h.get_label(): h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), fontsize=7, ncol=4, loc="lower center")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this measurement (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
