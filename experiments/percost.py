"""Per-connection cost: where the converter is the bottleneck, what each design choice costs.

Fig. 5's converter-bound point (1 KB files, 40 clients, a new connection per request, every
converter held to the same CPU quota) for MiMBox's variants beside HAProxy (http and tcp modes)
and the paper's read()/write() converter, interleaved in one run: the SYN path (hold every SYN
until the server answered, as the paper; or let the kernel answer and connect after accept()),
and the data engine (splice through a pipe, or recv/send through a buffer). req/s and converter CPU
µs per request; the variant that wins becomes the default (README, issue notes).
"""
from __future__ import annotations

import os
import sys

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments import servers  # noqa: E402
from experiments.common import (  # noqa: E402
    pick,
    CONVERTER_CPUS,
    AUTO,
    CONVERTER_QUOTA_CORES,
    END_HOST_CPUS,
    mean_ci,
    run_experiment,
    running,
    syn_counts,
)
from experiments.systems import HAProxy, MiMBox, Naive, Router  # noqa: E402
from experiments.measure.tools import wrk  # noqa: E402
from experiments.measure.tracer import tracing  # noqa: E402
from experiments.workload import HTTP_PORT, _measure, calibrated  # noqa: E402
from topologies.regimes import CONVERTER_BOUND  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

NAME = "percost_converter"
FULL = dict(size=1024, reps=5, seconds=5, connections=40, quota_cores=AUTO)
QUICK = dict(size=1024, reps=3, seconds=3, connections=40, quota_cores=AUTO)
PROFILED = ("haproxy-1t-tcp", "read/write", "mimbox", "mimbox-static", "mimbox-static-accept")   # perf, strace


# wrk's 40 connections come from one client address: with every SYN held (--syn-path hold), the
# per-address cap (32 by default: one host's flood must not take a worker's whole pending table)
# would refuse 8 of them (RST) where auto defers them to the kernel; this load is one phone's
# worth of connections only in the count, so the cap is set to the load (the peers have none)
ONE_CLIENT_ADDRESS = ["--pending-per-address", "64"]


def systems() -> list:
    """The peers; MiMBox as of round 1 (every SYN held, splice); MiMBox's defaults; its variants (the
    io_uring engine among them)."""
    c = CONVERTER_CPUS
    return [Router(), HAProxy(threads=1, cpus=c), HAProxy(threads=1, mode="tcp", cpus=c),
            Naive("readwrite", cpus=c),
            MiMBox(mode="explicit", cpus=c, syn_path="hold", engine="splice", extra=ONE_CLIENT_ADDRESS),
            MiMBox(mode="explicit", cpus=c, syn_path="hold", extra=ONE_CLIENT_ADDRESS),
            MiMBox(mode="explicit", cpus=c),
            MiMBox(mode="explicit", cpus=c, engine="uring"),
            MiMBox(mode="explicit", cpus=c, syn_path="accept"),
            MiMBox(mode="static", cpus=c),
            MiMBox(mode="static", cpus=c, syn_path="accept")]


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    with Testbed(PaperTopo()) as tb:
        web = servers.nginx(tb, [params["size"]], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS)
        web_mptcp = servers.nginx(tb, [params["size"]], HTTP_PORT + 1, mptcp=True, cpus=END_HOST_CPUS)
        syss = pick(systems(), params)
        try:
            with running(tb, syss, CONVERTER_BOUND, params["quota_cores"], HTTP_PORT) as box:
                calibrated(tb, syss, CONVERTER_BOUND, [params["size"]], params, box)
                rows = _measure(tb, syss, CONVERTER_BOUND, [params["size"]], params)
                syn_paths = syn_counts(syss, ("syns", "deferred", "accepted", "refused"))
                split = [row for s in syss if s.name in PROFILED for row in cpu_split(tb, s, params)]
                calls = [row for s in syss if s.name in PROFILED for row in work_per_request(tb, s, params)]
        finally:
            web.stop()
            web_mptcp.stop()
    return pd.DataFrame(rows), {"regime": box, "syn_paths": syn_paths, "cpu_split": split, "work": calls}


def quota_of(df: pd.DataFrame) -> float:
    """The quota per event loop the run held its converters to (calibrated or given)."""
    q = df["quota_cores_per_loop"].dropna() if "quota_cores_per_loop" in df else pd.Series(dtype=float)
    return float(q.iloc[0]) if len(q) else CONVERTER_QUOTA_CORES


def cpu_split(tb, system, params: dict) -> list[dict]:
    """One more run of the load under `perf record` (software clock, the system's processes): the
    converter's CPU µs per request split into kernel, the program itself (Python or HAProxy) and
    libraries; empty where perf is missing."""
    import shutil
    import subprocess
    import tempfile
    if not shutil.which("perf"):
        return []
    fd, data = tempfile.mkstemp(prefix="mimbox-perf-", suffix=".data")
    os.close(fd)
    pids = system.box.pids() if system.box else system.pids()
    try:
        with tracing(["perf", "record", "-q", "-e", "cpu-clock", "-F", "4999", "-p", ",".join(map(str, pids)),
                      "-o", data], pids):
            r = wrk(tb, system, HTTP_PORT, f"/{params['size']}.bin", params["seconds"], params["connections"],
                    cpus=END_HOST_CPUS)
        out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso", "--stdio", "-q",
                              "-F", "sample,dso"], capture_output=True, text=True, timeout=120).stdout
    finally:
        os.unlink(data)
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            dso = parts[1].strip("[]")
            where = where_of(dso)
            rows.append(dict(system=system.name, where=where, dso=dso,
                             us_per_req=int(parts[0]) * 1e6 / 4999 / max(1, r["requests"])))
    return rows


PACKETS = ("IpInReceives", "IpOutRequests")     # nstat, the converter's namespace: packets in and out


def work_per_request(tb, system, params: dict) -> list[dict]:
    """One more run of the load under `strace -c -f` (the system's processes): what the converter asks
    of the kernel per request -- its system calls, by name -- and the packets its namespace received
    and sent per request (nstat). strace slows the converter several times, so only counts are kept,
    not times (a slower loop batches more: epoll_wait per request is the one count it lowers). Empty
    where strace is missing."""
    import shutil
    if not shutil.which("strace"):
        return []
    pids = system.box.pids() if system.box else system.pids()

    def packets() -> dict[str, int]:
        out = tb.mbox.cmd("nstat -az " + " ".join(PACKETS)).splitlines()[1:]
        return {f[0]: int(f[1]) for f in (line.split() for line in out) if len(f) > 1}
    with tracing(["strace", "-c", "-f", "-q", *(x for p in pids for x in ("-p", str(p)))], pids) as trace:
        before = packets()
        r = wrk(tb, system, HTTP_PORT, f"/{params['size']}.bin", params["seconds"], params["connections"],
                cpus=END_HOST_CPUS)
        after = packets()
    table = trace.stderr_text
    n = max(1, r["requests"])
    rows = [dict(system=system.name, what=name, per_request=(after.get(name, 0) - before.get(name, 0)) / n)
            for name in PACKETS]
    rows += [dict(system=system.name, what=f"{name}()", per_request=k / n) for name, k in strace_calls(table).items()]
    return rows


def strace_calls(table: str) -> dict[str, int]:
    """`strace -c`'s summary table: calls per system call (% time, seconds, usecs/call, calls, [errors,] name)."""
    out = {}
    for line in table.splitlines():
        f = line.split()
        if len(f) >= 5 and f[3].isdigit() and f[-1] != "total" and not f[-1].startswith("-"):
            out[f[-1]] = int(f[3])
    return out


def work_table(man: dict) -> pd.DataFrame:
    """System calls and packets per request, a column per system (rows: packets, the calls' total,
    then each call that one system makes at least 0.05 times a request)."""
    d = pd.DataFrame(man.get("work", []))
    if d.empty:
        return d
    t = d.pivot_table(index="what", columns="system", values="per_request", aggfunc="sum", sort=False).fillna(0)
    calls = t[t.index.str.endswith("()")]
    calls = calls[(calls >= 0.05).any(axis=1)].sort_values(list(calls.columns)[-1], ascending=False)
    total = pd.DataFrame([t[t.index.str.endswith("()")].sum()], index=["system calls"])
    names = {"IpInReceives": "packets in", "IpOutRequests": "packets out"}
    out = pd.concat([t.loc[[p for p in PACKETS if p in t.index]].rename(index=names), total, calls]).round(2)
    return out.rename_axis("per request").reset_index()


def where_of(dso: str) -> str:
    """kernel, program (the converter's own code: Python, HAProxy, MiMBox's C core) or libraries."""
    if dso == "kernel.kallsyms":
        return "kernel"
    return "program" if dso.startswith(("python", "haproxy", "librelaycore")) else "libraries"


def tables(df: pd.DataFrame) -> dict:
    """Mean req/s and µs/request per system, and each over HAProxy-1t (http)."""
    g = df.groupby("system", sort=False).agg(req_per_s=("req_per_s", "mean"), cpu_us_per_req=("cpu_us_per_req", "mean"))
    if "haproxy-1t" not in g.index:          # a run of other systems (compare): no reference here
        return {"summary": g.reset_index()}
    ref = g.loc["haproxy-1t"]
    g["req_per_s_vs_haproxy_1t"] = (g.req_per_s / ref.req_per_s).round(3)
    g["cpu_vs_haproxy_1t"] = (g.cpu_us_per_req / ref.cpu_us_per_req).round(3)
    return {"summary": g.reset_index()}


def cpu_split_table(man: dict) -> pd.DataFrame:
    """µs of converter CPU per request by where it ran (kernel / program / libraries), per system."""
    d = pd.DataFrame(man.get("cpu_split", []))
    if d.empty:
        return d
    d["where"] = d.dso.map(where_of)
    return d.groupby(["system", "where"], sort=False).us_per_req.sum().round(1).unstack("where").reset_index()


def problems(df: pd.DataFrame) -> list[str]:
    bad = df[(df["socket_errors"] > 0) | (df["non_2xx"] > 0)]
    return [f"{r.system} rep {r.rep}: {r.socket_errors} socket errors, {r.non_2xx} non-2xx" for r in bad.itertuples()]


def plot(df: pd.DataFrame):
    from experiments.style import few_reps_warning, styles
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(dict.fromkeys(df.system))
    colours = [styles(names)[n]["color"] for n in names]
    for axis, col, label in ((ax, "req_per_s", "requests/s"), (ax2, "cpu_us_per_req", "converter CPU µs/request")):
        st = [mean_ci(df[df.system == n][col].dropna()) if df[df.system == n][col].notna().any() else (0, 0)
              for n in names]
        bars = axis.barh(names, [m for m, _ in st], xerr=[c for _, c in st], color=colours)
        axis.bar_label(bars, fmt="%.0f", fontsize=7, padding=3)
        axis.set_xlabel(label)
        axis.grid(alpha=.3, axis="x")
        axis.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle(f"1 KB, 40 clients, new connection per request; each converter at "
                 f"{quota_of(df):g} core", fontsize=9)
    few_reps_warning(fig, int(df.groupby("system").size().min()))
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this experiment (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
